"""One Star Attention layer across hosts, for frameworks other than transformers.

    torchrun --standalone --nproc_per_node 2 examples/layer_across_hosts.py

Every rank draws the same q, k, v over ``[context ; query]`` (in a model they come from the layer's
projections), encodes its own blocks (phase 1), answers the query with every host's KV (phase 2),
and checks its rows against the float64 oracle. Runs on CPU with gloo (any number of processes; more
processes than blocks leaves some idle) or on GPUs with NCCL.
"""

import torch
import torch.distributed as dist

from star_sp import BlockLayout, StarConfig
from star_sp.distributed import phase1_attention, phase2_attention
from star_sp.ops import star_reference

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
group, rank = dist.group.WORLD, dist.get_rank()
device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")

config = StarConfig(block_size=96, anchor_size=32)
context_len, query_len, heads, kv_heads, head_dim = 300, 5, 8, 2, 64
gen = torch.Generator().manual_seed(0)  # the same inputs on every rank
q = torch.randn(1, heads, context_len + query_len, head_dim, generator=gen).to(device)
k, v = (torch.randn(1, kv_heads, context_len + query_len, head_dim, generator=gen).to(device) for _ in range(2))

layout = BlockLayout.from_config(config, context_len, dist.get_world_size(group), rank)
start, end = layout.token_range  # this host's context tokens (none on an idle host)
out, _ = phase1_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], layout, group=group)
query = slice(context_len, None)
query_out, _ = phase2_attention(q[:, :, query], k[:, :, start:end], v[:, :, start:end], group=group,
                                query_k=k[:, :, query] if layout.is_query_host else None,
                                query_v=v[:, :, query] if layout.is_query_host else None)

oracle, _ = star_reference(q.cpu(), k.cpu(), v.cpu(), context_len=context_len, block_size=config.block_size,
                           anchor_size=config.anchor)
diffs = [out.cpu().double() - oracle[:, :, start:end], query_out.cpu().double() - oracle[:, :, query]]
error = torch.cat([d.flatten() for d in diffs]).abs().max().item()
print(f"rank {rank}: context tokens [{start}, {end}), largest error against the float64 oracle {error:.1e}\n",
      end="", flush=True)  # one write per line: the ranks share the terminal
assert error < 1e-4, error  # float32 on CPU: about 1e-6 (docs/accuracy.md, section 1)
dist.destroy_process_group()
