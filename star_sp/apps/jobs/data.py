"""Training samples for fine-tuning under the anchor pattern: one sample per micro-batch.

A sample is a context, a target (the question, then the answer and EOS) and labels (the answer's
tokens and EOS; -100 on the question), plus the block and anchor sizes it is trained with, drawn per
sample so that the model sees many patterns: ``blocks`` (how many blocks the context is cut into) and
``anchor_fraction`` (the anchor as a share of the block), each uniform in its configured range.

Which sample a micro-batch gets is a function of ``(seed, step, micro, dp_rank)`` alone: every rank of
a sequence-parallel group (same ``dp_rank``) draws the same sample and the same sizes without talking
to the others, the data-parallel groups draw different ones, and a resumed run sees exactly the
samples an uninterrupted one would have.

Sources: the RULER-style task generators (``star_sp.eval.tasks``), answers as targets, in the format
the evaluation scores and the reference model was trained on (``query + " " + ", ".join(answers) +
"."``), or a JSONL file of ``{"context", "query", "answer"}`` records (the answer is the text the model
should write right after the query, so start it with a space where the tokenizer needs one).
"""

from __future__ import annotations

import json
import math
import random
import dataclasses
from dataclasses import dataclass

import torch

from ...errors import StarInputError
from ...eval.tasks import TASKS, resolve_tasks
from ...training.loss import IGNORE_INDEX

UNORDERED = ("niah_multivalue", "cwe")  # scoring ignores the answers' order: list them as the context does


def sample_rng(seed: int, step: int, micro: int, dp_rank: int) -> random.Random:
    """The random stream of one training sample.

    Disjoint from evaluation by construction: ``star-sp eval`` seeds every sample with the string
    ``f"{seed}/{task}/{length}/{index}"`` (and that plus ``"/pad"``) for an integer ``seed``
    (``star_sp/eval/tasks.py``, ``generate``), a string that starts with a digit or a minus sign;
    every training stream's string starts with ``"train/"`` (and the length fit's with
    ``"train-fit/"``), so no training sample is ever drawn from a stream an evaluation sample uses.
    """
    return random.Random(f"train/{seed}/{step}/{micro}/{dp_rank}")


@dataclass(frozen=True)
class Sample:
    """``context_ids [1, Lc]``, ``target_ids`` and ``labels [1, Lt]`` (``labels[:, t]`` is target token
    ``t`` or -100), and the block and anchor sizes to train this sample with."""

    context_ids: torch.Tensor
    target_ids: torch.Tensor
    labels: torch.Tensor
    block_size: int
    anchor_size: int
    task: str
    attention: str = ""
    """The attention this sample trains under when it is not the job's (``global_fraction``: "global")."""

    @property
    def tokens(self) -> int:
        return self.context_ids.shape[1] + self.target_ids.shape[1]


def draw_sizes(rng: random.Random, context_len: int, blocks: list, anchor_fraction: list) -> tuple[int, int]:
    """``(block_size, anchor_size)``: the context cut into ``k`` blocks (``k`` uniform in ``blocks``,
    block size rounded up), the anchor a uniform fraction of the block in ``anchor_fraction``."""
    k = rng.randint(int(blocks[0]), int(blocks[1]))
    block = max(1, math.ceil(context_len / k))
    anchor = min(block, round(rng.uniform(float(anchor_fraction[0]), float(anchor_fraction[1])) * block))
    return block, anchor


def _sample(tokenizer, context: str, query: str, answer: str, rng, blocks, anchor_fraction, task: str,
            chat=None) -> Sample:
    """One sample's ids; ``chat = (head, tail)``: the context and query as one user turn of the tokenizer's
    chat template (``eval.runner.chat_parts``), as ``star-sp eval --prompt chat`` asks them."""
    if chat is None:
        ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
        q = tokenizer(query, add_special_tokens=False)["input_ids"]
    else:
        ctx = tokenizer(chat[0] + context, add_special_tokens=False)["input_ids"]
        q = tokenizer(query + chat[1], add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    block, anchor = draw_sizes(rng, len(ctx), blocks, anchor_fraction)
    target = torch.tensor([q + a])
    labels = torch.tensor([[IGNORE_INDEX] * len(q) + a])
    return Sample(torch.tensor([ctx]), target, labels, block, anchor, task)


def answer_text(task: str, context: str, answers) -> str:
    """The answer as the model should write it after the query (the evaluation's scoring finds it)."""
    if task in UNORDERED:
        answers = sorted(answers, key=lambda a: context.find(" " + a))
    return " " + ", ".join(answers) + "."


class TaskData:
    """Samples of the RULER-style tasks, ``lengths[0]`` to ``lengths[1]`` tokens each (context, query and
    answer), the task uniform among ``tasks`` that fit the drawn length."""

    def __init__(self, tokenizer, tasks: list[str], lengths: list, blocks: list, anchor_fraction: list, seed: int,
                 chat=None, global_fraction: float = 0.0):
        self.tokenizer, self.lengths, self.blocks, self.anchor_fraction = tokenizer, lengths, blocks, anchor_fraction
        self.seed, self.chat, self.global_fraction = seed, chat, global_fraction
        self.tasks = resolve_tasks(tasks)
        self.fit = {task: self._fit(task) for task in self.tasks}
        if not any(least <= lengths[1] for least, _, _ in self.fit.values()):
            shortest = min(least for least, _, _ in self.fit.values())
            raise StarInputError(f"no task fits in lengths up to {lengths[1]} tokens with this tokenizer (the "
                                 f"shortest needs {shortest}); raise lengths")

    def _count(self, task: str, rng: random.Random, n: int) -> int:
        context, query, answers = TASKS[task][0](rng, n)
        return sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                   for t in (context, query, answer_text(task, context, answers))) + 2

    def _fit(self, task: str) -> tuple[int, float, float]:
        """``(least tokens, base, slope)``: tokens of a sample against filler units, fitted at two sizes."""
        count = lambda n: self._count(task, random.Random(f"train-fit/{task}/{n}"), n)  # noqa: E731
        small, large = count(20), count(200)
        slope = max(1e-3, (large - small) / 180)
        return count(1), small - 20 * slope, slope

    def sample(self, step: int, micro: int, dp_rank: int) -> Sample:
        rng = sample_rng(self.seed, step, micro, dp_rank)
        length = rng.randint(int(self.lengths[0]), int(self.lengths[1]))
        task = rng.choice([t for t in self.tasks if self.fit[t][0] <= length] or self.tasks)
        least, base, slope = self.fit[task]
        units = max(1, int((length - base) / slope))
        state = rng.getstate()
        for _ in range(8):  # the fit is an estimate: shrink the filler until the sample fits
            rng.setstate(state)
            context, query, answers = TASKS[task][0](rng, units)
            answer = answer_text(task, context, answers)
            sample = _sample(self.tokenizer, context, query, answer, rng, self.blocks, self.anchor_fraction, task,
                             self.chat)
            if sample.tokens <= length or units == 1:
                break
            units = max(1, units - int((sample.tokens - length) / slope * 1.1) - 1)
        return mixed(sample, self.seed, step, micro, self.global_fraction)


class JsonlData:
    """Samples from a JSONL file of ``{"context", "query", "answer"}`` records, in a fresh random order
    each epoch; micro-batch ``i = (step * accumulation + micro) * dp_size + dp_rank`` of the run takes
    record ``order(epoch)[i % N]`` with ``epoch = i // N``."""

    def __init__(self, path: str, tokenizer, blocks: list, anchor_fraction: list, seed: int,
                 accumulation: int, dp_size: int, chat=None, global_fraction: float = 0.0):
        self.tokenizer, self.blocks, self.anchor_fraction, self.seed = tokenizer, blocks, anchor_fraction, seed
        self.chat, self.global_fraction = chat, global_fraction
        self.accumulation, self.dp_size = accumulation, dp_size
        self.records = read_jsonl(path)
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.records)))
            random.Random(f"train/{self.seed}/epoch/{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def sample(self, step: int, micro: int, dp_rank: int) -> Sample:
        i = (step * self.accumulation + micro) * self.dp_size + dp_rank
        epoch, position = divmod(i, len(self.records))
        record = self.records[self._order(epoch)[position]]
        rng = sample_rng(self.seed, step, micro, dp_rank)
        sample = _sample(self.tokenizer, record["context"], record["query"], record["answer"], rng, self.blocks,
                         self.anchor_fraction, "jsonl", self.chat)
        return mixed(sample, self.seed, step, micro, self.global_fraction)


def mixed(sample: Sample, seed: int, step: int, micro: int, global_fraction: float) -> Sample:
    """``sample``, under global attention with probability ``global_fraction`` (a star run's mixed-in plain
    steps). The draw depends on ``(seed, step, micro)`` alone, from a stream of its own (the samples are
    those of a run without it): every rank of the run makes the same choice at each micro-batch, so
    ZeRO-3's parameter gathers (the head is called once under global, in chunks under star) stay alike."""
    if global_fraction and random.Random(f"train/{seed}/{step}/{micro}/attention").random() < global_fraction:
        return dataclasses.replace(sample, attention="global")
    return sample


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; any bad line raises ``StarInputError`` naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise StarInputError(f"cannot read the data file {path}: {exc}; data is 'tasks' or a JSONL file") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StarInputError(f"{path} line {number} is not JSON ({exc.msg}); write one "
                                 '{"context": ..., "query": ..., "answer": ...} object per line') from None
        if not isinstance(record, dict):
            raise StarInputError(f"{path} line {number} is not a JSON object; write one "
                                 '{"context": ..., "query": ..., "answer": ...} object per line')
        for key in ("context", "query", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise StarInputError(f"{path} line {number} needs a non-empty string {key!r}; each record holds "
                                     "context, query and answer")
        records.append(record)
    if not records:
        raise StarInputError(f"{path} holds no records; write one {{context, query, answer}} object per line")
    return records


def open_data(cfg, tokenizer, dp_size: int):
    """The configured sample source (``cfg.data``: 'tasks' or a JSONL path), in the chat template's form
    where ``cfg.prompt`` asks for it (``auto``: where the tokenizer has one)."""
    from ...eval.runner import prompt_parts

    chat = prompt_parts(tokenizer, cfg.prompt)
    mix = getattr(cfg, "global_fraction", 0.0)
    if cfg.data == "tasks":
        return TaskData(tokenizer, cfg.tasks, cfg.lengths, cfg.blocks, cfg.anchor_fraction, cfg.seed, chat, mix)
    return JsonlData(cfg.data, tokenizer, cfg.blocks, cfg.anchor_fraction, cfg.seed, cfg.gradient_accumulation_steps,
                     dp_size, chat, mix)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, data, keys):
        self.data, self.keys = data, keys

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        keys = self.keys if info is None else self.keys[info.id::info.num_workers]
        for step, micro, dp_rank in keys:
            yield self.data.sample(step, micro, dp_rank)


def samples(data, start_step: int, steps: int, accumulation: int, dp_rank: int, workers: int = 0):
    """This rank's samples for steps ``start_step .. steps - 1``, in order (``accumulation`` per step),
    generated by ``workers`` background processes (0: here)."""
    keys = [(s, m, dp_rank) for s in range(start_step, steps) for m in range(accumulation)]
    if workers == 0:
        return (data.sample(*key) for key in keys)
    # the loader takes the workers' items in turn, so the order is the keys' order
    return iter(torch.utils.data.DataLoader(_Stream(data, keys), batch_size=None, num_workers=workers,
                                            prefetch_factor=4))
