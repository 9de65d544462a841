"""Train the reference long-context model that ships with star-sp (a small Llama, global attention).

    python tools/train_reference.py --out runs/reference --max-length 16384 --minutes 60
    bash tools/train_reference.sh 1 OUT && bash tools/train_reference.sh 2 OUT   # the shipped model

Reproducible from its arguments and seed (the budgets are wall-clock minutes, so step counts vary a
little with the hardware): it builds a byte-level BPE tokenizer on generated text (or keeps the one of
``--init``), then trains a Llama-architecture model on a mixture of the RULER-style task families
(``star_sp.eval.tasks``, each sample with its answer appended, or a *drill*: one context asked several
questions) and plain generated prose (``tools/reference_data.py``); the loss is the mean loss on answer
tokens plus ``--context-weight`` times the mean loss on the other tokens; a curriculum raises the
context length from ``--min-length`` to ``--max-length`` (``--stage-shares`` splits the time).
Writes, in the transformers layout, ``config.json``, ``model.safetensors`` (bf16, after every stage),
the tokenizer files, ``training_log.jsonl`` (losses, each task's answer accuracy, lengths, tokens/s per
logging step) and ``recipe.json`` (every argument, the mixture, the final log line). Needs a GPU for the
real run; ``--smoke`` runs a few steps of a tiny model on any device. Under ``torchrun`` (one process
per GPU) it trains data-parallel: each rank draws its own batches, gradients are averaged across ranks,
rank 0's clock sets the schedule and the stage ends for all, rank 0 logs (its own batches) and saves.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference_data import Encoder, Sizer, build_tokenizer, make_example  # noqa: E402

from star_sp.eval import resolve_tasks  # noqa: E402


class Stream(torch.utils.data.IterableDataset):
    """Batches of one length each: ``(ids, roles, spans)``, ids padded to the longest example."""

    def __init__(self, tokenizer, lengths, args, seed, tasks, rank=0):
        self.tokenizer, self.lengths, self.args, self.seed, self.tasks = tokenizer, lengths, args, seed, tasks
        self.rank = rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(f"{self.seed}/{worker}" if self.rank == 0 else f"{self.seed}/{self.rank}/{worker}")
        encode = Encoder(self.tokenizer)
        sizer = Sizer(encode, self.args.seed)
        while True:
            length = rng.choice(self.lengths)
            batch = [make_example(encode, sizer, rng, length, self.tasks, self.args.prose_share,
                                  self.args.drill_share, self.args.questions)
                     for _ in range(max(1, self.args.tokens_per_batch // length))]
            width = max(len(ids) for ids, _, _ in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            roles = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: padding, no loss
            for i, (x, r, _) in enumerate(batch):
                ids[i, : len(x)], roles[i, : len(r)] = torch.tensor(x), torch.tensor(r)
            yield ids, roles, [[(i, *span) for span in spans] for i, (_, _, spans) in enumerate(batch)]


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
    p.add_argument("--prose-share", type=float, default=0.1)
    p.add_argument("--drill-share", type=float, default=0.5, help="share of task samples asked several questions")
    p.add_argument("--questions", type=int, default=6, help="most questions in a drill")
    p.add_argument("--context-weight", type=float, default=0.1,
                   help="weight of the mean loss on context tokens beside the mean loss on answers")
    p.add_argument("--stage-shares", default="", help="comma-separated time shares of the curriculum's stages")
    p.add_argument("--weights", default="", help="extra sampling weight of some tasks, e.g. qa=3,vt=2")
    p.add_argument("--init", help="a model directory to continue from (its tokenizer is kept)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--tasks", default="all", help="comma-separated tasks or families in the mixture")
    p.add_argument("--smoke", action="store_true", help="tiny model, short lengths, a few steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.hidden, args.layers, args.heads, args.kv_heads = 600, 64, 2, 4, 2
        args.min_length, args.max_length, args.tokens_per_batch, args.workers = 256, 512, 2048, 0
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    ranks = Ranks()
    os.makedirs(args.out, exist_ok=True)
    device = ranks.device
    tasks = resolve_tasks(args.tasks.split(","))
    mixture = list(tasks)  # tasks drawn uniformly from this list
    for item in filter(None, args.weights.split(",")):
        name, weight = item.split("=")
        mixture += [t for t in resolve_tasks([name]) if t in tasks] * (int(weight) - 1)
    if args.init:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa")
    else:
        tokenizer = build_tokenizer(args.vocab, args.seed)
        model = AutoModelForCausalLM.from_config(model_config(tokenizer, args), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    Encoder(tokenizer).check(args.seed)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    stages = []  # the curriculum: doubling lengths, each stage a share of the time budget
    length = args.min_length
    while length < args.max_length:
        stages.append(length)
        length *= 2
    stages.append(args.max_length)
    shares = [float(x) for x in args.stage_shares.split(",")] if args.stage_shares else [1.0] * len(stages)
    if len(shares) != len(stages):
        raise SystemExit(f"--stage-shares needs {len(stages)} values for the stages {stages}")
    ends = [sum(shares[: i + 1]) / sum(shares) for i in range(len(stages))]
    log = open(os.path.join(args.out, "training_log.jsonl"), "w") if ranks.rank == 0 else None
    ranks.check_same("tokenizers", json.dumps(sorted(tokenizer.get_vocab().items())),
                     "build it once (train one rank with --out DIR, then all ranks with --init DIR)")
    start, step, seen = ranks.clock(time.time()), 0, 0
    window = Window()
    last_row: dict = {}
    for stage, top in enumerate(stages):
        lengths = sorted({max(args.min_length, top // 4), max(args.min_length, top // 2), top})
        data = torch.utils.data.DataLoader(Stream(tokenizer, lengths, args, args.seed * 1000 + stage, mixture, ranks.rank),
                                           batch_size=None, num_workers=args.workers,
                                           prefetch_factor=4 if args.workers else None)
        stage_end = start + budget * ends[stage]
        for ids, roles, spans in data:
            now = ranks.clock(time.time())  # rank 0's clock, the same on every rank
            if now >= stage_end or (args.smoke and step >= 6 * (stage + 1)):
                break
            ids, roles = ids.to(device), roles.to(device)
            frac = min(1.0, (now - start) / budget)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(ids).logits[:, :-1].float()
            target, role = ids[:, 1:], roles[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    reduction="none").view_as(target)
            answer, context = (role == 1).float(), (role == 0).float()
            answer_loss = (nll * answer).sum() / answer.sum().clamp_min(1)
            context_loss = (nll * context).sum() / context.sum().clamp_min(1)
            loss = answer_loss + args.context_weight * context_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ranks.average_gradients(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += ids.numel() * ranks.world
            window.add(loss, answer_loss if answer.sum() > 0 else None, context_loss,
                       (logits.argmax(-1) == target).cpu(), spans)
            if ranks.rank == 0 and (step % args.log_every == 0 or args.smoke):
                row = {"step": step, "stage_max_length": top, "length": ids.shape[1], **window.flush(),
                       "lr": opt.param_groups[0]["lr"], "tokens": seen, "elapsed_s": round(time.time() - start, 1),
                       "tokens_per_s": round(seen / (time.time() - start))}
                last_row = row
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
        if ranks.rank == 0:
            save(model, tokenizer, args.out)  # a usable model after every stage
    ranks.check_same("weights", "".join(str(float(p.detach().double().sum())) for p in model.parameters()),
                     "the data-parallel update diverged (a bug: please report it)")
    ranks.close()
    if ranks.rank != 0:
        return 0
    save(model, tokenizer, args.out)
    with open(os.path.join(args.out, "recipe.json"), "w") as f:
        json.dump({"args": vars(args), "ranks": ranks.world, "parameters": params, "steps": step, "tokens": seen, "stages": stages,
                   "stage_shares": shares, "tasks": tasks, "mixture": mixture,
                   "answer_format": "query + ' ' + ', '.join(answers) + '.' + eos", "final_log": last_row}, f, indent=1)
    print(f"saved {params / 1e6:.1f}M parameters after {step} steps to {args.out}")
    return 0


def save(model, tokenizer, out: str) -> None:
    """Write a bf16 copy; the training weights stay float32 (rounding them would change the run)."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


class Ranks:
    """Data parallelism under torchrun (``WORLD_SIZE`` > 1), or one process: rank, device, the shared clock
    and gradient averaging (one flat all-reduce per step)."""

    def __init__(self):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.dist = dist if self.world > 1 else None
        if self.dist:
            dist.init_process_group("nccl" if cuda else "gloo")

    def clock(self, now: float) -> float:
        if not self.dist:
            return now
        t = torch.tensor([now], dtype=torch.float64, device=self.device)
        self.dist.broadcast(t, 0)
        return float(t.item())

    def check_same(self, what: str, text: str, hint: str) -> None:
        """Raise on every rank unless ``text`` is the same on all of them."""
        if not self.dist:
            return
        import hashlib

        digest = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        if int(t[0]) != digest or int(-t[1]) != digest:
            raise SystemExit(f"the ranks hold different {what}: {hint}")

    def average_gradients(self, model) -> None:
        if not self.dist:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def close(self) -> None:
        if self.dist:
            self.dist.barrier()
            self.dist.destroy_process_group()


class Window:
    """Running means between log lines, and each task's answer accuracy on the batches it saw (an
    answer counts when every one of its tokens is the argmax: unseen data, so an honest estimate)."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.hits: dict[str, list[int]] = {}

    def add(self, loss, answer_loss, context_loss, correct, spans) -> None:
        self.rows.append((loss.item(), None if answer_loss is None else answer_loss.item(), context_loss.item()))
        for row in spans:
            for i, begin, end, task in row:
                ok = bool(correct[i, begin - 1:end - 1].all())
                self.hits.setdefault(task, [0, 0])
                self.hits[task][0] += ok
                self.hits[task][1] += 1

    def flush(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        out = {"loss": mean([r[0] for r in self.rows]),
               "answer_loss": mean([r[1] for r in self.rows if r[1] is not None]),
               "context_loss": mean([r[2] for r in self.rows]),
               "answer_accuracy": {t: round(100 * h / n, 1) for t, (h, n) in sorted(self.hits.items())}}
        self.rows, self.hits = [], {}
        return out


if __name__ == "__main__":
    raise SystemExit(main())
