"""One training step (forward + backward) of a Megatron-core GPT model under Star Attention against
global attention through the same module, one GPU.

    python tools/bench_megatron.py --layers 4 --contexts 16k,32k,64k --out runs/bench-megatron
    python tools/bench_megatron.py --device cpu --dtype float32 --shape tiny --contexts 128 --target 16

Model: a Megatron ``GPTModel`` of the Llama-3.1-8B shape (hidden 4096, 32 heads in 8 query groups,
FFN 14336 SwiGLU, RMSNorm eps 1e-5, no biases, RoPE base 500000 with Llama 3.1's frequency scaling,
vocabulary 128256, untied output layer) with ``--layers`` layers and random weights in ``--dtype``
(bf16), built from Megatron's local layer spec (``get_gpt_layer_local_spec``, no TransformerEngine)
with ``StarCoreAttention`` in its core-attention slot (``star_layer_spec``). ``--shape tiny``: hidden
64, 4 heads in 2 groups, for a CPU smoke run. Megatron's parallel state needs a process group even
for one process: the launcher's, or a one-process group of this tool's own (nccl on CUDA, gloo on CPU).

Step: ``megatron_train_loss(model, context [B, L], target [B, T], labels = target, config)`` then
``backward()``; gradients are dropped between steps (no optimizer: its cost is the same for every
method). Both methods run the same model and the same module:

- ``global``: ``attention="global"``, one block over the context: exact causal attention through
  Star's own kernels (flash / cuDNN), not the local spec's materialised softmax;
- ``star``: ``attention="star"`` for each ``--blocks`` x ``--anchors`` setting (``1/4``: block = L/4,
  ``block/4``: anchor = block / 4).

Each row: the best of ``--repeats`` timed steps after one warm-up step, and the peak GPU memory of the
row (reset per row). Rows that do not fit are recorded as out of memory and the run goes on. Writes
``OUT/bench_megatron.json`` (rows with hardware, versions, date, command) and ``OUT/bench_megatron.md``.
The timing, the table and the provenance are ``tools/bench_train.py``'s and ``tools/bench.py``'s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py: ids, sizes, memory and provenance helpers)
import bench_train  # noqa: E402  (tools/bench_train.py: the timed step and the table)

from star_sp import StarConfig, StarInputError  # noqa: E402
from star_sp.distributed.process_group import init_from_env, launched  # noqa: E402
from star_sp.eval.runner import parse_length  # noqa: E402

SHAPES = {  # (hidden, heads, query groups, FFN, vocabulary)
    "llama-3.1-8b": dict(hidden=4096, heads=32, groups=8, ffn=14336, vocab=128256),
    "tiny": dict(hidden=64, heads=4, groups=2, ffn=128, vocab=512),
}


def _process_group(device: torch.device) -> bool:
    """A one-process default group for Megatron's parallel state (the launcher's when launched, else one
    over an in-process store). Returns True when this call created it."""
    created = False
    if not dist.is_initialized():
        if launched():
            _, _, created = init_from_env(600.0, device.type)
        else:
            cuda = device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=600),
                                    device_id=device if cuda else None)
            created = True
    size = dist.get_world_size()
    if size != 1:
        if created:
            dist.destroy_process_group()
        raise StarInputError(f"tools/bench_megatron.py runs in one process on one GPU, got {size} "
                             "processes; start it with python, not torchrun --nproc_per_node N")
    return created


def build_model(shape: str, layers: int, dtype: torch.dtype, device: torch.device, positions: int):
    """The GPT model on ``device`` in ``dtype``, Star's module in every layer's core-attention slot (the
    configuration given here is a placeholder: each step passes its own)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from star_sp.integrations.megatron import star_layer_spec

    s = SHAPES[shape]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=layers, hidden_size=s["hidden"], num_attention_heads=s["heads"], num_query_groups=s["groups"],
        ffn_hidden_size=s["ffn"], normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=not cuda,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False)
    spec = star_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), StarConfig(block_size=1, anchor_size=1))
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=s["vocab"], max_sequence_length=positions,
                     position_embedding_type="rope", rotary_base=500000, rope_scaling=True,
                     share_embeddings_and_output_weights=False)
    return model.to(device=device, dtype=dtype).train()  # Megatron's torch norms are made in float32, on the CPU


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the 8B model has 32)")
    bench_train.add_step_args(p)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--repeats", type=int, default=2, help="timed steps per row (after one warm-up step)")
    p.add_argument("--out", default="runs/bench-megatron")
    args = p.parse_args(argv)

    from star_sp.integrations.megatron import require_megatron
    from star_sp.training.megatron_loss import megatron_train_loss

    mc = require_megatron()
    from megatron.core import parallel_state

    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    contexts = [parse_length(c) for c in args.contexts.split(",")]
    methods = args.methods.split(",")
    provenance = bench._provenance(device, argv)
    provenance.update(command=" ".join(["tools/bench_megatron.py", *argv]), megatron_core=mc.__version__)
    created = _process_group(device)
    ours = not parallel_state.model_parallel_is_initialized()
    if ours:
        parallel_state.initialize_model_parallel()
    try:
        model = build_model(args.shape, args.layers, dtype, device, max(contexts) + args.target)
        vocab = SHAPES[args.shape]["vocab"]
        rows: list[dict] = []
        os.makedirs(args.out, exist_ok=True)

        def measure(common: dict, extra: dict, cfg: StarConfig, attention: str) -> None:
            def step():
                megatron_train_loss(model, ctx, tgt, tgt, cfg, None, attention=attention).backward()

            row = {**common, **extra, **bench_train._measure(step, model, device, args.repeats)}
            rows.append(row)
            print(json.dumps(row), flush=True)

        for length in contexts:
            ctx = torch.cat([bench._ids(length, vocab, i, device) for i in range(args.batch)])
            tgt = torch.cat([bench._ids(args.target, vocab, 100 + i, device) for i in range(args.batch)])
            common = {"context": length, "target": args.target, "layers": args.layers, "shape": args.shape,
                      "dtype": args.dtype, "batch": args.batch, "tokens_per_step": args.batch * (length + args.target)}
            if "global" in methods:  # one block: the config's sizes are replaced by the context's length
                measure(common, {"method": "global"}, StarConfig(block_size=length, anchor_size=length), "global")
            if "star" in methods:
                for block_spec in args.blocks.split(","):
                    block = bench._size(block_spec, length, 1)
                    for anchor_spec in args.anchors.split(","):
                        anchor = bench._size(anchor_spec, length, 1, block)
                        measure(common, {"method": "star", "block": block, "anchor": anchor, "block_spec": block_spec,
                                         "anchor_spec": anchor_spec},
                                StarConfig(block_size=block, anchor_size=anchor), "star")
    finally:
        if ours:
            parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
    bench_train.write_report(args.out, "bench_megatron", "One Megatron-core training step", provenance, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
