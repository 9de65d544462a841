"""Megatron-core test models and the float64 oracle for them (CPU, gloo; ``tests/test_megatron.py``).

The oracle is the same weights in float64 through Megatron's own layers, with the core attention
replaced by a plain dense softmax under the ``M_star`` mask (``ops.star_mask``) and RoPE from
Megatron's own frequency table for positions ``0 .. L-1`` (``RotaryEmbedding.get_freqs_non_repeated``;
its ``get_emb`` moves the table to CUDA, so it cannot run here). The Star model is built from the same
spec with ``star_layer_spec`` and loads the oracle's weights.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from star_sp.ops import star_mask

_MASK: list = [None]  # the dense oracle's keep-mask [L, L] for the current call


def init_megatron(group) -> None:
    """Megatron's parallel state over ``group`` as one context-parallel group (once per process)."""
    from megatron.core import parallel_state

    size = 1 if group is None else torch.distributed.get_world_size(group)
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_context_parallel_world_size() == size:
            return
        parallel_state.destroy_model_parallel()
    if not torch.distributed.is_initialized():
        raise RuntimeError("a process group is needed (tests run in gloo pools)")
    parallel_state.initialize_model_parallel(context_parallel_size=size)


class DenseMaskAttention(torch.nn.Module):
    """The oracle's core attention: softmax(q k^T * scale + mask) v in float64, GQA heads expanded."""

    def __init__(self, config, layer_number, attn_mask_type=None, attention_type="self", cp_comm_type=None,
                 softmax_scale=None, pg_collection=None, **_):
        super().__init__()
        self.scale = softmax_scale or config.kv_channels ** -0.5

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (t.permute(1, 2, 0, 3).double() for t in (query, key, value))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~_MASK[0].to(scores.device), float("-inf"))
        out = (scores.softmax(-1) @ v).to(query.dtype)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


class OracleRope(torch.nn.Module):
    """Positions ``0 .. L-1`` of the whole sequence (one process; Megatron asks for ``L x`` the config's
    context-parallel size)."""

    def __init__(self, inner, cp=1):
        super().__init__()
        self.inner, self.cp = inner, cp

    def forward(self, max_seq_len, offset=0, packed_seq=False, cp_group=None):
        f = self.inner.get_freqs_non_repeated(max_seq_len // self.cp, offset)
        return torch.cat((f, f), dim=-1)[:, None, None, :]

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.inner.get_rotary_seq_len(*args, **kwargs)


def tiny_config(dtype=torch.float64, layers=2, hidden=64, heads=4, groups=2, cp=1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                             ffn_hidden_size=2 * hidden, use_cpu_initialization=True, params_dtype=dtype,
                             normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                             add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                             masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                             context_parallel_size=cp)


def gpt(spec, config, vocab=61, positions=256):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=positions,
                    position_embedding_type="rope", rotary_base=10000)


def models(star_config, attention="star", seed=0, recompute=None, **shape):
    """``(oracle, star_model)``: the same weights; the oracle with the dense-mask attention. ``recompute``:
    Megatron's recomputation settings (``recompute_granularity`` ...) for the Star model alone."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from star_sp.integrations.megatron import star_layer_spec

    config = tiny_config(**shape)
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    torch.manual_seed(seed)
    oracle_spec = star_layer_spec(local, star_config)  # a deep copy; its slot is replaced below
    oracle_spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=DenseMaskAttention)
    oracle = gpt(oracle_spec, config).to(config.params_dtype)  # Megatron's torch norms are made in float32
    with torch.no_grad():  # non-trivial norm weights, so that their gradients mean something
        for name, p in oracle.named_parameters():
            if "layernorm" in name or "final_layernorm" in name:
                p.uniform_(0.5, 1.5)
    oracle.rotary_pos_emb = OracleRope(oracle.rotary_pos_emb, config.context_parallel_size)
    star_config_ = dataclasses.replace(config, **recompute) if recompute else config
    model = gpt(star_layer_spec(local, star_config, attention), star_config_).to(config.params_dtype)
    missing = model.load_state_dict(oracle.state_dict(), strict=False)
    assert not missing.missing_keys, missing
    return oracle, model


@contextlib.contextmanager
def mask(keep):
    _MASK[0] = keep
    try:
        yield
    finally:
        _MASK[0] = None


def oracle_logits(oracle, ids, lc, block, anchor):
    """Logits [B, L, V] of ``ids = [context ; rest]`` under ``M_star`` (block >= lc: causal)."""
    total = ids.shape[1]
    with mask(star_mask(lc, block, anchor, total - lc)):
        return oracle(ids, torch.arange(total)[None].expand(ids.shape[0], -1), None)


def oracle_train(oracle, ctx, tgt, labels, block, anchor, weight):
    ids = torch.cat([ctx, tgt], dim=1)
    lc, lt = ctx.shape[1], tgt.shape[1]
    logits = oracle_logits(oracle, ids, lc, block, anchor)
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits[:, lc - 1: lc + lt - 1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n.clamp_min(1)
    if weight:
        loss = loss + weight * F.cross_entropy(logits[:, : lc - 1].flatten(0, 1), ctx[:, 1:].flatten(),
                                               reduction="sum") / (ctx.shape[0] * (lc - 1))
    oracle.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in oracle.named_parameters()}


def inputs(spec, vocab=61):
    gen = torch.Generator().manual_seed(spec.get("seed", 3))
    ctx = torch.randint(0, vocab, (spec["batch"], spec["lc"]), generator=gen)
    tgt = torch.randint(0, vocab, (spec["batch"], spec["lt"]), generator=gen)
    labels = tgt.clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = -100
    labels[0, -1] = tgt[0, -1]
    return ctx, tgt, labels


def _star(spec):
    from star_sp import StarConfig

    return StarConfig(block_size=spec["block"], anchor_size=spec["anchor"],
                      anchor_source=spec.get("anchor_source", "broadcast"), collective_timeout_s=60)


def _oracle_sizes(spec):
    """The mask the method computes: star's blocks, or one block (global, ring: causal)."""
    if spec.get("attention", "star") == "star":
        return spec["block"], spec["anchor"]
    return spec["lc"], spec["lc"]


# -- workers (run on every rank of a gloo pool; ``group`` first) --------------------------------------

def train_step(group, spec):
    """``megatron_train_loss`` + backward + ``reduce_gradients`` against the oracle on every rank:
    returns the largest relative errors (loss, and per parameter the gradient's norm-wise error)."""
    from star_sp.training import reduce_gradients
    from star_sp.training.megatron_loss import megatron_train_loss

    from workers import offloads_counted

    from star_sp.integrations.megatron import StarCoreAttention

    init_megatron(group)
    oracle, model = models(_star(spec), spec.get("attention", "star"), recompute=spec.get("recompute"),
                           **spec.get("shape", {}))
    ctx, tgt, labels = inputs(spec)
    attention_calls = []  # one per StarCoreAttention call: the first forward's and the recomputations'
    attend = StarCoreAttention.forward

    def counted_attention(self, *args, **kwargs):
        attention_calls.append((self.layer, torch.is_grad_enabled()))
        return attend(self, *args, **kwargs)
    ref_loss, ref_grads = oracle_train(oracle, ctx, tgt, labels, *_oracle_sizes(spec), spec["weight"])
    head_rows = []  # the rows of every projection the output layer runs (its input is [rows, B, H])
    layer_class = type(model.output_layer)
    project = layer_class.forward

    def counted(self, hidden, *args, **kwargs):
        if self is model.output_layer:  # the class also serves the layers' linear projections
            head_rows.append(hidden.shape[0])
        return project(self, hidden, *args, **kwargs)
    layer_class.forward = counted  # the class's: star_sp's row selection calls the forward it finds
    StarCoreAttention.forward = counted_attention
    try:
        with offloads_counted() as offloaded:
            loss = megatron_train_loss(model, ctx, tgt, labels, _star(spec), group, context_loss_weight=spec["weight"],
                                       attention=spec.get("attention", "star"), loss_chunk_tokens=spec.get("chunk", 4096),
                                       offload_activations=spec.get("offload", False))
        loss.backward()
    finally:
        layer_class.forward = project
        StarCoreAttention.forward = attend
    reduce_gradients(model, group)
    errors = {}
    for name, p in model.named_parameters():
        ref = ref_grads[name]
        got = p.grad if p.grad is not None else torch.zeros_like(ref)
        errors[name] = float((got - ref).norm() / ref.norm().clamp_min(1e-300))
    loss = loss.detach()
    return {"loss_error": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), "grad_errors": errors,
            "head_rows": head_rows, "attention_calls": attention_calls, "offloaded": offloaded,
            "loss": float(loss)}


def generate(group, spec):
    """Prefill + greedy decode, and the oracle's greedy tokens under the same mask."""
    from star_sp.integrations.megatron import megatron_generate, megatron_prefill

    init_megatron(group)
    attention = spec.get("attention", "star")
    oracle, model = models(_star(spec), attention, **spec.get("shape", {}))
    ctx, query, _ = inputs(spec)
    if spec.get("questions"):  # one context (batch 1), several questions decoded together
        ctx, query = ctx[:1], torch.cat([query, query.flip(1)], dim=0)
    with torch.no_grad():
        context = megatron_prefill(model, ctx, _star(spec), group, attention=attention)
        tokens = megatron_generate(model, context, query, spec["new"])
        if spec.get("eos_at") is not None:  # the token greedy decoding gives at that step, as EOS
            eos = int(tokens[0, spec["eos_at"]])
            stopped = megatron_generate(model, context, query, spec["new"], eos_token_id=eos)
            return {"tokens": tokens, "stopped": stopped, "eos": eos}
        ids = torch.cat([ctx.expand(query.shape[0], -1), query], dim=1)
        for _ in range(spec["new"]):
            logits = oracle_logits(oracle, ids, ctx.shape[1], *_oracle_sizes(spec))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return {"tokens": tokens, "oracle": ids[:, ctx.shape[1] + query.shape[1]:]}


def one_block_against_stock(group):
    """Logits of a Star model with one block (causal attention) against Megatron's stock local spec
    (``DotProductAttention``, an explicit causal mask), the same weights: the relative error."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from star_sp import StarConfig
    from star_sp.runtime.kv_cache import ContextKV
    from star_sp.runtime.passes import PrefillPass, StarContext
    from star_sp.integrations.megatron import ForwardPlan, model_forward
    from star_sp.layout import BlockLayout

    class NoRng:  # DotProductAttention forks the CUDA RNG tracker around its (here zero) dropout
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: NoRng()
    import megatron.core.transformer.dot_product_attention as dpa

    dpa.tensor_parallel.get_cuda_rng_tracker = tensor_parallel.get_cuda_rng_tracker
    init_megatron(group)
    lc = 19
    star = StarConfig(block_size=32, anchor_size=32)
    oracle, model = models(star)
    stock = gpt(get_gpt_layer_local_spec(normalization="RMSNorm"), tiny_config()).double()
    stock.load_state_dict(oracle.state_dict(), strict=False)
    stock.rotary_pos_emb = OracleRope(stock.rotary_pos_emb)
    ids = torch.randint(0, 61, (2, lc), generator=torch.Generator().manual_seed(0))
    current = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # DotProductAttention's scratch buffer asks for the CUDA device
    try:
        with torch.no_grad():
            causal = torch.triu(torch.ones(1, 1, lc, lc, dtype=torch.bool), 1)  # True: masked
            want = stock(ids, torch.arange(lc)[None].expand(2, -1), causal)
    finally:
        torch.cuda.current_device = current
    with torch.no_grad():
        context = StarContext(BlockLayout.from_config(star, lc), star, 2, ContextKV(2))  # one block
        got = model_forward(model, ids, ForwardPlan(torch.arange(lc), lc, PrefillPass(context, 2)))
    return ((got - want).norm() / want.norm()).item()


def bad_train(group, spec, rank_with_error=None):
    """``megatron_train_loss`` with a bad argument (on one rank, or all): the error every rank raises."""
    from star_sp.training.megatron_loss import megatron_train_loss

    init_megatron(group)
    attention = spec.get("attention", "star")
    _, model = models(_star(spec), attention, recompute=spec.get("recompute"))
    ctx, tgt, labels = inputs(spec)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    weight = spec["weight"]
    if spec.get("bad_labels", True) and (rank_with_error is None or rank == rank_with_error):
        labels = labels.clone()
        labels[0, 0] = 10_000  # outside the vocabulary
    try:
        megatron_train_loss(model, ctx, tgt, labels, _star(spec), group, context_loss_weight=weight,
                            attention=attention, offload_activations=spec.get("offload", False))
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def own_loop(group, spec):
    """Megatron's own training loop: no star-sp step, the batch split by ``contiguous_share``, the loss
    Megatron-style over each rank's rows (next-token over the context alone). Returns the largest
    relative gradient error against the oracle (summed over the ranks by ``reduce_gradients``)."""
    from star_sp.integrations.megatron import contiguous_share, use_star_positions
    from star_sp.training import reduce_gradients

    init_megatron(group)
    oracle, model = models(_star(spec), cp=1 if group is None else torch.distributed.get_world_size(group))
    use_star_positions(model)
    ids = torch.randint(0, 61, (spec["batch"], spec["lc"]), generator=torch.Generator().manual_seed(5))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # token i predicts i + 1
    n = ids.shape[0] * (ids.shape[1] - 1)
    ref = F.cross_entropy(oracle_logits(oracle, ids, ids.shape[1], spec["block"], spec["anchor"]).flatten(0, 1),
                          labels.flatten(), ignore_index=-100, reduction="sum") / n
    ref.backward()
    local, local_labels = contiguous_share(ids, group), contiguous_share(labels, group)
    logits = model(local, None, None)
    loss = F.cross_entropy(logits.flatten(0, 1), local_labels.flatten(), ignore_index=-100, reduction="sum") / n
    loss.backward()
    reduce_gradients(model, group)
    grads = dict(oracle.named_parameters())
    return max(float((p.grad - grads[name].grad).norm() / grads[name].grad.norm()) for name, p in model.named_parameters())


def own_loop_refusals(group):
    """Megatron's own loop at CP > 1 with what it cannot run: every rank's error, for each case."""
    from star_sp import StarConfig
    from star_sp.integrations.megatron import contiguous_share, use_star_positions

    init_megatron(group)
    size = torch.distributed.get_world_size(group)
    ids = contiguous_share(torch.randint(0, 61, (1, 32), generator=torch.Generator().manual_seed(5)), group)
    errors = []
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for star, attention, positions, recompute in (
            (StarConfig(block_size=8, anchor_size=3), "star", False, None),
            (StarConfig(block_size=8, anchor_size=3), "ring", True, None),
            (StarConfig(block_size=8, anchor_size=3, anchor_source="recompute"), "star", True, None),
            (StarConfig(block_size=5, anchor_size=3), "star", True, None),
            (StarConfig(block_size=8, anchor_size=3), "star", True, full)):
        _, model = models(star, attention, cp=size, recompute=recompute)
        if positions:
            use_star_positions(model)
        else:  # Megatron's own RoPE (which needs CUDA here): a stand-in that is not StarRotary
            model.rotary_pos_emb = OracleRope(model.rotary_pos_emb, size)
        # Megatron's reentrant checkpoint reads CUDA's RNG state first; a CPU stand-in lets it reach Star's module
        rng = mock.patch("megatron.core.tensor_parallel.random._get_all_rng_states",
                         lambda: (torch.get_rng_state(), None, {})) if recompute else contextlib.nullcontext()
        try:
            with rng:
                model(ids, None, None)
            errors.append("no error")
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(str(exc))
    return errors
