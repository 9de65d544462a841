"""LoRA through peft: a peft-wrapped transformers model trains under ``star_train_loss`` with the float64
oracle's gradients on its adapter weights (the base frozen), in one process and across two ranks.

The oracle: the same adapted model (a deep copy) in float64 once over ``[context ; target]`` under the
dense ``M_star`` mask (``model_oracle``); tolerance as in ``test_training.py`` (1e-9 relative: both sides
float64 with exact norms, differing in summation order only)."""

import copy

import pytest
import torch

import workers
from model_oracle import _mask
from star_sp.testing import build, exact_norms

peft = pytest.importorskip("peft", reason="peft is not installed (pip install star-sp[lora])")

RTOL = 1e-9
SPEC = dict(family="llama", lc=23, lt=5, block=5, anchor=3, batch=2, weight=0.6, anchor_source="broadcast",
            lora=True)


def _oracle(spec):
    import torch.nn.functional as F

    model = workers.lora_model(spec)
    ref = copy.deepcopy(model)
    ref.get_base_model().set_attn_implementation("sdpa")
    ctx, tgt, labels = workers.train_inputs(spec, ref.config.vocab_size)
    lc, lt = ctx.shape[1], tgt.shape[1]
    ids = torch.cat([ctx, tgt], dim=1)
    logits = ref(input_ids=ids, attention_mask=_mask(lc, spec["block"], spec["anchor"], lc + lt, ids.shape[0])).logits
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits[:, lc - 1: lc + lt - 1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n
    loss = loss + spec["weight"] * F.cross_entropy(logits[:, : lc - 1].flatten(0, 1), ctx[:, 1:].flatten(),
                                                   reduction="sum") / (ids.shape[0] * (lc - 1))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    return loss.detach(), dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("checkpointing", [None, "plain"])
def test_adapter_gradients_match_the_oracle(cluster, world_size, checkpointing):
    spec = {**SPEC, "checkpointing": checkpointing}
    results = [workers.train_step(None, spec)] if world_size == 1 else cluster(world_size).run(workers.train_step, spec)
    ref_loss, ref_grads = _oracle(spec)
    assert ref_grads and all("lora_" in n for n in ref_grads), sorted(ref_grads)
    for rank, r in enumerate(results):
        assert abs(r["loss"].item() - ref_loss.item()) <= RTOL * abs(ref_loss.item()), (rank, r["loss"], ref_loss)
        assert set(r["grads"]) == set(ref_grads), set(r["grads"]) ^ set(ref_grads)
        for name, ref in ref_grads.items():
            got = r["grads"][name]
            err = ((got - ref).norm() / ref.norm()).item()
            assert err <= RTOL, f"rank {rank}: {name} off by {err:.2e} relative"


def test_the_oracle_sees_the_adapters():
    """Not vacuous: the adapters change the loss (their B matrices start non-zero here)."""
    with_lora = _oracle(SPEC)[0]
    model, _ = build("llama", dtype=torch.float64)
    exact_norms(model)
    assert with_lora.item() != pytest.approx(_plain_loss(model, SPEC), rel=1e-6)


def _plain_loss(model, spec):
    import torch.nn.functional as F

    ctx, tgt, labels = workers.train_inputs(spec, model.config.vocab_size)
    lc, lt = ctx.shape[1], tgt.shape[1]
    ids = torch.cat([ctx, tgt], dim=1)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=_mask(lc, spec["block"], spec["anchor"], lc + lt, ids.shape[0])).logits
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits[:, lc - 1: lc + lt - 1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n
    return (loss + spec["weight"] * F.cross_entropy(logits[:, : lc - 1].flatten(0, 1), ctx[:, 1:].flatten(),
                                                    reduction="sum") / (ids.shape[0] * (lc - 1))).item()
