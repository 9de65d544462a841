"""Entry point for launchers: a Megatron-core GPT model trained under Star Attention with context
parallelism (the CP group is the Star group), or a checkpoint answering a query over a long context.

    torchrun --nproc_per_node N launch/megatron_gpt.py --config configs/megatron-reference.toml \
        --context-parallel-size N --attention star                         # star, global or ring
    torchrun --nproc_per_node N launch/megatron_gpt.py --config configs/megatron-reference.toml \
        --context-parallel-size N --generate --context-file F --query Q    # the last checkpoint in out
    python launch/megatron_gpt.py --config configs/megatron-tiny-cpu.toml  # one process

``--help`` lists every setting (each key of the TOML config has a flag). Exit codes: 0, 1 after an
error (one line), 2 for a bad flag, 130 after Ctrl-C. The job itself is ``star_sp.training.megatron_job``.
"""

import os
import signal
import sys

if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C while torch is being imported
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from star_sp.training.megatron_job import main

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see launch/infer.py: skip the interpreter's teardown once the work is done
