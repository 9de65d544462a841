"""Review fixes in the Megatron-core adapter (CPU, gloo): more keys than queries (Megatron's KV-cached
inference) is refused instead of answered wrongly, a core-attention slot without a ``StarConfig`` is
refused, and ``use_star_positions(model)`` unlocks Megatron's own loop at context parallel size > 1 for
that model alone (a learned-absolute model included), with logits equal to the float64 oracle's.

The functions taking ``group`` first run on every rank of a gloo pool (``tests/cluster.py``).

Tolerance: as in ``tests/test_megatron.py``, both sides run in float64 and differ only in the order of
the attention's sums (about 1e-15 relative per step), so 1e-9 leaves six orders of magnitude for two
layers; a single attention call is held to ``common.assert_close_to_oracle``'s float64 bound.
"""

import pytest
import torch

megatron = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install star-sp[megatron])")

import megatron_common as mc  # noqa: E402
from common import assert_close_to_oracle  # noqa: E402

TOL = 1e-9
BLOCK, ANCHOR = 8, 3


def _star():
    from star_sp import StarConfig

    return StarConfig(block_size=BLOCK, anchor_size=ANCHOR, collective_timeout_s=60)


def _error(call) -> str:
    """What ``call()`` raised, as ``"Type: message"``, or ``"no error"``."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _qkv(rows: int, keys: int):
    """Float64 Megatron-layout ``query [rows, 1, 4, 16]`` and ``key, value [keys, 1, 2, 16]``."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, h, 16, generator=gen, dtype=torch.float64) for n, h in ((rows, 4), (keys, 2), (keys, 2)))


# -- A: more keys than query rows ---------------------------------------------------------------------

def test_more_keys_than_query_rows_is_refused_in_one_line():
    """One query row over 6 keys (what Megatron's KV-cached decoding passes) used to return ``v[0]``:
    the keys were cut to the query's length. Now refused, naming star-sp's inference entry points."""
    from star_sp import StarInputError
    from star_sp.integrations.megatron import StarCoreAttention

    module = StarCoreAttention(mc.tiny_config(), 1, star=_star())
    q, k, v = _qkv(1, 6)
    with pytest.raises(StarInputError) as got:
        module(q, k, v, None)
    message = str(got.value)
    assert "\n" not in message and "6 keys for 1 query rows" in message
    assert "megatron_prefill" in message and "megatron_generate" in message


def test_as_many_keys_as_query_rows_still_equals_the_oracle():
    """The check leaves the ordinary case alone: 12 context rows in blocks of 8 behind an anchor of 3
    (one process), against the float64 oracle under ``M_star``."""
    from star_sp.integrations.megatron import StarCoreAttention
    from star_sp.ops.reference import star_reference

    module = StarCoreAttention(mc.tiny_config(), 1, star=_star())
    q, k, v = _qkv(12, 12)
    got = module(q, k, v, None).view(12, 1, 4, 16).permute(1, 2, 0, 3)
    want, _ = star_reference(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), context_len=12, block_size=BLOCK,
                             anchor_size=ANCHOR)
    assert_close_to_oracle("context-only rows", got, want, None, torch.float64)


def kv_cached_inference(group) -> dict:
    """A GPT model under Megatron's own KV-cached inference (``StaticInferenceContext``): a prompt of 6
    tokens, then one decoding step, which passes the cached keys (1 query row, 7 keys)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from star_sp.integrations.megatron import StarCoreAttention, use_star_positions

    mc.init_megatron(group)
    _, model = mc.models(_star())
    use_star_positions(model)
    model.eval()
    shapes = []
    forward = StarCoreAttention.forward

    def spy(self, query, key, *args, **kwargs):
        shapes.append((query.shape[0], key.shape[0]))
        return forward(self, query, key, *args, **kwargs)

    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(1))
    context = StaticInferenceContext(1, 16)
    current = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # Megatron allocates its KV cache on the CUDA device
    StarCoreAttention.forward = spy
    try:
        with torch.no_grad():
            model(ids, torch.arange(6)[None], None, inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += 6
            decode = _error(lambda: model(ids[:, -1:], torch.tensor([[6]]), None, inference_context=context,
                                          runtime_gather_output=True))
    finally:
        StarCoreAttention.forward = forward
        torch.cuda.current_device = current
    return {"shapes": shapes, "decode": decode}


def test_megatrons_kv_cached_inference_is_refused(cluster):
    (result,) = cluster(1).run(kv_cached_inference)
    assert result["shapes"][:2] == [(6, 6), (6, 6)]  # the prompt: as many keys as rows, both layers
    assert result["shapes"][2] == (1, 7)  # the decoding step: the cached keys
    assert result["decode"].startswith("StarInputError: ") and "megatron_generate" in result["decode"], result


# -- C: a core-attention slot without a StarConfig ----------------------------------------------------

@pytest.mark.parametrize("star", [None, {"block_size": 8}])
def test_a_slot_without_a_star_config_is_refused(star):
    """It used to run with a silent ``StarConfig(4096, 4096)``."""
    from star_sp import StarInputError
    from star_sp.integrations.megatron import StarCoreAttention

    with pytest.raises(StarInputError, match=r"star_layer_spec\(spec, StarConfig\(") as got:
        StarCoreAttention(mc.tiny_config(), 1, star=star)
    assert "\n" not in str(got.value)


def test_a_spec_built_by_star_layer_spec_carries_its_config():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from star_sp.integrations.megatron import star_layer_spec

    spec = star_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), _star())
    slot = spec.submodules.self_attention.submodules.core_attention
    assert slot.module(mc.tiny_config(), 1, **slot.params).star == _star()


# -- B: use_star_positions belongs to the model it was called on ---------------------------------------

def _learned_absolute_models(cp: int):
    """``(oracle, star_model)`` with learned absolute position embeddings, the same weights; the oracle
    with ``megatron_common``'s dense-mask attention."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from star_sp.integrations.megatron import star_layer_spec

    config = mc.tiny_config(cp=cp)
    star_spec = star_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), _star())
    oracle_spec = star_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), _star())
    oracle_spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=mc.DenseMaskAttention)
    torch.manual_seed(0)
    oracle, model = (GPTModel(config=config, transformer_layer_spec=spec, vocab_size=61, max_sequence_length=64,
                              position_embedding_type="learned_absolute").double() for spec in (oracle_spec, star_spec))
    assert not model.load_state_dict(oracle.state_dict(), strict=False).missing_keys
    return oracle, model


def learned_absolute_own_loop(group) -> float:
    """Megatron's own loop (no star-sp plan) on a learned-absolute model after ``use_star_positions``: each
    rank's logits for its contiguous share of 32 tokens against the oracle's rows; the relative error."""
    from star_sp.integrations.megatron import contiguous_share, use_star_positions

    mc.init_megatron(group)
    oracle, model = _learned_absolute_models(torch.distributed.get_world_size(group))
    use_star_positions(model)
    ids = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        want = contiguous_share(mc.oracle_logits(oracle, ids, 32, BLOCK, ANCHOR), group)
        got = model(contiguous_share(ids, group), contiguous_share(positions, group), None)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("n", [1, 2])
def test_a_learned_absolute_model_runs_megatrons_own_loop_after_use_star_positions(cluster, n):
    """Refused at CP 2 before: the module looked for StarRotary having run, which a learned-absolute
    model never runs."""
    for error in cluster(n).run(learned_absolute_own_loop):
        assert error < TOL, error


def positions_do_not_leak(group) -> list[str]:
    """Model A calls ``use_star_positions`` and runs (Megatron's own loop, then a prefill under a plan);
    then models that did not call it run Megatron's own loop: a RoPE one (a stand-in for Megatron's
    zigzag RoPE, which needs CUDA here) and a learned-absolute one. What each of B and C raised."""
    from star_sp.integrations.megatron import contiguous_share, megatron_prefill, use_star_positions

    mc.init_megatron(group)
    size = torch.distributed.get_world_size(group)
    ids = torch.randint(0, 61, (1, 32), generator=torch.Generator().manual_seed(5))
    local = contiguous_share(ids, group)
    _, a = mc.models(_star(), cp=size)
    use_star_positions(a)
    _, b = mc.models(_star(), cp=size)
    b.rotary_pos_emb = mc.OracleRope(b.rotary_pos_emb, size)
    _, c = _learned_absolute_models(size)
    with torch.no_grad():
        a(local, None, None)
        megatron_prefill(a, ids, _star(), group)
        return [_error(lambda: b(local, None, None)),
                _error(lambda: c(local, contiguous_share(torch.arange(32)[None], group), None))]


def test_use_star_positions_on_one_model_does_not_unlock_another(cluster):
    """The state was a module global before: a model's prefill left it set, and another model's own loop
    then ran with Megatron's zigzag RoPE unrefused."""
    results = cluster(2).run(positions_do_not_leak)
    assert results[0] == results[1], results  # the same line on every rank
    for error in results[0]:
        assert error.startswith("StarInputError: ") and "needs use_star_positions(model)" in error, error
