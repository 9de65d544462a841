"""``star_sp.training``: the training forward's loss and every parameter gradient, summed over 1-3 gloo
ranks, against the float64 oracle (the plain model under the dense ``M_star`` mask over
``[context ; target]``, ``model_oracle.oracle_train``).

Bugs these localize: a loss term counted on several ranks or on none (a wrong loss value), phase 2's
backward rule (weight gradients off by the number of ranks), the anchor's gradient not returned to
its owner (broadcast mode) or counted twice (recompute mode), idle ranks and ``autograd.grad`` hanging.

Tolerance: 1e-9 relative per parameter. Both sides run in float64 with RMSNorm in float64
(``testing.exact_norms``), so they differ only in summation order: measured 1e-15 to 1e-13.
"""

import pytest
import torch

import workers
from model_oracle import oracle_train
from star_sp import StarConfig, StarInputError
from star_sp.testing import build, exact_norms
from star_sp.training import star_train_loss

RTOL = 1e-9


def _assert_matches_oracle(results, spec):
    model, _ = build(spec["family"], dtype=torch.float64, **spec.get("model", {}))
    exact_norms(model)
    ctx, tgt, labels = workers.train_inputs(spec, model.config.vocab_size)
    ref_loss, ref_grads = oracle_train(model, ctx, tgt, labels, spec["block"], spec["anchor"], spec["weight"])
    for rank, r in enumerate(results):
        assert abs(r["loss"].item() - ref_loss.item()) <= RTOL * abs(ref_loss.item()), (rank, r["loss"], ref_loss)
        assert set(r["grads"]) == {n for n in ref_grads if workers.trains(spec, n)}
        for name in r["grads"]:
            got, ref = r["grads"][name], ref_grads[name]
            assert got is not None, f"rank {rank}: {name} has no gradient"
            err = ((got - ref).norm() / ref.norm()).item()
            assert err <= RTOL, f"rank {rank}: {name} off by {err:.2e} relative"


SPECS = [
    # family, Lc, Lt, block, anchor, batch: a short last block, a < b, GQA (the tiny models' 4 / 2 heads)
    dict(family="llama", lc=23, lt=5, block=5, anchor=3, batch=2),
    dict(family="qwen3", lc=17, lt=3, block=6, anchor=6, batch=1),
    dict(family="mistral", lc=19, lt=4, block=7, anchor=0, batch=2),  # no anchor
    dict(family="qwen2", lc=9, lt=2, block=8, anchor=2, batch=1),  # 2 blocks: idle ranks at N = 3
]


@pytest.mark.parametrize("weight", [0.0, 0.6])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["family"])
def test_one_process_gradients_match_oracle(spec, weight):
    spec = {**spec, "weight": weight, "anchor_source": "broadcast"}
    _assert_matches_oracle([workers.train_step(None, spec)], spec)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("anchor_source", ["broadcast", "recompute"])
@pytest.mark.parametrize("weight", [0.0, 0.6])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["family"])
def test_gradients_across_ranks_match_oracle(cluster, world_size, anchor_source, weight, spec):
    spec = {**spec, "weight": weight, "anchor_source": anchor_source}
    _assert_matches_oracle(cluster(world_size).run(workers.train_step, spec), spec)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, lc, block", [(3, 4, 8), (3, 7, 3)])
def test_more_hosts_than_blocks_and_autograd_grad(cluster, world_size, lc, block):
    """One block on three hosts (two idle), and ``torch.autograd.grad`` instead of ``backward``."""
    spec = dict(family="llama", lc=lc, lt=3, block=block, anchor=2, batch=2, weight=0.5, anchor_source="broadcast",
                autograd_grad=True)
    _assert_matches_oracle(cluster(world_size).run(workers.train_step, spec), spec)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, change", [
    (2, dict(trainable=["q_proj", "v_proj"])),  # LoRA's usual choice: K frozen, V trains
    (3, dict(trainable=["q_proj", "v_proj"], lc=7, block=3)),  # ... with an idle rank
    (3, dict(trainable=["layers.1", "lm_head"], lc=7, block=3)),  # embeddings and layer 0 frozen, idle rank
    (3, dict(trainable=["layers.0.self_attn.v_proj"], lc=7, block=3, autograd_grad=True)),  # grad of one weight
    (2, dict(lt=1, anchor_source="recompute")),  # one target token: only the last context row predicts
    (3, dict(lt=1, lc=7, block=3)),
    (3, dict(ignore_all=True, weight=0.5, lc=7, block=3)),  # no label: the context loss alone
], ids=str)
def test_frozen_parameters_one_target_token_and_no_labels(cluster, world_size, change):
    """Parameter subsets (frozen layers, LoRA-like Q/V), ``autograd.grad`` of one weight, a one-token
    target and all labels ignored, with idle ranks: every rank runs the same collectives in backward
    (none hangs) and the trained parameters' gradients match the oracle."""
    spec = dict(family="llama", lc=13, lt=3, block=4, anchor=2, batch=2, weight=0.0, anchor_source="broadcast",
                timeout=20) | change
    _assert_matches_oracle(cluster(world_size).run(workers.train_step, spec), spec)


def test_bad_training_inputs_are_refused():
    model, _ = build("llama", dtype=torch.float64)
    cfg = StarConfig(block_size=4)
    ctx, tgt = torch.randint(4, 50, (1, 9)), torch.randint(4, 50, (1, 3))
    cases = [
        (dict(labels=torch.full((1, 3), -100)), "nothing to learn from"),
        (dict(labels=tgt[:, :2]), "labels must be a LongTensor of target_ids' shape (1, 3)"),
        (dict(labels=torch.tensor([[5, 6, 10_000]])), "labels hold token id 10000, outside the model's vocabulary"),
        (dict(target_ids=torch.randint(4, 50, (2, 3)), labels=torch.randint(4, 50, (2, 3))),
         "context_ids has batch 1 but target_ids has batch 2"),
        (dict(context_loss_weight=-1.0), "context_loss_weight must be a finite number >= 0"),
    ]
    for change, words in cases:
        args = dict(context_ids=ctx, target_ids=tgt, labels=tgt, context_loss_weight=0.0) | change
        with pytest.raises(StarInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
            star_train_loss(model, args["context_ids"], args["target_ids"], args["labels"], cfg,
                            context_loss_weight=args["context_loss_weight"])
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(StarInputError, match=r"takes non-reentrant activation checkpointing only .* enable it with "
                                             r"model.gradient_checkpointing_enable\(gradient_checkpointing_kwargs="):
        star_train_loss(model, ctx, tgt, tgt, cfg)


# Activation checkpointing: each layer recomputed in the backward pass without collectives (runtime/passes.py).
# The same oracle and tolerance as without it: recomputation repeats the same float64 operations.
CHECKPOINTED = [SPECS[0], SPECS[3]]  # a < b, a short last block; two blocks (idle ranks at N = 3)


@pytest.mark.parametrize("checkpointing", ["plain", "offload"])
@pytest.mark.parametrize("spec", CHECKPOINTED, ids=lambda s: s["family"])
def test_one_process_gradients_with_activation_checkpointing_match_oracle(spec, checkpointing):
    spec = {**spec, "weight": 0.6, "anchor_source": "broadcast", "checkpointing": checkpointing}
    result = workers.train_step(None, spec)
    _assert_matches_oracle([result], spec)
    if checkpointing == "offload":  # every layer's checkpoint went through host memory
        assert result["offloaded"]["checkpoints"] == [0, 1] and result["offloaded"]["bytes"] > 0, result["offloaded"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_offloading_the_first_layers_only_keeps_the_oracle_gradients(cluster, world_size):
    """``offload_activations=1``: the first layer's checkpoint waits in host memory, the second's on the
    device; across ranks too (each rank offloads alone, no collective involved)."""
    spec = {**CHECKPOINTED[0], "weight": 0.6, "anchor_source": "broadcast", "checkpointing": "plain", "offload": 1}
    results = cluster(world_size).run(workers.train_step, spec)
    _assert_matches_oracle(results, spec)
    for r in results:
        assert r["offloaded"]["checkpoints"] == [0] and r["offloaded"]["bytes"] > 0, r["offloaded"]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("anchor_source", ["broadcast", "recompute"])
@pytest.mark.parametrize("spec", CHECKPOINTED, ids=lambda s: s["family"])
def test_gradients_across_ranks_with_activation_checkpointing_match_oracle(cluster, world_size, anchor_source, spec):
    spec = {**spec, "weight": 0.6, "anchor_source": anchor_source, "checkpointing": "plain"}
    _assert_matches_oracle(cluster(world_size).run(workers.train_step, spec), spec)


@pytest.mark.slow
def test_a_rank_failing_mid_backward_stops_every_rank_with_its_error():
    """Rank 1 raises in its backward pass; the others wait in phase 2's backward all-reduce and, by the
    collective timeout, raise the same error naming rank 1 and its message. A fresh pool: the group is
    not to be used after a failure."""
    from cluster import Cluster

    timeout_s = 5.0
    spec = dict(family="llama", lc=13, lt=3, block=4, anchor=2, batch=1, bad_rank=1, timeout=timeout_s)
    pool = Cluster(3)
    try:
        results = pool.run(workers.train_step_failing, spec, timeout_s=60)
    finally:
        pool.close(force=True)
    for rank, r in enumerate(results):
        assert r["error"] == "StarCollectiveError", (rank, r)
        assert "rank 1" in r["message"] and "RuntimeError: injected failure in a backward hook" in r["message"], r
        assert r["seconds"] < timeout_s + 10, r  # by the collective's timeout, not the pool's


@pytest.mark.slow
def test_attention_dropout_is_refused_on_every_rank(cluster):
    for message in cluster(3).run(workers.train_with_attention_dropout, timeout_s=30):
        assert message == ("StarInputError: the model is in training mode with attention_dropout=0.1, which Star "
                           "Attention does not apply; set model.config.attention_dropout = 0.0 (or call model.eval() "
                           "for inference)"), message


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])
def test_loss_parts_match_oracle(cluster, world_size):
    """``return_parts``: the answer part and the context's mean loss, the same on every rank, equal the
    oracle's (its loss with weight 0, and the difference that weight 1 makes)."""
    spec = dict(family="qwen3", lc=11, lt=4, block=3, anchor=2, batch=2, weight=0.25, anchor_source="broadcast")
    results = [workers.train_parts(None, spec)] if world_size == 1 else cluster(world_size).run(workers.train_parts, spec)
    model, _ = build("qwen3", dtype=torch.float64)
    exact_norms(model)
    ctx, tgt, labels = workers.train_inputs(spec, model.config.vocab_size)
    answer = oracle_train(model, ctx, tgt, labels, 3, 2, 0.0)[0].item()
    context = oracle_train(model, ctx, tgt, labels, 3, 2, 1.0)[0].item() - answer
    for r in results:
        assert abs(r["answer"] - answer) <= RTOL * answer and abs(r["context"] - context) <= RTOL * context, r
        assert abs(r["loss"] - (answer + 0.25 * context)) <= RTOL * r["loss"], r


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1]], ids=lambda s: s["family"])
def test_logits_come_a_chunk_at_a_time_and_the_gradients_match_oracle(cluster, world_size, spec):
    """``loss_chunk_tokens=3``: the head never sees more than 3 rows of a sequence at once (forward and
    the backward's recomputation), with the context loss on (every context row's logits are read)."""
    spec = {**spec, "weight": 0.6, "anchor_source": "broadcast", "chunk": 3}
    if world_size == 1:
        rows = []  # the rows of every call of a module that outputs vocabulary logits (the head)

        def count(module, args, out):
            if isinstance(module, torch.nn.Linear) and module.out_features == module_vocab:
                rows.append(args[0].shape[1])
        module_vocab = build(spec["family"], dtype=torch.float64)[0].config.vocab_size
        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            results = [workers.train_step(None, spec)]
        finally:
            handle.remove()
        assert rows and max(rows) <= 3, rows
    else:
        results = cluster(world_size).run(workers.train_step, spec)
    _assert_matches_oracle(results, spec)


def _mlp_rows(spec):
    """Run ``train_step`` in one process, counting the rows of every call of a projection into the MLP's
    intermediate (the tiny models' only Linear layers with ``intermediate_size`` outputs)."""
    rows = []
    width = build(spec["family"], dtype=torch.float64)[0].config.intermediate_size

    def count(module, args, out):
        if isinstance(module, torch.nn.Linear) and module.out_features == width:
            rows.append(args[0].shape[1])
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        result = workers.train_step(None, spec)
    finally:
        handle.remove()
    return result, rows


@pytest.mark.parametrize("checkpointing", [None, "plain"])
def test_tiled_mlp_runs_a_chunk_at_a_time_and_the_gradients_match_oracle(cluster, checkpointing):
    """``tiled_mlp=4``: every MLP call (forward and the backward's recomputations) sees at most 4 rows,
    with or without activation checkpointing; one process and two ranks, against the oracle."""
    spec = {**SPECS[0], "weight": 0.6, "anchor_source": "broadcast", "tiled_mlp": 4, "chunk": 3,
            "checkpointing": checkpointing}
    result, rows = _mlp_rows(spec)
    assert rows and max(rows) <= 4, rows
    _assert_matches_oracle([result], spec)
    _assert_matches_oracle(cluster(2).run(workers.train_step, spec), spec)
