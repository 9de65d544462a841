"""Entry point for launchers: ``star-sp eval`` with one process per host.

    torchrun --nproc_per_node N launch/eval.py [star-sp eval flags]
    deepspeed --num_gpus N launch/eval.py [star-sp eval flags]

Exit codes as for ``launch/infer.py``: 0, 1 after a user error, 2 for a bad flag, 130 after Ctrl-C.
"""

from _start import launch  # launch/_start.py: Ctrl-C, --local_rank and the exit code, before torch is imported

if __name__ == "__main__":
    launch("star_sp.apps.cli", "eval")
