"""One training step (forward + backward) under Star Attention against global attention, one GPU.

    python tools/bench_train.py --layers 4 --contexts 16k,32k,64k --out runs/bench-train

Model: the Llama-3.1-8B shape (``configs/models/llama-3.1-8b``) with ``--layers`` layers (what fits in
memory at the longest context) and random weights in ``--dtype`` (bf16). Step: a context of ``L``
tokens and a target of ``--target`` tokens after it, the loss on the target tokens (the context's own
next-token loss too with ``--context-loss-weight > 0``), then ``backward()``; gradients are dropped
between steps (no optimizer: the optimizer's cost is the same for every method).

- ``global``: the plain transformers model over ``[context ; target]`` (SDPA, causal), the same loss;
- ``star``: ``star_sp.training.star_train_loss`` in one process (phase 1 block-sparse, phase 2 over the
  whole context), for each ``--blocks`` x ``--anchors`` setting (``1/4``: block = L/4).

Each method runs once per ``--checkpointing`` choice: ``off``; ``on`` (transformers' non-reentrant
activation checkpointing of every layer); ``offload`` (that, with each checkpoint's input in pinned host
memory, ``runtime/offload.py``; ``--offload-layers N``: the first N layers' only, the rest on the GPU).
``--trainable q_proj,v_proj`` trains those parameters only (the rest frozen). Star's logits come
``--loss-chunk-tokens`` rows at a time.

Each row: the best of ``--repeats`` timed steps after one warm-up (``--repeats 0``: one step, cold, no
warm-up), the peak memory of the GPU, and the process's peak host memory (resident set) so far.
Rows that do not fit are recorded as out of memory and the run goes on. Writes ``OUT/bench_train.json``
(records with hardware, versions, date, command) and ``OUT/bench_train.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py: model, ids, timing and provenance helpers)

from star_sp import StarConfig  # noqa: E402
from star_sp.eval.runner import parse_length  # noqa: E402
from star_sp.training import star_train_loss  # noqa: E402


def _global_step(model, ctx, tgt, weight: float) -> None:
    ids = torch.cat([ctx, tgt], dim=1)
    lc, lt = ctx.shape[1], tgt.shape[1]
    if weight:  # every position's logits: positions lc-1 .. lc+lt-2 predict the target, 0 .. lc-2 the context
        logits = model(input_ids=ids, logits_to_keep=0).logits
        target_logits, context_logits = logits[:, lc - 1: lc + lt - 1], logits[:, : lc - 1]
    else:  # the last lt + 1 positions, lc-1 .. lc+lt-1; all but the last predict the target
        target_logits = model(input_ids=ids, logits_to_keep=lt + 1).logits[:, :lt]
    loss = F.cross_entropy(target_logits.float().flatten(0, 1), tgt.flatten())
    if weight:
        loss = loss + weight * F.cross_entropy(context_logits.float().flatten(0, 1), ctx[:, 1:].flatten())
    loss.backward()


def _star_step(model, ctx, tgt, config: StarConfig, weight: float, offload: bool | int, chunk: int,
               tiled: int) -> None:
    star_train_loss(model, ctx, tgt, tgt, config, context_loss_weight=weight, offload_activations=offload,
                    loss_chunk_tokens=chunk, tiled_mlp=tiled).backward()


def _checkpointing(model, choice: str, offload: bool | int):
    """Set the model's activation checkpointing for one ``--checkpointing`` choice; for the plain model's
    steps, the context that offloads (``_compat.recompute_with_attention`` with its own attention)."""
    import contextlib

    from star_sp import _compat
    from star_sp.runtime.offload import activation_offload

    if choice == "off":
        model.gradient_checkpointing_disable()
        return contextlib.nullcontext()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if choice == "offload":
        return _compat.recompute_with_attention(model, model.config._attn_implementation,
                                                offload=activation_offload(offload))
    return contextlib.nullcontext()


def _measure(step, model, device, repeats: int, profile: str | None = None, label: str = "") -> dict:
    def once():
        step()
        model.zero_grad(set_to_none=True)

    if profile:  # one extra step under the profiler: where the time goes, by operator
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        once()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profiler(activities=activities) as prof:
            once()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(profile, "a") as f:
            f.write(f"## {label}\n{prof.key_averages().table(sort_by=key, row_limit=20)}\n"
                    f"{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12)}\n")

    bench._reset(device)
    try:
        seconds = bench._timed(once, device, repeats=repeats)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        bench._reset(device)
        return {"status": "out of memory"}
    peak = bench._peak(device)
    from star_sp.runtime.offload import HOST_POOL

    return {"status": "ok", "step_s": round(seconds, 4), "peak_gb": None if peak is None else round(peak, 2),
            "cold": not repeats, "host_peak_gb": round(_host_peak_gb(), 2),
            "pinned_gb": round(HOST_POOL.registered_bytes / 2**30, 2)}


def _host_peak_gb() -> float:
    """The process's peak resident set so far, GiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def table(rows: list[dict]) -> str:
    lines = ["| context | batch | method | checkpointing | block | anchor | step s | tokens/s | vs global | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}  # the plain model's step at each context: checkpointed if measured so, else without
    for r in rows:
        if r["method"] == "global" and r.get("step_s") and (r["context"] not in base or r.get("checkpointing") == "on"):
            base[r["context"]] = r["step_s"]
    for r in rows:
        ok = r["status"] == "ok"
        ratio = f"{base[r['context']] / r['step_s']:.2f}x" if ok and base.get(r["context"]) else "-"
        rate = f"{r['tokens_per_step'] / r['step_s']:,.0f}" if ok else "-"
        lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r.get('checkpointing', 'off')} | "
                     f"{r.get('block', '-')} | {r.get('anchor', '-')} | {r['step_s'] if ok else r['status']} | {rate} | "
                     f"{ratio} | {r.get('peak_gb', '-')} |")
    return "\n".join(lines) + "\n"


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The flags of what a training-step benchmark times: batch, contexts, target, blocks, anchors, methods."""
    p.add_argument("--batch", type=int, default=1, help="sequences per step (each of the same length)")
    p.add_argument("--contexts", default="16k,32k,64k")
    p.add_argument("--target", type=int, default=256, help="target tokens after the context")
    p.add_argument("--blocks", default="1/4,1/8", help="block sizes: 1/k of the context, or a length")
    p.add_argument("--anchors", default="block,block/4")
    p.add_argument("--methods", default="global,star")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/models/llama-3.1-8b", help="model config directory")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (the 8B model has 32; 0: all)")
    add_step_args(p)
    p.add_argument("--context-loss-weight", type=float, default=0.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checkpointing", default="off", help="off, on, offload: comma-separated, each method with each")
    p.add_argument("--trainable", default="", help="substrings of the parameters that train (default: every one)")
    p.add_argument("--loss-chunk-tokens", type=int, default=4096)
    p.add_argument("--tiled-mlp", type=int, default=0, help="star: MLP rows per chunk (0: untiled)")
    p.add_argument("--offload-layers", type=int, default=0, help="offload: the first N layers' inputs only (0: all)")
    p.add_argument("--out", default="runs/bench-train")
    p.add_argument("--profile", action="store_true", help="also write OUT/profile.txt (one profiled step per row)")
    args = p.parse_args(argv)

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = transformers.AutoConfig.from_pretrained(args.model)
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype),
                                                              attn_implementation="sdpa")
    model.train()
    if args.trainable:
        for name, param in model.named_parameters():
            param.requires_grad_(any(s in name for s in args.trainable.split(",")))
    methods = args.methods.split(",")
    rows: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    profile = os.path.join(args.out, "profile.txt") if args.profile else None
    for spec in args.contexts.split(","):
        length = parse_length(spec)
        ctx = torch.cat([bench._ids(length, config.vocab_size, i, device) for i in range(args.batch)])
        tgt = torch.cat([bench._ids(args.target, config.vocab_size, 100 + i, device) for i in range(args.batch)])
        common = {"context": length, "target": args.target, "layers": config.num_hidden_layers, "dtype": args.dtype,
                  "batch": args.batch, "tokens_per_step": args.batch * (length + args.target),
                  "context_loss_weight": args.context_loss_weight}
        for choice in args.checkpointing.split(","):
            rows += _rows_at(model, ctx, tgt, methods, choice, {**common, "checkpointing": choice}, args, device,
                             profile)
    provenance = bench._provenance(device, argv)
    provenance["command"] = " ".join(["tools/bench_train.py", *argv])
    write_report(args.out, "bench_train", "One training step", provenance, rows)
    return 0


def _rows_at(model, ctx, tgt, methods, choice: str, common: dict, args, device, profile) -> list[dict]:
    """The rows of one context and one checkpointing choice: global, then each Star setting."""
    rows, length = [], common["context"]
    offload = (args.offload_layers or True) if choice == "offload" else False  # the losses' offload_activations
    if "global" in methods:
        with _checkpointing(model, choice, offload) as _:
            row = {**common, "method": "global", **_measure(
                lambda: _global_step(model, ctx, tgt, args.context_loss_weight), model, device, args.repeats,
                profile, f"global, context {length}, batch {args.batch}, checkpointing {choice}")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "star" in methods:
        _checkpointing(model, choice, offload)
        for block_spec in args.blocks.split(","):
            block = bench._size(block_spec, length, 1)
            for anchor_spec in args.anchors.split(","):
                anchor = bench._size(anchor_spec, length, 1, block)
                cfg = StarConfig(block_size=block, anchor_size=anchor)
                row = {**common, "method": "star", "block": block, "anchor": anchor, "block_spec": block_spec,
                       "tiled_mlp": args.tiled_mlp, "offload_layers": args.offload_layers,
                       "anchor_spec": anchor_spec, **_measure(
                           lambda: _star_step(model, ctx, tgt, cfg, args.context_loss_weight, offload,
                                              args.loss_chunk_tokens, args.tiled_mlp), model, device, args.repeats, profile,
                           f"star, context {length}, batch {args.batch}, block {block}, anchor {anchor}, "
                           f"checkpointing {choice}")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def write_report(out: str, name: str, title: str, provenance: dict, rows: list[dict]) -> None:
    """``OUT/NAME.json`` (provenance and rows) and ``OUT/NAME.md`` (a title, the provenance and the table),
    the latter printed too."""
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"provenance": provenance, "rows": rows}, f, indent=1)
    md = f"# {title}, {provenance['device']}\n\n{json.dumps(provenance)}\n\n" + table(rows)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
