"""One rank of the failure tests: ``python failure_script.py RANK WORLD PORT BAD_RANK MODE TIMEOUT``.

Every rank runs phase 2 once; then ``BAD_RANK`` raises inside its own step (``raise``), dies without a
word (``kill``), or hangs (``hang``), while the others run phase 2 again. Uncaught errors end the
process, as they would under torchrun.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import init_gloo  # noqa: E402
from common import Case, make_qkv  # noqa: E402
from star_sp.distributed import guarded_step, phase2_attention  # noqa: E402

rank, world, port, bad_rank, mode, timeout = sys.argv[1:7]
rank, world, port, bad_rank, timeout = int(rank), int(world), int(port), int(bad_rank), float(timeout)
group = init_gloo(rank, world, port, timeout)
case = Case(context_len=11, query_len=2, block_size=4, anchor_size=2)
q, k, v, _ = make_qkv(case)
lc, last = case.context_len, rank == world - 1
kw = dict(group=group, query_k=k[:, :, lc:] if last else None, query_v=v[:, :, lc:] if last else None)
phase2_attention(q[:, :, lc:], k[:, :, :lc], v[:, :, :lc], **kw)
if rank == bad_rank:
    if mode == "kill":
        os._exit(3)
    if mode == "hang":  # stuck outside star-sp, then killed by whoever watches it
        time.sleep(2 * timeout)
        os._exit(4)
    with guarded_step("user step", group):
        raise RuntimeError("simulated failure in this rank's own work")
phase2_attention(q[:, :, lc:], k[:, :, :lc], v[:, :, :lc], check=False, timeout_s=timeout, **kw)
print("UNEXPECTED: finished without error", flush=True)
