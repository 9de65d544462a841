"""Entry point for launchers: ``star-sp eval`` with one process per host.

    torchrun --nproc_per_node N launch/eval.py [star-sp eval flags]
    deepspeed --num_gpus N launch/eval.py [star-sp eval flags]

Exit codes as for ``launch/infer.py``: 0, 1 after a user error, 2 for a bad flag, 130 after Ctrl-C.
"""

import os
import signal
import sys

if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C while torch is being imported
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from star_sp.apps.cli import main

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main(["eval", *argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see launch/infer.py: skip the interpreter's teardown once the work is done
