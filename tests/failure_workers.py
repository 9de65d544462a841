"""Rank functions for ``tests/test_failures_reach_every_rank.py``: a failure on one rank outside Star's
attention (an MLP, the LM head, a DeepSpeed engine's own work) must reach every rank as the same error
naming that rank. Each returns what the rank raised: ``{"error": type name, "message", "seconds"}``,
or ``{"error": None}`` when the call returned."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def _outcome(call) -> dict:
    start = time.perf_counter()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start}
    return {"error": None, "seconds": time.perf_counter() - start}


def _fail_on_decode_rows(module, seq_dim: int) -> None:
    """``module.forward`` raises ``RuntimeError("boom")`` on one-token rows (a decode step), else runs.
    ``seq_dim``: the rows' dimension of its input (transformers ``[B, S, H]``: 1; Megatron ``[S, B, H]``: 0)."""
    real = module.forward

    def forward(hidden, *args, **kwargs):
        if hidden.shape[seq_dim] == 1:
            raise RuntimeError("boom")
        return real(hidden, *args, **kwargs)

    module.forward = forward


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def _engine(group, spec: dict):
    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build("llama", dtype=torch.float64)
    config = StarConfig(block_size=5, anchor_size=2, collective_timeout_s=spec["timeout_s"],
                        decode_graphs=spec.get("graphs", "auto"))
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    ctx = torch.randint(4, vocab, (1, 13), generator=gen)
    questions = [torch.randint(4, vocab, (3,), generator=gen), torch.randint(4, vocab, (5,), generator=gen)]
    return model, StarEngine(model, config, group), ctx, questions


def questions_decode_mlp_fails(group, spec: dict) -> dict:
    """Several questions over one context; after prefill the query host's MLP of layer ``spec['layer']``
    raises in the decode steps (not in the question rows' step)."""
    model, engine, ctx, questions = _engine(group, spec)
    context = engine.prefill(ctx)
    if dist.get_rank(group) == dist.get_world_size(group) - 1:
        _fail_on_decode_rows(model.model.layers[spec["layer"]].mlp, 1)
    return _outcome(lambda: engine.generate(context, questions, 4))


def score_lm_head_fails(group, spec: dict) -> dict:
    """Several questions scored over one context; after prefill the query host's LM head raises."""
    model, engine, ctx, questions = _engine(group, spec)
    context = engine.prefill(ctx)
    if dist.get_rank(group) == dist.get_world_size(group) - 1:
        model.lm_head.forward = _boom
    return _outcome(lambda: engine.score(context, questions))


def megatron_decode_mlp_fails(group, spec: dict) -> dict:
    """``megatron_generate`` whose last rank's first-layer MLP raises in the decode steps."""
    import megatron_common as mc

    from star_sp import StarConfig
    from star_sp.integrations.megatron import megatron_generate, megatron_prefill

    mc.init_megatron(group)
    config = StarConfig(block_size=8, anchor_size=3, collective_timeout_s=spec["timeout_s"])
    _, model = mc.models(config)
    ctx, query, _ = mc.inputs(dict(batch=1, lc=21, lt=3))
    with torch.no_grad():
        context = megatron_prefill(model, ctx, config, group)
    if dist.get_rank(group) == dist.get_world_size(group) - 1:
        _fail_on_decode_rows(model.decoder.layers[0].mlp, 0)
    return _outcome(lambda: megatron_generate(model, context, query, 4))


class _FakeDeepSpeed:
    """What ``DeepSpeedStepper.micro_step`` calls on a DeepSpeed engine, with the collectives that block:
    the forward and backward run Star's steps over the sequence-parallel group (guarded there, as
    ``star_train_loss`` does), the backward and ``step`` reduce over the whole world (ZeRO, unguarded,
    as DeepSpeed does). ``fails`` = (global rank, "forward" | "star" | "backward" | "step"): that rank
    raises ``RuntimeError("boom")`` there ("star": inside Star's guarded step)."""

    def __init__(self, groups, fails, timeout_s: float):
        self.groups, self.fails, self.timeout_s = groups, fails, timeout_s

    def _maybe_fail(self, where: str) -> None:
        if self.fails == (dist.get_rank(), where):
            raise RuntimeError("boom")

    def _star(self, name: str) -> None:
        from star_sp.distributed.guard import guarded_step, wait

        with guarded_step(name, self.groups.sp):
            self._maybe_fail("star")
            t = torch.ones(4)
            wait(dist.all_reduce(t, group=self.groups.sp, async_op=True), self.timeout_s, t)

    def _zero(self) -> None:
        t = torch.ones(4)
        dist.all_reduce(t, group=self.groups.world)  # DeepSpeed's own collective: the group's timeout

    def __call__(self, sample):
        self._maybe_fail("forward")
        self._star("phase2")
        return torch.tensor(1.0), {"loss": 1.0}

    def backward(self, loss) -> None:
        self._star("phase2 backward")
        self._maybe_fail("backward")
        self._zero()

    def step(self) -> None:
        self._maybe_fail("step")
        self._zero()

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return 1.0


def deepspeed_stepper_fails(group, spec: dict) -> dict:
    """One ``DeepSpeedStepper.micro_step`` over sp ``spec['sp']`` x dp groups, around the fake engine."""
    from star_sp.apps.jobs.groups import TrainGroups
    from star_sp.apps.jobs.steppers import DeepSpeedStepper

    groups = TrainGroups.create(group, spec["sp"], spec["timeout_s"])
    stepper = DeepSpeedStepper.__new__(DeepSpeedStepper)  # no deepspeed.initialize: the engine is the fake
    stepper.module, stepper.cfg, stepper.groups, stepper.stage = None, None, groups, 0
    stepper.engine = _FakeDeepSpeed(groups, tuple(spec["fails"]), spec["timeout_s"])
    stepper.names, stepper._stats = [], {}
    return _outcome(lambda: stepper.micro_step(None, boundary=True))


def pass_local_attention_fails(group, spec: dict) -> dict:
    """One layer of a ``QueryPass`` (several questions) or a ``DecodeStepPass`` run directly, outside any
    engine call, whose local attention (the context part over the questions) raises on the last rank."""
    from star_sp.runtime import passes

    model, engine, ctx, _ = _engine(group, spec)
    context = engine.prefill(ctx)
    rows = 3 if spec["kind"] == "query" else 1
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, rows, 12, generator=gen, dtype=torch.float64)  # two questions, 4 heads, head dim 12
    k, v = (torch.randn(2, 2, rows, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    kind = passes.QueryPass if spec["kind"] == "query" else passes.DecodeStepPass
    state = kind(context, model.config.num_hidden_layers, None, check=False)
    if dist.get_rank(group) == dist.get_world_size(group) - 1:
        passes.shared_context_attention = _boom
    return _outcome(lambda: state.attend(0, q, k, v, None))
