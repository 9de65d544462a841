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

from _start import launch  # launch/_start.py: Ctrl-C, --local_rank and the exit code, before torch is imported

if __name__ == "__main__":
    launch("star_sp.apps.cli", "generate")
