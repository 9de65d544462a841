"""Star Attention against its baselines, same model, same inputs, one process per GPU.

    torchrun --nproc_per_node 2 tools/bench.py --contexts 16k,32k,64k,128k --out runs/bench
    python tools/bench.py --contexts 32k,128k                      # one GPU: global and star (block-sparse)

Model: a Llama-3.1-8B-shaped model (``configs/models/llama-3.1-8b``) with random bf16 weights (timings
need no checkpoint). Methods (``--methods``):

- ``global``: the plain transformers model on one GPU (SDPA, its own dynamic KV cache, greedy decoding;
  every rank runs it alone); ``engine-global`` is the same attention through star-sp's engine (one
  block), to see the engine's own overhead (not in the default list);
- ``star``: ours, anchor KV broadcast once per layer, outputs merged by all-reduce, for each
  ``--blocks`` x ``--anchors`` setting (block ``1/N`` = the context split evenly over the hosts);
- ``star-paper``: the paper's form, anchor recomputed on every host and outputs and LSEs all-gathered;
- ``ring``: exact ring attention of this project (zigzag load balance, the same LSE merge);
- ``torch-cp``: PyTorch's context-parallel ring attention (``torch.distributed.tensor.experimental.
  context_parallel`` over SDPA; prefill only, as it has no decode path; CUDA only).

For each context length and method: one warm-up at a short context, then time to first token (prefill
plus the first generated token), decode milliseconds per token at that context, and peak memory per
GPU. ``--project 4,8`` adds a PROJECTION of phase 1 on that many hosts (ours and the paper's form):
the busiest host's work measured alone on this GPU plus the anchor broadcast measured across this
run's GPUs; it is labelled as a projection everywhere it is written. Results: ``OUT/bench.json`` (one record per row, with hardware, versions, date and command) and
``OUT/bench.md`` (a table). Rows that do not fit in memory are recorded as such and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from star_sp import BlockLayout, StarConfig, StarEngine, StarError  # noqa: E402
from star_sp.config import DECODE_GRAPHS  # noqa: E402
from star_sp.runtime.kv_cache import ContextKV  # noqa: E402
from star_sp.runtime.passes import PrefillPass, StarContext  # noqa: E402
from star_sp.ops import local_attention, phase1_parts  # noqa: E402
from star_sp.distributed.process_group import init_from_env  # noqa: E402
from star_sp.eval.runner import parse_length  # noqa: E402

COMPILE = {"off": (False,), "on": (True,), "both": (False, True)}
METHODS = ("global", "star", "star-paper", "ring", "torch-cp", "engine-global")
DEFAULT_METHODS = METHODS[:-1]


def parse_methods(p: argparse.ArgumentParser, text: str, known) -> list[str]:
    """``--methods`` as a list; an unknown one is the parser's error (exit code 2)."""
    methods = [m for m in text.split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(known)}")
    return methods


def fit_context(length: int, cfg, question_tokens: int, new_tokens: int) -> int:
    """``length``, shortened where needed so that the context, a question and its new tokens fit the
    model's ``max_position_embeddings`` (the engine refuses a request past them): 128K with 16 + 64
    tokens on Llama-3.1-8B (131072 positions) runs a context of 130992."""
    limit = getattr(cfg, "max_position_embeddings", None)
    return min(length, limit - question_tokens - new_tokens) if isinstance(limit, int) else length


def _size(spec: str, length: int, world: int, block: int | None = None) -> int:
    """``1/N`` (the hosts), ``1/k``, ``block``, ``block/k`` or tokens."""
    if spec == "1/N":
        return -(-length // world)
    if spec.startswith("1/"):
        return length // int(spec[2:])
    if spec == "block":
        return block
    if spec.startswith("block/"):
        return block // int(spec[6:])
    return parse_length(spec)


def _model(path: str, device, dtype, seed: int):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _heads(cfg) -> tuple[int, int, int]:
    """``(query heads, KV heads, head_dim)`` of a transformers config."""
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "num_key_value_heads", heads), getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def _ids(length: int, vocab: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (1, length), generator=gen).to(device)


def _reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_engine(model, method: str, block: int, anchor: int, context, query, decode: int, group, backend: str,
               warmup: int, decode_graphs: str = "auto", compile: bool = False):
    """TTFT, decode and memory of one engine method on this rank (``compile``: the model's element-wise
    work compiled; the compile time, spent in the warm-up, is reported apart as ``compile_s``)."""
    attention = {"engine-global": "global", "star": "star", "star-paper": "star", "ring": "ring"}[method]
    paper = method == "star-paper"
    cfg = StarConfig(block_size=block, anchor_size=anchor, backend=backend,
                     anchor_source="recompute" if paper else "broadcast",
                     phase2_merge="allgather" if paper else "allreduce", decode_graphs=decode_graphs, compile=compile)
    group = None if method == "engine-global" else group
    # warm-up (kernels, plans, allocator) at a short context, with blocks scaled to keep every host busy
    warm = context[:, : min(context.shape[1], warmup)]
    if warm.shape[1] < context.shape[1] and attention == "star":
        scale = warm.shape[1] / context.shape[1]
        small = max(1, int(block * scale))
        warm_cfg = replace(cfg, block_size=small, anchor_size=min(small, max(int(anchor > 0), int(anchor * scale))))
    else:
        warm_cfg = cfg
    warm_engine = StarEngine(model, warm_cfg, group, attention=attention)
    compile_s = 0.0
    warm_engine.prefill(warm)
    compile_s += warm_engine.stats.get("compile_s", 0.0)
    for steps in (2, 9):  # the plain query pass, then the decode step (a graph from 8 new tokens)
        warm_engine.generate(warm_engine.prefill(warm), query, steps)
        compile_s += warm_engine.stats.get("compile_s", 0.0)
    engine = StarEngine(model, cfg, group, attention=attention)
    device = engine.device
    _reset(device)
    ctx = engine.prefill(context)
    prefill = engine.stats["prefill_s"]
    engine.generate(ctx, query, decode + 1)
    stats = engine.stats
    ms = 1000 / stats["decode_tokens_per_s"] if decode else None
    return {"prefill_s": prefill, "first_token_s": stats["first_token_s"], "ttft_s": prefill + stats["first_token_s"],
            "decode_ms_per_token": ms, "peak_gb": _peak(device), "kv_tokens_here": ctx.kv.num_tokens,
            "decode_mode": stats["decode_mode"], "decode_setup_s": stats["decode_setup_s"], "compiled": compile,
            "compile_s": compile_s + stats.get("compile_s", 0.0) if compile else None}


def run_plain(model, context, query, decode: int, device, warmup: int):
    """The plain model: SDPA attention, transformers' dynamic cache, greedy decoding."""
    from star_sp import _compat

    _compat.set_attn_implementation(model, "sdpa")
    name = _compat.cache_kwarg(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def request(ctx, steps):
        sync()
        start = time.perf_counter()
        out = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        out = model(input_ids=query, use_cache=True, logits_to_keep=1, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        first = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return prefill, first - start - prefill, (time.perf_counter() - first) / max(1, steps)

    with torch.no_grad():
        request(context[:, : min(context.shape[1], warmup)], 2)
        _reset(device)
        prefill, first, per_token = request(context, decode)
    return {"prefill_s": prefill, "first_token_s": first, "ttft_s": prefill + first,
            "decode_ms_per_token": 1000 * per_token if decode else None, "peak_gb": _peak(device),
            "kv_tokens_here": context.shape[1]}


CAUSAL_SDPA = "star_sp_bench_causal_sdpa"


def _causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: causal SDPA over the whole sequence, mask ignored (the
    benchmark's inputs have no padding), KV heads repeated for GQA. ``(B, H, S, D)`` in, ``(B, S, H, D)`` out."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_causal_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)


def run_torch_cp(model, context, group, device, rotate: str, warmup: int):
    """PyTorch's context parallelism: prefill of the whole context, sequence sharded over the mesh
    (its load-balanced layout), the KV rotated by ``rotate`` ("alltoall": the ring; or "allgather")."""
    if device.type != "cuda":
        raise RuntimeError("torch-cp needs CUDA (PyTorch's context parallelism runs over CUDA SDPA kernels)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from star_sp import _compat

    # HF builds an explicit mask for the shards' non-contiguous positions (and the flash and cuDNN
    # kernels refuse masks): attend through plain causal SDPA instead, as context parallelism expects
    register_causal_sdpa()
    _compat.set_attn_implementation(model, CAUSAL_SDPA)
    world = dist.get_world_size(group) if group is not None else 1
    set_rotate_method(rotate)
    mesh = init_device_mesh("cuda", (world,))
    base = getattr(model, model.base_model_prefix)

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]

    def once(ids):
        ids = ids.clone()
        pos = torch.arange(ids.shape[1], device=device).unsqueeze(0)
        with sdpa_kernel(backends), torch.no_grad():
            with context_parallel(mesh, buffers=[ids, pos], buffer_seq_dims=[1, 1]):
                hidden = base(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
                model.lm_head(hidden[:, -1:])
        torch.cuda.synchronize(device)

    try:
        once(context[:, : min(context.shape[1], warmup)])
    except Exception as error:  # noqa: BLE001  (cuDNN refused inside CP on every rank alike: take flash)
        print(f"torch-cp with cuDNN attention failed ({error}); retrying with the flash backend", flush=True)
        backends = [SDPBackend.FLASH_ATTENTION]
        once(context[:, : min(context.shape[1], warmup)])
    _reset(device)
    dist.barrier(group)
    start = time.perf_counter()
    once(context)
    elapsed = time.perf_counter() - start
    return {"prefill_s": elapsed, "first_token_s": None, "ttft_s": elapsed, "decode_ms_per_token": None,
            "peak_gb": _peak(device), "kv_tokens_here": None, "rotate": rotate,
            "sdpa_backends": [b.name.lower() for b in backends]}


class _HostPass(PrefillPass):
    """One host's phase-1 work, run alone for the projection: its rows are ``[anchor ;] block`` (the
    anchor rows only in the paper's recompute form); in our form the anchor's KV arrives ready (here
    random tensors of its shape: the time does not depend on the values)."""

    def __init__(self, context, num_layers, anchor_rows: int, anchor_kv, backend: str):
        super().__init__(context, num_layers, check=False)
        self.anchor_rows, self.anchor_kv, self.backend = anchor_rows, anchor_kv, backend

    def update(self, k, v, layer, *args, **kwargs):
        return k, v

    def attend(self, layer, q, k, v, scale):
        block = [q.shape[2] - self.anchor_rows]
        if self.anchor_rows:
            parts = phase1_parts(k, v, block, has_block0=False, anchor_len=self.anchor_rows, anchor_rows=self.anchor_rows)
        else:
            ak, av = self.anchor_kv
            parts = phase1_parts(k, v, block, has_block0=False, anchor_len=ak.shape[2], anchor_k=ak, anchor_v=av)
        return local_attention(q, parts, scale=scale, backend=self.backend)[0]


def _timed(fn, device, repeats: int = 2) -> float:
    """The best of ``repeats`` timed calls after one warm-up; ``repeats=0``: one call, cold, no warm-up."""
    if repeats:
        fn()  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def project_phase1(model, length: int, hosts: int, anchor_spec: str, backend: str, group, device) -> list[dict]:
    """PROJECTION of phase 1 on ``hosts`` hosts: the busiest host's work measured alone on this GPU
    (block ``ceil(L/hosts)`` behind the anchor; ours: the anchor's KV received, paper: recomputed) plus,
    for ours, the anchor broadcast (one per layer) timed across this run's GPUs when there are two or
    more (assumed to cost the same on more hosts: NCCL pipelines a broadcast)."""
    cfg = model.config
    block = -(-length // hosts)
    anchor = _size(anchor_spec, length, hosts, block)
    _, kv_heads, head_dim = _heads(cfg)
    dtype = next(model.parameters()).dtype
    engine = StarEngine(model, StarConfig(block_size=block, anchor_size=anchor, backend=backend), attention="star")
    layout = BlockLayout(length, block, anchor, hosts, hosts - 1)
    context = StarContext(layout=layout, config=engine.config, batch_size=1, kv=ContextKV(engine.num_layers))
    ids = _ids(length, cfg.vocab_size, 0, device)
    own, own_pos = ids[:, length - block:], torch.arange(length - block, length)
    akv = (torch.randn(1, kv_heads, anchor, head_dim, dtype=dtype, device=device),) * 2
    from star_sp import _compat
    from star_sp.integrations.hf.attention import ATTENTION_NAME

    with torch.no_grad(), _compat.attn_implementation_set(model, ATTENTION_NAME):  # engine._forward needs it
        ours = _timed(lambda: engine._forward(_HostPass(context, engine.num_layers, 0, akv, backend), own, own_pos),
                      device)
        rows = torch.cat([ids[:, :anchor], own], dim=1)
        pos = torch.cat([torch.arange(anchor), own_pos])
        paper = _timed(lambda: engine._forward(_HostPass(context, engine.num_layers, anchor, None, backend), rows, pos),
                       device)
    bcast = None
    if group is not None and dist.get_world_size(group) > 1:
        buf = torch.zeros(2, 1, kv_heads, anchor, head_dim, dtype=dtype, device=device)
        src = dist.get_global_rank(group, 0)
        bcast = engine.num_layers * _timed(lambda: dist.broadcast(buf, src=src, group=group), device, repeats=5)
    common = {"context": length, "hosts": hosts, "block": block, "anchor": anchor, "anchor_spec": anchor_spec,
              "projected": True}
    return [{**common, "method": "star (projected)", "phase1_compute_s": ours, "anchor_broadcast_s": bcast,
             "phase1_s": ours + (bcast or 0.0)},
            {**common, "method": "star-paper (projected)", "phase1_compute_s": paper, "anchor_broadcast_s": None,
             "phase1_s": paper}]


def measure_rates(model, device, backend: str) -> dict:
    """The two ceilings the compute floor uses, measured here: a bf16 8192^3 matrix product, and our
    attention kernel (``backend``) on one 16K x 16K part of the model's heads, causal and full."""
    from star_sp.ops import attention_with_lse

    heads, kv, dim = _heads(model.config)
    dtype = next(model.parameters()).dtype
    n = 8192 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    rates = {"matmul_tflops": 2 * n**3 / _timed(lambda: a @ b, device, repeats=5) / 1e12}
    s = 16384 if device.type == "cuda" else 128
    q = torch.randn(1, heads, s, dim, dtype=dtype, device=device)
    k, v = (torch.randn(1, kv, s, dim, dtype=dtype, device=device) for _ in range(2))
    for causal in (True, False):
        pairs = s * (s + 1) / 2 if causal else s * s
        t = _timed(lambda: attention_with_lse(q, k, v, causal=causal, backend=backend), device, repeats=5)
        rates["attention_causal_tflops" if causal else "attention_full_tflops"] = 4 * heads * dim * pairs / t / 1e12
    return rates


def prefill_floor(cfg, method: str, length: int, hosts: int, block: int | None, anchor: int | None,
                  rates: dict) -> float:
    """Seconds of prefill at the measured rates on the busiest host: its linear layers (2 x parameters
    x rows, at the matmul rate) plus its attention (4 x heads x head_dim per (query, key) pair, causal
    and full pairs each at their measured rate). Star: each block after the first sees the anchor
    (full pairs) and itself (causal); the paper's form also recomputes the anchor's rows. Ring: an
    even share of the causal pairs. Global: all of them on one GPU."""
    heads, kv, dim = _heads(cfg)
    hidden = cfg.hidden_size
    linear = cfg.num_hidden_layers * (hidden * dim * (2 * heads + 2 * kv) + 3 * hidden * cfg.intermediate_size)
    tri = lambda n: n * (n + 1) / 2  # noqa: E731
    if method.endswith("global"):
        loads = [(length, tri(length), 0.0)]
    elif method == "ring":
        loads = [(length / hosts, tri(length) / hosts, 0.0)]
    else:
        layout = BlockLayout(length, block, anchor, hosts, 0)
        loads = []
        for rank in range(hosts):
            lens = [b - a for a, b in map(layout.block_range, layout.blocks_of(rank))]
            first = 0 in layout.blocks_of(rank)
            rows = sum(lens)
            causal = sum(tri(n) for n in lens)
            full = sum(min(anchor, length) * n for i, n in enumerate(lens) if i or not first)
            if method == "star-paper" and lens and not first and anchor:
                rows, causal = rows + anchor, causal + tri(anchor)
            loads.append((rows, causal, full))
    per_pair = 4 * heads * dim * cfg.num_hidden_layers
    return max(2 * linear * rows / (rates["matmul_tflops"] * 1e12)
               + per_pair * causal / (rates["attention_causal_tflops"] * 1e12)
               + per_pair * full / (rates["attention_full_tflops"] * 1e12) for rows, causal, full in loads)


def _provenance(device, argv) -> dict:
    import transformers

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join(["tools/bench.py", *argv])}


def calibrate(rows: list[dict], projected: list[dict], world: int) -> None:
    """Correct the projections by what this run measured. The projection leaves out the hosts' skew and
    the end-of-prefill synchronisation (on H200s it ran 1-6% low at 4 hosts). For each context, method
    and anchor setting, ``calibration`` = this run's measured phase 1 (``prefill_s`` with one block per
    host on its ``world`` hosts) / the projection for ``world`` hosts; every projection of that setting
    gets ``phase1_calibrated_s = phase1_s * calibration``. Without a matching measured row (one process,
    another block size, an error) the fields stay None. Rows are changed in place."""
    for p in projected:
        p.setdefault("calibration", None)
        p.setdefault("phase1_calibrated_s", None)
    if world < 2:
        return
    for p in projected:
        if "error" in p:
            continue
        method = p["method"].replace(" (projected)", "")
        own = [q for q in projected if "error" not in q and q["hosts"] == world and q["method"] == p["method"]
               and q["context"] == p["context"] and q["anchor_spec"] == p["anchor_spec"]]
        measured = [r for r in rows if "error" not in r and r["method"] == method and r["hosts"] == world
                    and r["context"] == p["context"] and r.get("anchor_spec") == p["anchor_spec"]
                    and r.get("block") == -(-p["context"] // world)]
        if own and measured:
            p["calibration"] = measured[0]["prefill_s"] / own[0]["phase1_s"]
            p["phase1_calibrated_s"] = p["phase1_s"] * p["calibration"]


def projection_table(rows: list[dict]) -> str:
    head = ("| context | method | hosts | block | anchor | phase-1 compute s (one host, measured) | "
            "anchor broadcast s (measured) | phase 1 s (PROJECTED) | calibration | phase 1 s (PROJECTED, calibrated) |")
    lines = [head, "|" + "---|" * 10]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['context']} | {r['method']} | {r['hosts']} | {r['block']} | {r['anchor']} | "
                     f"{fmt(r['phase1_compute_s'])} | {fmt(r['anchor_broadcast_s'])} | {fmt(r['phase1_s'])} | "
                     f"{fmt(r.get('calibration'))} | {fmt(r.get('phase1_calibrated_s'))} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| context | method | hosts | block | anchor | TTFT s | prefill s | prefill floor s | prefill / floor | "
            "decode ms/token | peak GB/GPU |")
    lines = [head, "|" + "---|" * 11]
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['method']} | {r['hosts']} | {r.get('block', '-')} | "
                         f"{r.get('anchor', '-')} | {r['error']} | | | | | |")
            continue
        method = r["method"] + (f" (compiled, {r['compile_s']:.0f} s)" if r.get("compiled") else "")
        lines.append(f"| {r['context']} | {method} | {r['hosts']} | {r.get('block', '-')} | {r.get('anchor', '-')} | "
                     f"{fmt(r['ttft_s'])} | {fmt(r['prefill_s'])} | {fmt(r.get('floor_s'))} | "
                     f"{fmt(r['prefill_s'] / r['floor_s'] if r.get('floor_s') else None)} | "
                     f"{fmt(r['decode_ms_per_token'], 1)}{' (graph)' if r.get('decode_mode') == 'graph' else ''} | "
                     f"{fmt(r['peak_gb'], 1)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/models/llama-3.1-8b", help="a model config directory")
    p.add_argument("--contexts", default="16k,32k,64k,128k")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--blocks", default="1/N", help="star block sizes: 1/N (one block per host), 1/k, or tokens")
    p.add_argument("--anchors", default="block/4,block", help="star anchor sizes: block, block/k, or tokens")
    p.add_argument("--query", type=int, default=16, help="query tokens")
    p.add_argument("--decode", type=int, default=32, help="tokens generated to time decoding")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=8192, help="tokens of the untimed warm-up request")
    p.add_argument("--decode-graphs", default="auto", choices=DECODE_GRAPHS,
                   help="the engine methods' StarConfig.decode_graphs (auto: a CUDA graph per request in one "
                        "process; the time to capture it is reported apart, as decode_setup_s)")
    p.add_argument("--compile", default="off", choices=tuple(COMPILE),
                   help="the engine methods with StarConfig(compile=True): off, on, or both side by side (the "
                        "compile time is reported apart, as compile_s)")
    p.add_argument("--project", default="", help="comma-separated host counts to project phase 1 for (e.g. 4,8)")
    p.add_argument("--cp-rotate", default="alltoall", choices=("alltoall", "allgather"),
                   help="how torch-cp passes the KV (alltoall: around the ring)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    methods = parse_methods(p, args.methods, METHODS)
    group, device, created = init_from_env(600.0)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    model = _model(args.model, device, getattr(torch, args.dtype), args.seed)
    rates = measure_rates(model, device, args.backend)
    if rank == 0:
        print(json.dumps({"rates": rates}), flush=True)
    rows: list[dict] = []
    projected: list[dict] = []
    lengths = []
    for asked in map(parse_length, args.contexts.split(",")):  # the query and its tokens must fit the positions
        lengths.append(fit_context(asked, model.config, args.query, args.decode + 1))
        if lengths[-1] != asked and rank == 0:
            print(f"context {asked} shortened to {lengths[-1]} tokens: with {args.query} query and {args.decode + 1} "
                  f"new tokens it fits the model's {model.config.max_position_embeddings} positions", flush=True)
    # torch-cp runs after every other method: a failure inside its context manager can leave SDPA patched
    jobs = [(n, [m for m in methods if m != "torch-cp"], True) for n in lengths]
    jobs += [(n, ["torch-cp"], False) for n in lengths if "torch-cp" in methods]
    for length, job_methods, project in jobs:
        context = _ids(length, model.config.vocab_size, args.seed, device)
        query = _ids(args.query, model.config.vocab_size, args.seed + 1, device)
        for method in job_methods:
            settings = [(length, length, None)]
            if method.startswith("star"):
                settings = [(b, _size(a, length, world, b), a)
                            for b in (_size(x, length, world) for x in args.blocks.split(",")) for a in args.anchors.split(",")]
            compiles = COMPILE[args.compile] if method not in ("global", "torch-cp") else (False,)
            for (block, anchor, anchor_spec), compiled in ((x, c) for x in settings for c in compiles):
                row = {"context": length, "method": method, "hosts": 1 if method.endswith("global") else world}
                if method.startswith("star"):
                    row.update(block=block, anchor=anchor, anchor_spec=anchor_spec)
                try:
                    if method == "torch-cp":
                        row.update(run_torch_cp(model, context, group, device, args.cp_rotate, args.warmup))
                    elif method == "global":
                        row.update(run_plain(model, context, query, args.decode, device, args.warmup))
                    else:
                        row.update(run_engine(model, method, block, anchor, context, query, args.decode, group,
                                              args.backend, args.warmup, args.decode_graphs, compiled))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                except (RuntimeError, StarError) as exc:
                    row["error"] = str(exc).splitlines()[0][:120]
                _reset(device)
                if group is not None:  # the slowest rank's times, every rank's peak memory, any rank's error
                    gathered = [None] * world
                    dist.all_gather_object(gathered, row, group=group)
                    errors = [g["error"] for g in gathered if "error" in g]
                    if errors:
                        row = {k: v for k, v in row.items() if k in ("context", "method", "hosts", "block", "anchor")}
                        row["error"] = errors[0]
                    else:
                        for key in ("prefill_s", "first_token_s", "ttft_s", "decode_ms_per_token", "peak_gb"):
                            values = [g[key] for g in gathered if g[key] is not None]
                            row[key] = max(values) if values else None
                        row["peak_gb_per_rank"] = [g["peak_gb"] for g in gathered]
                if "error" not in row:  # torch-cp does a ring's work
                    row["floor_s"] = prefill_floor(model.config, "ring" if method == "torch-cp" else method, length,
                                                   row["hosts"], row.get("block"), row.get("anchor"), rates)
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
        host_counts = [int(x) for x in args.project.split(",") if x and project]
        if host_counts and world > 1 and world not in host_counts:  # this run's own size: the calibration
            host_counts.insert(0, world)
        for hosts in host_counts:
            for anchor_spec in args.anchors.split(","):
                try:
                    projected += project_phase1(model, length, hosts, anchor_spec, args.backend, group, device)
                except torch.cuda.OutOfMemoryError:
                    projected.append({"context": length, "hosts": hosts, "method": "projection", "error": "out of memory"})
                _reset(device)
    calibrate(rows, projected, world)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        record = {"provenance": _provenance(device, argv), "world_size": world, "rates": rates, "rows": rows,
                  "projection": projected}
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(record, f, indent=1)
        prov = record["provenance"]
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(f"{table(rows)}\n\n{world} process(es) on {prov['device']}; torch {prov['torch']}, transformers "
                    f"{prov['transformers']}, CUDA {prov['cuda']}; {prov['date']}; `{prov['command']}`\n"
                    f"\nPrefill floor: the busiest host's linear and attention FLOPs at the rates measured in this run "
                    f"(TFLOP/s: matmul {rates['matmul_tflops']:.4g}, attention causal "
                    f"{rates['attention_causal_tflops']:.4g}, full {rates['attention_full_tflops']:.4g}).\n")
            if projected:
                f.write("\nPROJECTION (not a measurement of that many hosts): the busiest host's phase-1 work "
                        "measured alone on one GPU, plus the anchor broadcast measured across this run's GPUs; "
                        "calibrated: times the ratio of this run's measured phase 1 to its projection for this "
                        "run's own host count (same context, method and anchor setting).\n\n"
                        + projection_table([r for r in projected if "error" not in r]) + "\n")
        print(table(rows))
        if projected:
            print(projection_table([r for r in projected if "error" not in r]))
    if created:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
