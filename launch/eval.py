"""Entry point for launchers: ``star-sp eval`` with one process per host.

    torchrun --nproc_per_node N launch/eval.py [star-sp eval flags]
    deepspeed --num_gpus N launch/eval.py [star-sp eval flags]
"""

import sys

from star_sp.cli import main

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(["eval", *argv]))
