"""A rank that raises, dies or hangs: every other rank exits with a clear error in bounded time.

Localizes bugs in ``distributed/guard.py`` (the failure record and its translation) and in the
timeouts of the collectives. Each test starts its own processes, as torchrun would.
"""

import os
import subprocess
import sys
import time

import pytest

from cluster import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 6.0


def _launch(world, bad_rank, mode):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "failure_script.py"), str(r), str(world), str(port),
                               str(bad_rank), mode, str(TIMEOUT_S)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for r in range(world)]
    start = time.monotonic()
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=6 * TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank still ran {6 * TIMEOUT_S + 30:.0f} s after the failure: a hang")
        outputs.append((p.returncode, out))
    return outputs, time.monotonic() - start


@pytest.mark.slow
def test_raising_rank_is_named_on_every_rank():
    outputs, elapsed = _launch(3, bad_rank=1, mode="raise")
    for rank, (code, out) in enumerate(outputs):
        assert code != 0, f"rank {rank} exited 0:\n{out}"
        assert "UNEXPECTED" not in out
        assert "StarCollectiveError" in out, out
        if rank == 1:
            assert "rank 1 failed in step 'user step'" in out, out
        else:
            assert "because rank 1 failed in step 'user step'" in out, out
    assert elapsed < 2 * TIMEOUT_S + 30


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_dead_or_stuck_rank_ends_the_others(mode):
    outputs, elapsed = _launch(3, bad_rank=2, mode=mode)
    for rank, (code, out) in enumerate(outputs):
        assert code != 0
        if rank != 2:
            assert "StarCollectiveError" in out and "step 'phase2'" in out, out
            assert "no rank reported an error" in out, out
    assert elapsed < 5 * TIMEOUT_S + 30
