"""Entry point for launchers: fine-tuning under the anchor pattern, one process per GPU (or CPU process).

    deepspeed --num_gpus N launch/finetune.py --config configs/finetune-reference.toml
    torchrun --nproc_per_node N launch/finetune.py --config configs/finetune-reference.toml --deepspeed ''
    python launch/finetune.py --config configs/finetune-reference-cpu.toml --deepspeed ''    # one process

``--help`` lists every setting (each key of the TOML config has a flag). The deepspeed launcher appends
``--local_rank=N``, which is accepted and ignored (LOCAL_RANK is read instead). Exit codes: 0, 1 after
an error (one line), 2 for a bad flag, 130 after Ctrl-C. The job itself is ``star_sp.apps.jobs.finetune``.
"""

from _start import launch  # launch/_start.py: Ctrl-C, --local_rank and the exit code, before torch is imported

if __name__ == "__main__":
    launch("star_sp.apps.jobs.finetune")
