"""Entry point for launchers: a Megatron-core GPT model trained under Star Attention with context
parallelism (the CP group is the Star group), or a checkpoint answering a query over a long context.

    torchrun --nproc_per_node N launch/megatron_gpt.py --config configs/megatron-reference.toml \
        --context-parallel-size N --attention star                         # star, global or ring
    torchrun --nproc_per_node N launch/megatron_gpt.py --config configs/megatron-reference.toml \
        --context-parallel-size N --generate --context-file F --query Q    # the last checkpoint in out
    python launch/megatron_gpt.py --config configs/megatron-tiny-cpu.toml  # one process

``--help`` lists every setting (each key of the TOML config has a flag). Exit codes: 0, 1 after an
error (one line), 2 for a bad flag, 130 after Ctrl-C. The job itself is ``star_sp.apps.jobs.megatron_gpt``.
"""

from _start import launch  # launch/_start.py: Ctrl-C, --local_rank and the exit code, before torch is imported

if __name__ == "__main__":
    launch("star_sp.apps.jobs.megatron_gpt")
