"""Functions that run on every rank of a test cluster (``tests/cluster.py``); each takes the group."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from common import Case, make_qkv, merge_inputs, plain_attention_lse
from star_sp import BlockLayout
from star_sp.distributed import phase1_attention, phase2_attention


def _from_rank0(group, tensors):
    """The ring-flash-attention test design: rank 0's inputs, broadcast to every rank."""
    for t in tensors:
        dist.broadcast(t, src=0, group=group)
    return tensors


def star_layer(group, case: Case, with_grad: bool = True) -> dict:
    """Phase 1 then phase 2 of one layer on this rank; returns outputs and gradients with the global
    row indices they belong to, for the test to assemble and compare with the oracle."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, g = _from_rank0(group, list(make_qkv(case)))
    layout = BlockLayout(case.context_len, case.block_size, case.anchor_size, world, rank)
    recompute = case.anchor_source == "recompute"
    start, end = layout.token_range
    rows = list(range(layout.anchor_rows(recompute))) + list(range(start, end))
    lc = case.context_len
    leaf = lambda t: t.to(case.dtype).clone().requires_grad_(with_grad)  # noqa: E731
    q1, k1, v1 = (leaf(t[:, :, rows]) for t in (q, k, v))
    out1, lse1 = phase1_attention(q1, k1, v1, layout, group=group, anchor_source=case.anchor_source,
                                  backend=case.backend)
    q2 = leaf(q[:, :, lc:])
    qk = qv = None
    if layout.is_query_host:
        qk, qv = leaf(k[:, :, lc:]), leaf(v[:, :, lc:])
    out2, lse2 = phase2_attention(q2, k1[:, :, len(rows) - (end - start):], v1[:, :, len(rows) - (end - start):],
                                  group=group, query_k=qk, query_v=qv, backend=case.backend, merge=case.merge)
    result = {"rows": rows, "anchor_rows": layout.anchor_rows(recompute), "out1": out1.detach(), "lse1": lse1.detach(), "out2": out2.detach(),
              "lse2": lse2.detach(), "query_host": layout.is_query_host}
    if with_grad:
        gd = g.to(case.dtype)
        skip = layout.anchor_rows(recompute)  # recomputed anchor rows' outputs are dropped, as in a model
        # phase 2's output is the same on every rank: the ranks' losses must add up to the loss, so its
        # term counts on the query host alone (every rank still runs its backward: weight 0 elsewhere)
        weight = 1.0 if layout.is_query_host else 0.0
        loss = (out1[:, :, skip:] * gd[:, :, start:end]).sum() + (out2 * gd[:, :, lc:]).sum() * weight
        loss.backward()
        result.update(dq1=q1.grad, dk1=k1.grad, dv1=v1.grad, dq2=q2.grad)
        if qk is not None:
            result.update(dkq=qk.grad, dvq=qv.grad)
    return result


def phase2_bad_query_kv(group, case: Case) -> None:
    """Every rank passes query KV: only the last rank may."""
    q, k, v, _ = make_qkv(case)
    lc = case.context_len
    phase2_attention(q[:, :, lc:], k[:, :, :0], v[:, :, :0], group=group, query_k=k[:, :, lc:], query_v=v[:, :, lc:])


def phase1_config_mismatch(group, case: Case) -> None:
    """Rank 1 builds its layout with another block size."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    block = case.block_size + (1 if rank == 1 else 0)
    layout = BlockLayout(case.context_len, block, case.anchor_size, world, rank)
    q, k, v, _ = make_qkv(case)
    s, e = layout.token_range
    phase1_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], layout, group=group)


def phase1_bad_shape_on_one_rank(group, case: Case) -> None:
    """The last rank passes one row too few."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    layout = BlockLayout(case.context_len, case.block_size, case.anchor_size, world, rank)
    q, k, v, _ = make_qkv(case)
    s, e = layout.token_range
    if rank == world - 1:
        e -= 1
    phase1_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], layout, group=group)


def phase2_dtype_mismatch(group, case: Case) -> None:
    """Rank 0 passes float32 while the others pass float64."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, _ = make_qkv(case)
    if rank == 0:
        q, k, v = q.float(), k.float(), v.float()
    lc = case.context_len
    last = rank == world - 1
    phase2_attention(q[:, :, lc:], k[:, :, :lc], v[:, :, :lc], group=group,
                     query_k=k[:, :, lc:] if last else None, query_v=v[:, :, lc:] if last else None)


def phase2_empty_query(group, case: Case) -> None:
    """Every rank passes a query of zero tokens."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, _ = make_qkv(case)
    last = rank == world - 1
    phase2_attention(q[:, :, :0], k, v, group=group, query_k=k[:, :, :0] if last else None,
                     query_v=v[:, :, :0] if last else None)


def engine_inputs(spec: dict, vocab: int):
    gen = torch.Generator().manual_seed(21)
    ctx = torch.randint(4, vocab, (spec["batch"], spec["lc"]), generator=gen)
    return ctx, torch.randint(4, vocab, (spec["batch"], spec["lq"]), generator=gen)


def engine_run(group, spec: dict) -> dict:
    """StarEngine on a tiny float64 model (the same weights on every rank, from the seed)."""
    from star_sp import SamplingConfig, StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build(spec["family"], dtype=torch.float64)
    paper = spec["anchor_source"] == "paper"  # the paper's form: anchor recomputed, outputs all-gathered
    engine = StarEngine(model, StarConfig(block_size=spec["block"], anchor_size=spec["anchor"],
                                          anchor_source="recompute" if paper else spec["anchor_source"],
                                          phase2_merge="allgather" if paper else "allreduce",
                                          collective_timeout_s=60, decode_graphs=spec.get("decode_graphs", "auto"),
                                          decode_kernel=spec.get("decode_kernel", "torch")),
                        group, attention=spec.get("attention", "star"))
    ctx, q = engine_inputs(spec, model.config.vocab_size)
    context = engine.prefill(ctx)
    sampling = SamplingConfig(do_sample=True, temperature=1.3, top_k=30, top_p=0.9, seed=5)
    with kernel_calls_counted() as kernel_calls:
        greedy = engine.generate(context, q, spec["steps"])
    return {"logits": engine.score(context, q), "greedy": greedy,
            "sampled": engine.generate(context, q, spec["steps"], sampling=sampling),
            "local_tokens": context.kv.num_tokens, "query_kv": engine._holds_query(context),
            "decode_mode": engine.stats["decode_mode"], "kernel_calls": kernel_calls[0]}


@contextlib.contextmanager
def kernel_calls_counted():
    """While inside, calls of ``ops.decode_kernel.split_kv_decode`` (the split-KV decode kernel) count."""
    from star_sp.ops import decode_kernel

    calls = [0]
    kernel = decode_kernel.split_kv_decode

    def counted(*args, **kwargs):
        calls[0] += 1
        return kernel(*args, **kwargs)
    decode_kernel.split_kv_decode = counted
    try:
        yield calls
    finally:
        decode_kernel.split_kv_decode = kernel


def cli(group, command: str, argv: list) -> tuple[int, str, str]:
    """``star-sp COMMAND`` on every rank of the pool; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from star_sp.apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([command, *argv])
    return code, out.getvalue(), err.getvalue()


def ring_layer(group, length: int, dtype: torch.dtype, lse_grad: bool, seed: int = 0) -> dict:
    """Exact ring attention of one layer on this rank's zigzag rows; returns them with their global
    row indices, the output, log-sum-exp and gradients of ``sum(out * g) [+ sum(lse * gl)]``."""
    from star_sp.distributed.ring import ring_attention
    from star_sp.layout import RingLayout

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    case = Case(context_len=length, query_len=0, block_size=length, anchor_size=0, seed=seed)
    q, k, v, g = _from_rank0(group, list(make_qkv(case)))
    gl = _from_rank0(group, [torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(seed + 1),
                                         dtype=torch.float64)])[0]
    layout = RingLayout(length, world, rank)
    rows = layout.positions().tolist()
    q1, k1, v1 = (layout.shard(t, 2).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(q1, k1, v1, layout, group=group)
    loss = (out * layout.shard(g, 2).to(dtype)).sum()
    if lse_grad:
        loss = loss + (lse * layout.shard(gl, 2)).sum()
    loss.backward()
    return {"rows": rows, "out": out.detach(), "lse": lse.detach(), "dq": q1.grad, "dk": k1.grad, "dv": v1.grad}


def allreduce_merge(group, dtype_name: str) -> dict:
    """``AllReduceMerge.merge`` of this rank's partial attention: the plain implementation in the dtype
    (``common.plain_attention_lse``) over this rank's span of ``common.merge_inputs``' keys."""
    from star_sp.distributed import AllReduceMerge

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, mask, spans = merge_inputs(world)
    s, e = spans[rank]
    out, lse = plain_attention_lse(q, k[:, :, s:e], v[:, :, s:e], mask[:, s:e], getattr(torch, dtype_name))
    merged, merged_lse = AllReduceMerge(group).merge(out, lse)
    return {"out": merged, "lse": merged_lse}


def tool_main(group, path: str, argv: list | None = None) -> tuple[int, str]:
    """``main(argv)`` of the script at ``path`` (``tools/*.py``) on every rank of the pool, which it joins as
    the already initialized default group (``init_from_env``); returns (exit code, stdout)."""
    import contextlib
    import importlib.util
    import io
    import os

    spec = importlib.util.spec_from_file_location("tool_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = module.main() if argv is None else module.main(argv)
    return code, out.getvalue()


class _BrokenTokenizer:
    """A tokenizer whose decoding fails: the stop-string check runs on the query host only."""

    def batch_decode(self, *args, **kwargs):
        raise RuntimeError("tokenizer broke while decoding")


def generate_with_failing_stop_check(group, timeout_s: float) -> dict:
    """``generate`` whose stop-string check raises on the query host; every rank must raise the same error
    promptly (well before ``collective_timeout_s``), not wait out the collective."""
    import time

    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=5, anchor_size=2, collective_timeout_s=timeout_s), group)
    ctx, q = engine_inputs(dict(batch=1, lc=12, lq=2), model.config.vocab_size)
    context = engine.prefill(ctx)
    start = time.perf_counter()
    try:
        engine.generate(context, q, 4, stop_strings=["zz"], tokenizer=_BrokenTokenizer())
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start}
    return {"error": None}


def train_inputs(spec: dict, vocab: int):
    """Context, target and labels (some -100) from a seed: the same on every rank."""
    gen = torch.Generator().manual_seed(spec.get("seed", 7))
    ctx = torch.randint(4, vocab, (spec["batch"], spec["lc"]), generator=gen)
    tgt = torch.randint(4, vocab, (spec["batch"], spec["lt"]), generator=gen)
    labels = tgt.clone()
    labels[torch.rand(labels.shape, generator=gen) < spec.get("ignore", 0.3)] = -100
    labels[0, -1] = tgt[0, -1]  # at least one labelled token
    if spec.get("ignore_all"):
        labels.fill_(-100)
    return ctx, tgt, labels


def trains(spec: dict, name: str) -> bool:
    """Whether parameter ``name`` trains in ``spec`` (``trainable``: substrings; default every one)."""
    return any(s in name for s in spec.get("trainable", [""]))


def lora_model(spec: dict):
    """The tiny float64 model with exact norms, wrapped by peft's LoRA on q_proj and v_proj (rank 4), its
    B matrices drawn non-zero from a seed so that the adapters change the output from the start."""
    from peft import LoraConfig, get_peft_model

    from star_sp.testing import build, exact_norms

    model, _ = build(spec["family"], dtype=torch.float64, **spec.get("model", {}))
    exact_norms(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def train_step(group, spec: dict) -> dict:
    """``star_train_loss`` + backward (or ``autograd.grad``) + ``reduce_gradients`` on a tiny float64
    model with exact norms; returns the loss and every parameter's summed gradient."""
    from star_sp import StarConfig
    from star_sp.testing import build, exact_norms
    from star_sp.training import reduce_gradients, star_train_loss

    if spec.get("lora"):  # peft freezes the base; the adapters train
        model = lora_model(spec)
    else:
        model, _ = build(spec["family"], dtype=torch.float64, **spec.get("model", {}))
        exact_norms(model)
        for name, p in model.named_parameters():
            p.requires_grad_(trains(spec, name))
    if spec.get("checkpointing"):  # transformers' non-reentrant activation checkpointing; "offload": inputs on CPU
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctx, tgt, labels = train_inputs(spec, model.config.vocab_size)
    cfg = StarConfig(block_size=spec["block"], anchor_size=spec["anchor"], anchor_source=spec["anchor_source"],
                     collective_timeout_s=spec.get("timeout", 60))
    offload = spec.get("offload", spec.get("checkpointing") == "offload")  # True (every layer) or the first n
    with offloads_counted() as offloaded:
        loss = star_train_loss(model, ctx, tgt, labels, cfg, group, context_loss_weight=spec["weight"],
                               offload_activations=offload, loss_chunk_tokens=spec.get("chunk", 4096),
                               tiled_mlp=spec.get("tiled_mlp", 0))
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.get("autograd_grad"):  # the gradients of the trainable parameters only, by autograd.grad
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
            p.grad = g
    else:
        loss.backward()
    reduce_gradients(model, group)
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
            "offloaded": offloaded}


@contextlib.contextmanager
def offloads_counted():
    """While inside, every saved tensor is offloaded however small (the tiny models' are all below the
    1 MiB floor); afterwards what this yields lists the checkpoints each offload hooked
    (``offloaded_checkpoints``) and the bytes it copied to the host."""
    from star_sp.runtime import offload

    found = {"checkpoints": [], "bytes": 0}
    seen = []
    enter = offload.ActivationOffload.for_checkpoint

    def counted(self, index):
        self.min_bytes = 0
        if self not in seen:
            seen.append(self)
        return enter(self, index)
    offload.ActivationOffload.for_checkpoint = counted
    try:
        yield found
    finally:
        offload.ActivationOffload.for_checkpoint = enter
        found["checkpoints"] = [i for o in seen for i in o.offloaded_checkpoints]  # what the offload itself did
        found["bytes"] = sum(o.offloaded_bytes for o in seen)


def train_step_failing(group, spec: dict) -> dict:
    """A training step whose backward raises on group rank ``spec["bad_rank"]`` (a hook on the last
    layer's MLP, which runs early in the backward pass); returns what each rank raised and when."""
    import time

    from star_sp import StarConfig
    from star_sp.testing import build
    from star_sp.training import guarded_backward, star_train_loss

    model, _ = build("llama", dtype=torch.float64)
    ctx, tgt, labels = train_inputs(spec, model.config.vocab_size)
    cfg = StarConfig(block_size=spec["block"], anchor_size=spec["anchor"], collective_timeout_s=spec["timeout"])
    if dist.get_rank(group) == spec["bad_rank"]:
        def fail(*args):
            raise RuntimeError("injected failure in a backward hook")
        model.model.layers[-1].mlp.down_proj.register_full_backward_hook(fail)
    loss = star_train_loss(model, ctx, tgt, labels, cfg, group, context_loss_weight=0.5)
    start = time.perf_counter()
    try:
        guarded_backward(loss, group)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": type(exc).__name__, "message": str(exc).splitlines()[0], "seconds": time.perf_counter() - start}
    return {"error": None}


def train_with_attention_dropout(group) -> str:
    """A model in training mode with attention dropout, on 3 ranks with idle ones: refused on every
    rank up front (an idle rank never calls the attention function that would notice)."""
    from star_sp import StarConfig
    from star_sp.testing import build
    from star_sp.training import star_train_loss

    model, _ = build("llama", dtype=torch.float64, attention_dropout=0.1)
    model.train()
    ctx, tgt, labels = train_inputs(dict(batch=1, lc=5, lt=2), model.config.vocab_size)
    try:
        star_train_loss(model, ctx, tgt, labels, StarConfig(block_size=8, collective_timeout_s=10), group)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def train_parts(group, spec: dict) -> dict:
    """``star_train_loss(..., return_parts=True)``: the loss and its two parts on this rank."""
    from star_sp import StarConfig
    from star_sp.testing import build, exact_norms
    from star_sp.training import star_train_loss

    model, _ = build(spec["family"], dtype=torch.float64)
    exact_norms(model)
    ctx, tgt, labels = train_inputs(spec, model.config.vocab_size)
    cfg = StarConfig(block_size=spec["block"], anchor_size=spec["anchor"], collective_timeout_s=60)
    loss, parts = star_train_loss(model, ctx, tgt, labels, cfg, group, context_loss_weight=spec["weight"],
                                  return_parts=True)
    return {"loss": loss.item(), "answer": parts["answer"].item(), "context": parts["context"].item()}


def questions_run(group, spec: dict) -> dict:
    """One context (batch 1) and several questions, ``(Q, Lq)`` (``lengths`` all equal) or a list of
    different lengths: the batched score, greedy tokens and sampled tokens (one seed per question), and
    each question asked alone (the same engine); every result per question, on a tiny float64 model."""
    from dataclasses import replace

    from star_sp import SamplingConfig, StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build(spec["family"], dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=spec["block"], anchor_size=spec["anchor"], collective_timeout_s=60,
                                          decode_graphs=spec.get("decode_graphs", "auto"),
                                          decode_kernel=spec.get("decode_kernel", "torch")),
                        group, attention=spec.get("attention", "star"))
    gen = torch.Generator().manual_seed(33)
    ctx = torch.randint(4, model.config.vocab_size, (1, spec["lc"]), generator=gen)
    questions = [torch.randint(4, model.config.vocab_size, (n,), generator=gen) for n in spec["lengths"]]
    asked = questions if spec.get("listed") else torch.stack(questions)  # a list, or one (Q, Lq) tensor
    context = engine.prefill(ctx)
    logits = engine.score(context, asked)
    sampling = SamplingConfig(do_sample=True, temperature=1.3, top_k=30, seeds=tuple(range(7, 7 + len(questions))))
    with kernel_calls_counted() as kernel_calls:
        greedy = engine.generate(context, asked, spec["steps"])
    return {"ctx": ctx, "questions": questions, "kernel_calls": kernel_calls[0],
            "logits": logits if spec.get("listed") else [logits[i:i + 1] for i in range(len(questions))],
            "greedy": greedy,
            "alone": [engine.generate(context, q[None], spec["steps"]) for q in questions],
            "sampled": engine.generate(context, asked, spec["steps"], sampling=sampling),
            "sampled_alone": [engine.generate(context, q[None], spec["steps"], sampling=replace(
                sampling, seeds=None, seed=7 + i)) for i, q in enumerate(questions)]}


def contexts_run(group, spec: dict) -> dict:
    """Several contexts of different lengths prefilled into one batch, one question each (of different
    lengths), decoded together; and each context and question alone (the same engine)."""
    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build(spec["family"], dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=spec["block"], anchor_size=spec["anchor"], collective_timeout_s=60,
                                          decode_graphs=spec.get("decode_graphs", "auto")),
                        group, attention=spec.get("attention", "star"))
    gen = torch.Generator().manual_seed(44)
    vocab = model.config.vocab_size
    contexts = [torch.randint(4, vocab, (n,), generator=gen) for n in spec["contexts"]]
    questions = [torch.randint(4, vocab, (n,), generator=gen) for n in spec["questions"]]
    batch = engine.prefill(contexts)
    alone = []
    for c, q in zip(contexts, questions):
        one = engine.prefill(c[None])
        alone.append(engine.generate(one, q[None], spec["steps"]))
    return {"contexts": contexts, "questions": questions, "greedy": engine.generate(batch, questions, spec["steps"]),
            "logits": engine.score(batch, questions), "alone": alone}


def compiled_run(group, spec: dict) -> dict:
    """A compiled engine (StarConfig.compile) on a tiny float64 model: prefill, score and greedy tokens of
    two requests of different lengths, the compile time of each, and whether the model was restored."""
    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build(spec["family"], dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=spec["block"], anchor_size=spec["anchor"], collective_timeout_s=120,
                                          decode_graphs="static", compile=spec["compile"]), group)
    gen = torch.Generator().manual_seed(55)
    out = []
    for lc, lq in spec["requests"]:
        ctx = torch.randint(4, model.config.vocab_size, (1, lc), generator=gen)
        q = torch.randint(4, model.config.vocab_size, (1, lq), generator=gen)
        context = engine.prefill(ctx)
        compile_s = engine.stats.get("compile_s", 0.0)
        logits = engine.score(context, q)
        tokens = engine.generate(context, q, spec["steps"])
        out.append({"ctx": ctx, "q": q, "logits": logits, "tokens": tokens,
                    "compile_s": compile_s + engine.stats.get("compile_s", 0.0)})
    return {"requests": out, "restored": all("forward" not in layer.__dict__ for layer in model.model.layers)}


def capture_agreement_run(group, spec: dict) -> dict:
    """Greedy generation with ``decode_graphs=spec['graphs']`` on a tiny float64 model. With
    ``spec['fails_on']`` set, the engine is made to capture (``_decode_mode`` says "graph") and the
    capture fails on that rank alone (elsewhere it "succeeds" as the uncaptured step, which CPU runs
    can execute); without it, nothing is patched. Returns tokens or the error, and the capture
    warnings seen."""
    import warnings

    from star_sp import StarConfig, StarEngine, StarError
    from star_sp.integrations.hf import engine as tf
    from star_sp.testing import build

    rank = dist.get_rank(group)
    real_step, real_mode = tf.DecodeStep, tf.StarEngine._decode_mode

    class OneRankFails(real_step):
        def __init__(self, engine, context, query_kv, batch, position, capture):
            if capture and rank == spec["fails_on"]:
                raise RuntimeError("capture refused here")
            super().__init__(engine, context, query_kv, batch, position, capture=False)

    if spec.get("fails_on") is not None:
        tf.DecodeStep = OneRankFails
        tf.StarEngine._decode_mode = lambda self, context, n: ("graph", None)
    try:
        model, _ = build("llama", dtype=torch.float64)
        gen = torch.Generator().manual_seed(8)
        ctx = torch.randint(4, model.config.vocab_size, (1, 37), generator=gen)
        q = torch.randint(4, model.config.vocab_size, (1, 3), generator=gen)
        engine = StarEngine(model, StarConfig(block_size=spec["block"], anchor_size=spec["anchor"],
                                              decode_graphs=spec["graphs"], collective_timeout_s=60), group)
        context = engine.prefill(ctx)
        tokens = error = None
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                tokens = engine.generate(context, q, spec["steps"])
            except StarError as exc:
                error = str(exc)
        return {"ctx": ctx, "q": q, "tokens": tokens, "error": error, "mode": engine.stats.get("decode_mode"),
                "warnings": [str(w.message) for w in seen if "capturing the decode step" in str(w.message)]}
    finally:
        tf.DecodeStep, tf.StarEngine._decode_mode = real_step, real_mode
