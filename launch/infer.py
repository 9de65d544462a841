"""Entry point for launchers: one process per host.

    torchrun --nproc_per_node N launch/infer.py [star-sp generate flags]
    deepspeed --num_gpus N launch/infer.py [star-sp generate flags]

Both launchers set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the command joins that group
(NCCL on GPUs, gloo on CPUs) and runs ``star-sp generate``. DeepSpeed's own communication layer is not
used (inference needs only torch.distributed), so none of its extensions is built. The deepspeed
launcher appends ``--local_rank=N``, which is accepted and ignored (LOCAL_RANK is read instead).

Exit codes: 0, 1 after a user error (one line, printed by the first process of each host; under
torchrun it is also the root cause at the end of torchrun's failure report), 2 for a bad flag, 130
after Ctrl-C.
"""

import os
import signal
import sys

if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C while torch is being imported
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from star_sp.apps.cli import main

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main(["generate", *argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the process group is already closed: skip the interpreter's teardown, whose C++
    # destructors now and then abort a launched process ("terminate called without an active exception")
