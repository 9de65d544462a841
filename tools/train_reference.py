"""Train the reference long-context model that ships with star-sp (a small Llama, global attention).

    python tools/train_reference.py --out runs/reference --max-length 16384 --minutes 60

Reproducible from its arguments and seed: it builds a byte-level BPE tokenizer on generated text,
then trains a Llama-architecture model on a mixture of the RULER-style task families
(``star_sp.eval.tasks``, answers appended, loss on the answer) and plain generated prose (loss on every
token), with a curriculum that raises the context length from ``--min-length`` to ``--max-length``.
Writes, in the transformers layout, ``config.json``, ``model.safetensors`` (bf16), the tokenizer files,
``training_log.jsonl`` (loss, answer loss, lengths, tokens/s per logging step) and ``recipe.json``
(every argument, the data mixture, the final losses). Needs a GPU for the real run; ``--smoke`` runs a
few steps of a tiny model on any device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from star_sp.eval import TASKS, generate, resolve_tasks  # noqa: E402
from star_sp.eval import text as prose  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE trained on generated task text and prose; digits always split one by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = lambda s: len(s.split())  # noqa: E731 - a cheap length for the tokenizer's corpus
    corpus = [prose.paragraph(rng) for _ in range(3000)]
    for task in TASKS:
        for i in range(40):
            sample = generate(task, 400, i, words, seed=seed + 1)
            corpus += [sample.context, sample.query + " " + ", ".join(sample.answers)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def answer_text(answers) -> str:
    return " " + ", ".join(answers) + "."


def chars_per_token(tokenizer, seed: int) -> dict[str, float]:
    """Characters per token of each task's text (digits and UUIDs take far more tokens per character
    than prose): sizes training samples without tokenizing them repeatedly."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    ratios = {}
    for task in TASKS:
        sample = generate(task, 2048, 0, count, seed=seed + 2)
        body = sample.context + sample.query
        ratios[task] = len(body) / count(body)
    return ratios


def make_example(tokenizer, rng: random.Random, length: int, prose_share: float, seed: int,
                 ratios: dict[str, float], tasks: list[str]):
    """``(ids, loss_mask, is_prose)``: a task sample with its answer (loss on the answer), or plain prose
    (loss on every token). Task samples are sized by an estimate (``ratios``: characters per token of
    each task): their length is within some percent of ``length``, and each is tokenized once."""
    if rng.random() < prose_share:
        paragraphs, ids = [], []
        while len(ids) < length:
            paragraphs.append(prose.paragraph(rng))
            ids = tokenizer("\n".join(paragraphs))["input_ids"]
        ids = ids[:length]
        return ids, [1.0] * len(ids), True
    task = rng.choice(tasks)
    count = lambda s: int(len(s) / ratios[task])  # noqa: E731
    sample = generate(task, int(length * 0.95), rng.randrange(1 << 30), count, seed=seed)
    ctx = tokenizer(sample.context)["input_ids"]
    qry = tokenizer(sample.query, add_special_tokens=False)["input_ids"]
    ans = tokenizer(answer_text(sample.answers), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ctx + qry + ans
    return ids, [0.0] * (len(ctx) + len(qry)) + [1.0] * len(ans), False


class Stream(torch.utils.data.IterableDataset):
    """Batches of one length each: ``(ids, mask)`` padded to the longest example of the batch."""

    def __init__(self, tokenizer, lengths, tokens_per_batch, prose_share, seed, ratios, tasks):
        self.tokenizer, self.lengths, self.tokens, self.prose, self.seed = tokenizer, lengths, tokens_per_batch, prose_share, seed
        self.ratios, self.tasks = ratios, tasks

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/{info.id if info else 0}")
        while True:
            length = rng.choice(self.lengths)
            batch = [make_example(self.tokenizer, rng, length, self.prose, self.seed, self.ratios, self.tasks)
                     for _ in range(max(1, self.tokens // length))]
            width = max(len(ids) for ids, _, _ in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width))
            for i, (x, m, _) in enumerate(batch):
                ids[i, : len(x)], mask[i, : len(m)] = torch.tensor(x), torch.tensor(m)
            yield ids, mask, torch.tensor([p for _, _, p in batch])


def model_config(tokenizer, args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.hidden // args.heads, max_position_embeddings=args.max_positions,
                       rope_theta=args.rope_theta, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=65536)
    p.add_argument("--rope-theta", type=float, default=1_000_000.0)
    p.add_argument("--min-length", type=int, default=512)
    p.add_argument("--max-length", type=int, default=16384)
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--prose-share", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--tasks", default="all", help="comma-separated tasks or families in the mixture")
    p.add_argument("--smoke", action="store_true", help="tiny model, short lengths, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.hidden, args.layers, args.heads, args.kv_heads = 600, 64, 2, 4, 2
        args.min_length, args.max_length, args.tokens_per_batch, args.workers = 512, 1024, 2048, 0
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tasks = resolve_tasks(args.tasks.split(","))
    tokenizer = build_tokenizer(args.vocab, args.seed)
    ratios = chars_per_token(tokenizer, args.seed)
    model = AutoModelForCausalLM.from_config(model_config(tokenizer, args), dtype=torch.float32,
                                             attn_implementation="sdpa").to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    stages = []  # the curriculum: doubling lengths, each stage a share of the time budget
    length = args.min_length
    while length < args.max_length:
        stages.append(length)
        length *= 2
    stages.append(args.max_length)
    log = open(os.path.join(args.out, "training_log.jsonl"), "w")
    start, step, seen = time.time(), 0, 0
    losses: list[float] = []
    answer_losses: list[float] = []
    last_row: dict = {}
    for stage, top in enumerate(stages):
        lengths = sorted({max(args.min_length, top // 4), max(args.min_length, top // 2), top})
        data = torch.utils.data.DataLoader(Stream(tokenizer, lengths, args.tokens_per_batch, args.prose_share,
                                                  args.seed * 1000 + stage, ratios, tasks),
                                           batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
        stage_end = start + budget * (stage + 1) / len(stages)
        for ids, mask, is_prose in data:
            if time.time() >= stage_end or (args.smoke and step >= 6 * (stage + 1)):
                break
            ids, mask = ids.to(device), mask.to(device)
            frac = min(1.0, (time.time() - start) / budget)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="none").view_as(mask[:, 1:])
            weights = mask[:, 1:]
            loss = (nll * weights).sum() / weights.sum().clamp_min(1)
            task_rows = ~is_prose.to(device)
            if task_rows.any():
                answer_losses.append(((nll * weights)[task_rows].sum() / weights[task_rows].sum().clamp_min(1)).item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += ids.numel()
            losses.append(loss.item())
            if step % args.log_every == 0 or args.smoke:
                row = {"step": step, "stage_max_length": top, "length": ids.shape[1], "loss": sum(losses) / len(losses),
                       "answer_loss": sum(answer_losses) / len(answer_losses) if answer_losses else None,
                       "lr": opt.param_groups[0]["lr"], "tokens": seen, "elapsed_s": time.time() - start,
                       "tokens_per_s": seen / (time.time() - start)}
                last_row = row
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
                losses, answer_losses = [], []
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump({"args": vars(args), "parameters": params, "steps": step, "tokens": seen, "stages": stages,
                   "tasks": tasks, "answer_format": "' ' + ', '.join(answers) + '.' + eos",
                   "final_log": last_row}, f, indent=1)
    print(f"saved {params / 1e6:.1f}M parameters after {step} steps to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
