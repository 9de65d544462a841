"""How every launcher entry point starts: Ctrl-C handled before torch is imported, the deepspeed
launcher's ``--local_rank=N`` dropped (LOCAL_RANK is read instead), and the process ended with the
job's exit code without the interpreter's teardown.

The process group is already closed when a job returns; the interpreter's teardown would run C++
destructors that now and then abort a launched process ("terminate called without an active
exception"), so the process exits at once after flushing its output.
"""

import importlib
import os
import signal
import sys


def launch(job: str, *command: str) -> None:
    """Run ``main(command + argv)`` of the module ``job`` on this command line and exit with its code."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C while torch is being imported
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    main = importlib.import_module(job).main
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main([*command, *argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
