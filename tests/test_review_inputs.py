"""Review fixes in input validation: every bad value below is one ``StarInputError`` line saying what to
pass, not a raw ``OverflowError`` or ``TypeError`` later, and a bad phase-2 merge on one rank is the same
error on every rank at once instead of a hang in the others' collective.

The functions taking ``group`` first run on every rank of a gloo pool (``tests/cluster.py``).
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from common import Case, assert_close_to_oracle, make_qkv, oracle
from star_sp import SamplingConfig, StarConfig, StarInputError
from star_sp.config import MAX_COLLECTIVE_TIMEOUT_S

MERGE_CASE = Case(context_len=10, query_len=2, block_size=5, anchor_size=5)


# -- StarConfig.collective_timeout_s --------------------------------------------------------------------

@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, 0, MAX_COLLECTIVE_TIMEOUT_S * 1.5, 8e9, 1e14,
                                     "60", True])
def test_collective_timeout_must_be_a_positive_number_up_to_the_limit(timeout):
    """``inf`` used to pass, then ended in ``OverflowError`` from ``datetime.timedelta``; beyond about
    7.4e9 s (torch's deadline, the wall clock plus the timeout in int64 nanoseconds, overflows) gloo
    times out at once or waits for ever."""
    with pytest.raises(StarInputError) as got:
        StarConfig(block_size=8, collective_timeout_s=timeout)
    assert str(got.value) == ("collective_timeout_s must be a positive number of seconds, at most 1e+09 (about 31 "
                              f"years: torch's collective deadlines overflow beyond that), got {timeout!r}")


def test_the_timeout_limit_is_far_below_what_torch_can_take():
    """Torch's deadline is the wall clock plus the timeout in int64 nanoseconds since 1970: it overflows
    about 7.4e9 s from now. The limit stays below half of that (until the year 2116)."""
    overflow_s = (2 ** 63 - 1) / 1e9 - time.time()
    assert MAX_COLLECTIVE_TIMEOUT_S < overflow_s / 2
    assert datetime.timedelta(seconds=MAX_COLLECTIVE_TIMEOUT_S)  # and datetime takes it


def wait_with_the_longest_timeout(group) -> float:
    """An all-reduce waited for with the longest timeout ``StarConfig`` takes (``guard.wait``)."""
    from star_sp.distributed.guard import wait

    timeout = StarConfig(block_size=8, collective_timeout_s=MAX_COLLECTIVE_TIMEOUT_S).collective_timeout_s
    t = torch.ones(1)
    wait(dist.all_reduce(t, group=group, async_op=True), timeout, t)
    return float(t)


def test_the_longest_timeout_works_in_a_collective(cluster):
    assert cluster(2).run(wait_with_the_longest_timeout) == [2.0, 2.0]


# -- SamplingConfig ---------------------------------------------------------------------------------------

_SEED_RANGE = "an integer from -2**63 to 2**64 - 1 (what torch.Generator.manual_seed takes)"


@pytest.mark.parametrize("kw, message", [
    (dict(top_p="0.5"), "top_p must be a number in (0, 1], got '0.5'"),
    (dict(top_p=True), "top_p must be a number in (0, 1], got True"),
    (dict(top_p=float("nan")), "top_p must be a number in (0, 1], got nan"),
    (dict(top_p=0), "top_p must be a number in (0, 1], got 0"),
    (dict(temperature="1.0"), "temperature must be a finite number (> 0 when sampling), got '1.0'"),
    (dict(temperature=None, do_sample=True), "temperature must be a finite number (> 0 when sampling), got None"),
    (dict(temperature=float("inf"), do_sample=True),
     "temperature must be a finite number (> 0 when sampling), got inf"),
    (dict(temperature=0.0, do_sample=True), "temperature must be a finite number (> 0 when sampling), got 0.0"),
    (dict(top_k="3"), "top_k must be a non-negative integer (0 keeps every token), got '3'"),
    (dict(top_k=2.0), "top_k must be a non-negative integer (0 keeps every token), got 2.0"),
    (dict(seed="1"), f"seed must be {_SEED_RANGE}, got '1'"),
    (dict(seed=1.5), f"seed must be {_SEED_RANGE}, got 1.5"),
    (dict(seed=False), f"seed must be {_SEED_RANGE}, got False"),
    (dict(seed=2 ** 64), f"seed must be {_SEED_RANGE}, got {2 ** 64}"),
    (dict(seeds=("1", 2)), f"seeds must be a non-empty tuple of integers, each {_SEED_RANGE}, got ('1', 2)"),
    (dict(seeds=(-2 ** 63 - 1,)), (f"seeds must be a non-empty tuple of integers, each {_SEED_RANGE}, "
                                   f"got ({-2 ** 63 - 1},)")),
    (dict(seeds=()), f"seeds must be a non-empty tuple of integers, each {_SEED_RANGE}, got ()"),
])
def test_sampling_numbers_of_the_wrong_type_are_one_line(kw, message):
    with pytest.raises(StarInputError) as got:
        SamplingConfig(**kw)
    assert str(got.value) == message


@pytest.mark.parametrize("seed", [-2 ** 63, 0, 2 ** 64 - 1])
def test_the_seed_range_is_what_torch_takes(seed):
    """Both ends of the range give generators (torch's own check), beyond them torch refuses."""
    cfg = SamplingConfig(do_sample=True, temperature=1, top_p=1, seed=seed, seeds=(seed, 7))
    assert [g.initial_seed() for g in cfg.generators(2, "cpu")] == [seed % 2 ** 64, 7]
    for beyond in (-2 ** 63 - 1, 2 ** 64):
        with pytest.raises((ValueError, RuntimeError)):
            torch.Generator().manual_seed(beyond)


# -- phase 2's merge: agreed across the ranks ------------------------------------------------------------

def phase2_merge_on_one_rank(group, merge_on_rank_1: str) -> dict:
    """Rank 1 passes ``merge_on_rank_1``, the others ``"allreduce"``: the error every rank raises, then a
    good phase-2 call over the same group (it must still work) and the query rows of the oracle."""
    from star_sp.distributed import phase2_attention

    case = MERGE_CASE
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, g = make_qkv(case)
    lc, share = case.context_len, case.context_len // world
    last = rank == world - 1
    args = (q[:, :, lc:], k[:, :, rank * share:(rank + 1) * share], v[:, :, rank * share:(rank + 1) * share])
    kwargs = dict(group=group, query_k=k[:, :, lc:] if last else None, query_v=v[:, :, lc:] if last else None,
                  timeout_s=60)
    start = time.monotonic()
    try:
        phase2_attention(*args, **kwargs, merge=merge_on_rank_1 if rank == 1 else "allreduce")
        error = "no error"
    except Exception as exc:  # noqa: BLE001 - reported
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - start
    out, _ = phase2_attention(*args, **kwargs)
    return {"error": error, "seconds": seconds, "out": out, "want": oracle(case, q, k, v, g)[0][:, :, lc:]}


def test_a_bad_merge_on_one_rank_is_the_same_error_on_every_rank_at_once(cluster):
    """The check ran before the agreement: rank 1 raised alone while rank 0 went on into the agreement's
    collective, where it waits for rank 1 until the group's timeout (30 s in the pool; the pool's wait
    here is 10 s) or pairs with whatever collective rank 1 runs next."""
    results = cluster(2).run(phase2_merge_on_one_rank, "bogus", timeout_s=10)
    want = "StarInputError: merge must be one of ('allreduce', 'allgather'), got 'bogus' (rank(s) [1])"
    assert [r["error"] for r in results] == [want, want]
    for r in results:
        assert r["seconds"] < 5, r["seconds"]
        assert_close_to_oracle("phase 2 after the refusal", r["out"], r["want"], None, torch.float64)
