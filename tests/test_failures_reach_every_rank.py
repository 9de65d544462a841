"""A failure on one rank outside Star's attention (an MLP, the LM head, a DeepSpeed engine's own work)
reaches every rank as the same error naming that rank, within the collective timeout: not an
unexplained timeout ("no rank reported an error"), and no rank returning as if nothing happened.

Each case runs in a fresh pool (``Cluster``), closed afterwards: a failure leaves a process group
that is not to be used again. The rank functions live in ``tests/failure_workers.py``.
"""

import failure_workers as fw
import pytest
from cluster import Cluster

TIMEOUT_S = 2.0  # StarConfig.collective_timeout_s
GROUP_TIMEOUT_S = 6.0  # the pool's process-group timeout: agreements and DeepSpeed's collectives
BOUND_S = 3 * GROUP_TIMEOUT_S  # every rank has raised by then (a hang would run to the pool's limit)


def _run(world_size: int, fn, spec: dict) -> list[dict]:
    pool = Cluster(world_size, timeout_s=GROUP_TIMEOUT_S)
    try:
        return pool.run(fn, spec, timeout_s=120)
    finally:
        pool.close(force=True)


def _check(results: list[dict], failed: int, named: "dict[int, int] | None" = None) -> None:
    """Every rank raised a ``StarCollectiveError`` about rank ``failed``'s "boom" in bounded time: that
    rank its own failure, the others "stopped because rank <failed> failed". ``named[r]``: the number
    rank ``r``'s error gives the failed rank (ranks are group ranks), ``failed`` where not given."""
    for rank, r in enumerate(results):
        assert r["error"] == "StarCollectiveError", (rank, r)
        message, who = r["message"], (named or {}).get(rank, failed)
        assert "boom" in message and "no rank reported an error" not in message, (rank, message)
        if rank == failed:
            assert f"rank {who} failed in step " in message, (rank, message)
        else:
            assert f"because rank {who} failed in step " in message, (rank, message)
        assert r["seconds"] < BOUND_S, (rank, r)


@pytest.mark.slow
@pytest.mark.parametrize("graphs, layer", [("off", 0), ("static", 1)])
def test_query_hosts_mlp_failing_in_a_decode_step_of_several_questions_reaches_every_rank(graphs, layer):
    """Plain decode steps (the several-questions QueryPass) and fixed-shape ones (DecodeStepPass); the
    first layer's MLP (the other rank then waits in the next layer's merge) and the last's (it waits
    in the token broadcast)."""
    results = _run(2, fw.questions_decode_mlp_fails, dict(timeout_s=TIMEOUT_S, graphs=graphs, layer=layer))
    _check(results, failed=1)
    assert "rank 1 failed in step 'generate': RuntimeError: boom" in results[1]["message"]


@pytest.mark.slow
def test_query_hosts_lm_head_failing_in_score_reaches_every_rank():
    """The LM head runs after the last collective of ``score``: without the call's closing agreement
    rank 0 would return its logits while rank 1 raised."""
    results = _run(2, fw.score_lm_head_fails, dict(timeout_s=TIMEOUT_S))
    _check(results, failed=1)
    assert results[0]["message"].startswith("rank 0: step 'score' stopped because rank 1 failed in step 'score': "
                                            "RuntimeError: boom"), results[0]["message"]


@pytest.mark.slow
def test_megatron_generate_mlp_failure_reaches_every_rank():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install star-sp[megatron])")
    results = _run(2, fw.megatron_decode_mlp_fails, dict(timeout_s=TIMEOUT_S))
    _check(results, failed=1)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["forward", "star", "backward"])
def test_deepspeed_stepper_failure_reaches_the_other_sequence_parallel_group(where):
    """Four ranks, sp 2 x dp 2, around a stand-in for the DeepSpeed engine (its collectives, not its
    C++ ops): rank 3 fails outside Star's steps in the forward or the backward, or inside one of Star's
    steps (guarded over its sequence-parallel group). Ranks 0 and 1 wait in a ZeRO collective over the
    whole world and must name rank 3; rank 2, its sequence-parallel peer, waits in a Star step (or in
    the world's collective) and names it by its group rank where it waits in its group."""
    results = _run(4, fw.deepspeed_stepper_fails, dict(timeout_s=TIMEOUT_S, sp=2, fails=[3, where]))
    if where == "backward":  # after the backward's Star step: rank 2 waits in the world's collective
        named = {}
    else:  # rank 2 waits in Star's step over its SP group, where rank 3 is group rank 1
        named = {2: 1}
        if where == "star":  # rank 3's own error is Star's step's, over its group (it is group rank 1 there)
            named[3] = 1
    _check(results, failed=3, named=named)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["query", "decode"])
def test_a_passes_local_attention_failing_reaches_every_rank_outside_an_engine_call(kind):
    """The passes guard their local attention with the merge (as ``phase2_attention`` does), for any
    adapter: the several-questions ``QueryPass`` and the ``DecodeStepPass`` run alone here."""
    results = _run(2, fw.pass_local_attention_fails, dict(timeout_s=TIMEOUT_S, kind=kind))
    _check(results, failed=1)
    step = "phase2" if kind == "query" else "decode"
    assert results[0]["message"].startswith(f"rank 0: step '{step}' stopped because rank 1 failed in step '{step}': "
                                            "RuntimeError: boom"), results[0]["message"]
