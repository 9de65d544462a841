"""Star Attention in a Megatron-core GPT model: train on one long-context sample, then answer from it.

    torchrun --standalone --nproc_per_node 2 examples/megatron_gpt.py     # context parallelism 2 (CPU, gloo)

Every rank prints one line: the loss before and after 30 steps (the same on every rank), and the
answer greedy decoding gives, which is the target the model was trained on.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from star_sp import StarConfig
from star_sp.integrations.megatron import megatron_generate, megatron_prefill, star_layer_spec
from star_sp.training import reduce_gradients
from star_sp.training.megatron_loss import megatron_train_loss

dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(context_parallel_size=dist.get_world_size())  # the CP group = Star's group
cp = parallel_state.get_context_parallel_group()

star = StarConfig(block_size=64, anchor_size=16)  # 4 blocks of 64 context tokens, a 16-token anchor
config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                           normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                           hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
                           masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False)
torch.manual_seed(0)  # the same weights on every rank
model = GPTModel(config=config, transformer_layer_spec=star_layer_spec(get_gpt_layer_local_spec(), star),
                 vocab_size=101, max_sequence_length=1024, position_embedding_type="rope")

context = torch.randint(0, 101, (1, 256), generator=torch.Generator().manual_seed(1))  # every rank: the full ids
question, answer = torch.tensor([[7, 8, 9]]), torch.tensor([[42, 43, 44, 45]])
target = torch.cat([question, answer], dim=1)
labels = torch.cat([torch.full_like(question, -100), answer], dim=1)  # learn the answer, not the question

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
losses = []
for step in range(30):
    loss = megatron_train_loss(model, context, target, labels, star, cp)
    loss.backward()
    reduce_gradients(model, cp)  # the exact gradient of the dense-M_star model, on every rank
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())

model.eval()
with torch.no_grad():
    kv = megatron_prefill(model, context, star, cp)  # phase 1: each rank encodes its blocks
    tokens = megatron_generate(model, kv, question, max_new_tokens=4)  # phase 2
print(f"rank {dist.get_rank()}: loss {losses[0]:.3f} -> {losses[-1]:.4f}, answer {tokens[0].tolist()}", flush=True)
parallel_state.destroy_model_parallel()
dist.destroy_process_group()
os._exit(0)
