"""The token ids of a ``star-sp generate`` request: its context and its query, each from the one source
given for it (a text file, a file or string of ids, random ids, or ``--query`` text), or several
questions (``--query`` given more than once, or ``--questions-file``), checked against the model's
vocabulary. Rank 0 reads them and sends them to every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import StarInputError
from .report import on_every_rank

_SOURCES = {"context": ("--context-file", "--context-ids", "--random-context"),
            "query": ("--query-file", "--query-ids", "--random-query", "--query")}


def _read_ids(what: str, args, tokenizer, vocab: int, seed: int, chat=None) -> list[int]:
    """The token ids of the context or the query, from the one source given for it."""
    text_file, ids_source, random_n = (getattr(args, f.lstrip("-").replace("-", "_")) for f in _SOURCES[what][:3])
    text = getattr(args, "query", None) if what == "query" else None
    if isinstance(text, list):  # --query given once (several: _read_questions)
        text = text[0] if text else None
    given = [f for f, v in zip(_SOURCES[what], (text_file, ids_source, random_n, text)) if v is not None]
    if len(given) != 1:
        flags = ", ".join(_SOURCES[what][:-1]) + " or " + _SOURCES[what][-1]
        raise StarInputError(f"give exactly one {what} source ({flags}); got "
                             + (" and ".join(given) if given else "none"))
    source = given[0]
    if random_n is not None:
        if random_n < 1:
            raise StarInputError(f"{source} must be a positive number of tokens, got {random_n}")
        gen = torch.Generator().manual_seed(seed + (0 if what == "context" else 1))
        return torch.randint(0, vocab, (random_n,), generator=gen).tolist()
    if ids_source is not None:
        if what == "context":
            source = f"--context-ids file {ids_source}"
            ids_source = _read_file(ids_source, "--context-ids")
        try:
            ids = [int(t) for t in ids_source.split()]
        except ValueError:
            raise StarInputError(f"{source}: token ids must be whitespace-separated integers") from None
        if not ids:
            raise StarInputError(f"the {what} is empty: {source} holds no token ids")
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise StarInputError(f"{source}: token id {bad} is outside the model's vocabulary of {vocab} ids "
                                 f"(0 to {vocab - 1}); give ids of this model's tokenizer")
        return ids
    if tokenizer is None:
        raise StarInputError(f"the model directory has no tokenizer, so {what} text cannot be read; add "
                             "tokenizer files to it or pass token ids (--context-ids / --query-ids)")
    if text_file is not None:
        text = _read_file(text_file, source)
        if what == "query":  # an editor's final newline is no part of the question (as with "$(cat FILE)")
            text = text.rstrip("\r\n")
        source = f"{source} {text_file}"
    return _encode(what, text, source, tokenizer, vocab, chat)


def _encode(what: str, text: str, source: str, tokenizer, vocab: int, chat=None) -> list[int]:
    """``text``'s ids; ``chat = (head, tail)``: as one user turn of the chat template, the head before the
    context and the tail (up to the assistant's turn) after the query (``eval.runner.chat_parts``)."""
    if not text.strip():
        raise StarInputError(f"the {what} is empty: {source} holds no text; give it the text to "
                             + ("answer from" if what == "context" else "ask"))
    if chat is not None:
        text = chat[0] + text if what == "context" else text + chat[1]
    encoded = tokenizer(text, add_special_tokens=what == "context" and chat is None, return_special_tokens_mask=True)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    if all(special):  # nothing but the tokenizer's own BOS/EOS
        raise StarInputError(f"the {what} is empty: {source} holds no text; give it the text to "
                             + ("answer from" if what == "context" else "ask"))
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise StarInputError(f"the tokenizer gives token id {bad} for the {what}, outside the model's vocabulary "
                             f"of {vocab} ids: the tokenizer does not belong to this model")
    return ids


def _read_questions(args, tokenizer, vocab: int, seed: int, chat=None) -> list[list[int]]:
    """Every question's ids: one from the one query source, or several from ``--query`` given more than
    once or ``--questions-file`` (one question per line, blank lines skipped)."""
    texts = getattr(args, "query", None) or []
    path = getattr(args, "questions_file", None)
    others = [f for f in ("--query-file", "--query-ids", "--random-query")
              if getattr(args, f.lstrip("-").replace("-", "_"), None) is not None]
    if path is None and len(texts) <= 1:
        return [_read_ids("query", args, tokenizer, vocab, seed, chat)]
    if others or (path is not None and texts):
        given = others + (["--query"] if texts else []) + (["--questions-file"] if path is not None else [])
        raise StarInputError("several questions come from --query given more than once or from --questions-file "
                             f"alone; got {' and '.join(given)}")
    if tokenizer is None:
        raise StarInputError("the model directory has no tokenizer, so question text cannot be read; add "
                             "tokenizer files to it")
    if path is not None:
        lines = [(n, line.strip()) for n, line in enumerate(_read_file(path, "--questions-file").splitlines(), 1)]
        lines = [(n, line) for n, line in lines if line]
        if not lines:
            raise StarInputError(f"--questions-file {path} holds no questions; write one question per line")
        return [_encode("query", line, f"--questions-file {path} line {n}", tokenizer, vocab, chat)
                for n, line in lines]
    return [_encode("query", text, f"--query number {i + 1}", tokenizer, vocab, chat) for i, text in enumerate(texts)]


def _chat(args, tokenizer):
    """``(head, tail)`` of the chat template for ``--prompt``, or None (plain text)."""
    from ..eval.runner import prompt_parts

    prompt = getattr(args, "prompt", "plain") or "plain"
    texts = getattr(args, "context_file", None) is not None and not any(
        getattr(args, name, None) is not None for name in ("query_ids", "random_query"))
    if prompt == "plain" or tokenizer is None:
        return None
    if not texts:  # ids: auto leaves them as they are
        if prompt == "auto":
            return None
        raise StarInputError("--prompt chat wraps text in the chat template: give the context as --context-file and "
                             "the question as text (--query, --query-file or --questions-file)")
    return prompt_parts(tokenizer, prompt)


def _read_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise StarInputError(f"cannot read {flag}: {exc}") from None


def read_inputs(args, cfg, tokenizer, vocab: int, group) -> tuple[torch.Tensor, "torch.Tensor | list[torch.Tensor]"]:
    """Rank 0 reads the inputs; every rank gets the same ids (or the same error): the context ``(1, Lc)``
    and the query ``(1, Lq)``, or a list of several questions' ids ``(L_i,)``. ``--prompt chat`` (``auto``: where
    the tokenizer has a chat template and both are text) asks the query as a user turn of the template."""
    payload: list = [None]
    if group is None or dist.get_rank(group) == 0:
        try:
            chat = _chat(args, tokenizer)
            ctx = _read_ids("context", args, tokenizer, vocab, cfg.seed, chat)
            qry = _read_questions(args, tokenizer, vocab, cfg.seed, chat)
            payload = [(ctx, qry, None)]
        except StarInputError as exc:
            payload = [(None, None, str(exc))]
    if group is not None:
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    ctx, qry, error = payload[0]
    if error:
        raise on_every_rank(StarInputError(error))
    if len(qry) == 1 and getattr(args, "questions_file", None) is None:  # a file of questions answers as a list
        return torch.tensor([ctx]), torch.tensor(qry)
    return torch.tensor([ctx]), [torch.tensor(q) for q in qry]
