"""Entry point for launchers: fine-tuning under the anchor pattern, one process per GPU (or CPU process).

    deepspeed --num_gpus N launch/finetune.py --config configs/finetune-reference.toml
    torchrun --nproc_per_node N launch/finetune.py --config configs/finetune-reference.toml --deepspeed ''
    python launch/finetune.py --config configs/finetune-tiny-cpu.toml --deepspeed ''    # one process

``--help`` lists every setting (each key of the TOML config has a flag). The deepspeed launcher appends
``--local_rank=N``, which is accepted and ignored (LOCAL_RANK is read instead). Exit codes: 0, 1 after
an error (one line), 2 for a bad flag, 130 after Ctrl-C. The job itself is ``star_sp.apps.jobs.finetune``.
"""

import importlib
import os
import signal
import sys


def launch(job: str) -> None:
    """Run the module ``job``'s ``main`` on this command line and exit with its code; the Megatron-core
    launcher (``launch/megatron_gpt.py``) starts its job with this function as well."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C while torch is being imported
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    main = importlib.import_module(job).main
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see launch/infer.py: skip the interpreter's teardown once the work is done


if __name__ == "__main__":
    launch("star_sp.apps.jobs.finetune")
