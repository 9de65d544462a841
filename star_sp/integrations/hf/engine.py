"""``StarEngine``: Star Attention for transformers causal LMs, through transformers' public extension points.

The engine registers one attention function under the name ``"star"`` (``attention.py``), switches the
model to it for the length of each engine call (and back afterwards), and hands the pass that runs the
forward (``PrefillPass``, ``QueryPass``, ``DecodeStepPass`` from ``runtime/passes.py``) both to the model's
KV cache (``TransformersCache``) and, as a keyword argument, to the attention function. No modeling file
is copied and no private function is patched; version differences live in ``star_sp/_compat.py``.

Shapes: contexts ``(B, Lc)``, one per sequence (or a list of contexts of different lengths, each its own
block layout); queries ``(B, Lq)``, or several questions over one context as ``(Q, Lq)`` or a list of
different lengths, left-padded (the padding keys are masked by the query KV, never attended). The
attention function builds Star's masks itself: no mask function is registered.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from ... import _compat
from ...config import DECODE_GRAPH_MIN_TOKENS, StarConfig
from ...distributed.agreement import agree_or_raise, first_failure
from ...distributed.guard import guarded_step
from ...distributed.rows import phase1_rows
from ...errors import StarError, StarInputError
from ...layout import BlockLayout, RingLayout
from ...runtime.decode_step import DecodeStep, WarmUpError
from ...runtime.generate import StopRule, decode_tokens
from ...runtime.inputs import check_ids, fingerprint, positions_limit, query_positions, questions
from ...runtime.kv_cache import ContextKV, QueryKV, StaticQueryKV
from ...runtime.passes import PrefillPass, QueryPass, RingPrefillPass, StarContext
from ...runtime.sampling import SamplingConfig
from .attention import ATTENTION_NAME, TransformersCache, register
from .checks import check_model, dropout_error, model_spec, unwrap_adapters


def _with_star_attention(method):
    """Run an engine method with the model switched to the ``star`` attention function, and switch it
    back afterwards: outside the engine's calls the user's model behaves exactly as it did before.

    With a group the whole call is one guarded step (``_one_step``), so an error on any rank, inside
    Star's attention or outside it (an MLP, the LM head), reaches every rank as the same error naming
    that rank."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with (torch.no_grad(), _compat.attn_implementation_set(self.model, ATTENTION_NAME), self._compiling() as layers,
              _one_step(method.__name__, self.group)):
            result = method(self, *args, **kwargs)
        if layers is not None:
            self.stats["compile_s"] = layers.seconds
        return result

    return wrapper


@contextlib.contextmanager
def _one_step(step: str, group: "dist.ProcessGroup | None"):
    """One engine call as one guarded step of ``group`` (``distributed/guard.py``): a rank that raises
    records the error before the others time out in their next collective, and they name it. The call
    ends with an agreement of every rank: after its last collective a rank still runs local layers (the
    last layers' MLPs, the LM head of ``score``), and a failure there must not leave the others
    returning. An error every rank raises alike (``on_every_rank``: an agreement's, the query host's
    token broadcast's, a capture outcome the ranks shared) passes unchanged."""
    if group is None:
        yield
        return
    agreed = None
    with guarded_step(step, group):
        try:
            yield
        except StarError as exc:
            if not getattr(exc, "on_every_rank", False):
                raise
            agreed = exc
        else:
            agree_or_raise(group, step, {}, None)  # every rank got to the end of the call
    if agreed is not None:
        raise agreed


class StarEngine:
    """Run a transformers causal LM with Star Attention (or, for comparison, global attention).

    ``group=None``: one process holds every block (on one device phase 1 is one block-sparse prefill).
    Otherwise one process per host; every rank calls every method with the same arguments (the full
    context and query ids on every rank), and every rank gets the same results.

    ``attention="global"`` is the plain model (one process); ``attention="ring"`` is exact causal
    attention across the hosts (the baseline): the prefill runs ring attention over zigzag shares of
    the context, and queries are answered like Star's phase 2 (each host attends its KV, one merge).
    Neither uses ``block_size`` or ``anchor_size``, so ``config`` is optional for them (the defaults
    of the other fields apply). A context shorter than the ring's two chunks per host is encoded as
    one block on the last host (plain causal attention, exact too).

    ``sizes(length) -> (block_size, anchor_size)``: Star's block and anchor for a context of that length,
    instead of the config's (e.g. a quarter of each context, when contexts of different lengths share a
    batch through ``prefill([...])``).

    The model is switched to the ``star`` attention function only while an engine method runs; the
    user's ``model(...)`` and ``model.generate(...)`` are untouched between calls.
    """

    def __init__(self, model, config: StarConfig | None = None, group: "dist.ProcessGroup | None" = None, *,
                 attention: str = "star", sizes: "Callable[[int], tuple[int, int]] | None" = None):
        if attention not in ("star", "global", "ring"):
            raise StarInputError(f"attention must be 'star', 'global' or 'ring', got {attention!r}")
        if config is None and attention != "star":
            config = StarConfig(block_size=1)  # block and anchor are unused by global and ring attention
        if not isinstance(config, StarConfig):
            hint = (": Star Attention needs one, e.g. StarConfig(block_size=4096, anchor_size=4096)"
                    if config is None else "")
            raise StarInputError(f"config must be a star_sp.StarConfig, got {type(config).__name__}{hint}")
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if attention == "global" and self.world_size > 1:
            raise StarInputError("attention='global' is the plain model in one process: run it with one process "
                                 "(group=None, or a launcher with one process per node)")
        model = unwrap_adapters(model)
        check_model(model)
        register()
        self.model, self.config, self.group, self.attention = model, config, group, attention
        self.sizes = sizes  # (block, anchor) for a context of a given length (Star), instead of the config's
        self._compiled = None  # CompiledLayers, made at the first call with config.compile
        self.base = getattr(model, model.base_model_prefix)
        self.num_layers = model.config.num_hidden_layers
        self._cache_kwarg = _compat.cache_kwarg(self.base)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.stats: dict[str, float] = {}

    # -- helpers ------------------------------------------------------------------------------

    def _compiling(self):
        """The compiled decoder layers for one engine call (``StarConfig.compile``), or nothing."""
        choice = self.config.compile
        if not choice:
            return contextlib.nullcontext()
        if self._compiled is None:
            from .compiled import CompiledLayers

            self._compiled = CompiledLayers(self.base, "inductor" if choice is True else choice)
        return self._compiled.active()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _agree(self, step: str, meta: dict, error: str | None) -> None:
        agree_or_raise(self.group, step, meta, error)

    def _ring(self, context_len: int) -> bool:
        """Ring attention for this context: several hosts, each with two non-empty zigzag chunks."""
        return self.attention == "ring" and self.group is not None and context_len >= 2 * self.world_size

    def _config_for(self, context_len: int) -> StarConfig:
        if self.attention == "global" or (self.attention == "ring" and not self._ring(context_len)):
            # one block: phase 1 is plain causal attention (ring attention in one process, or over a
            # context too short to give every host two chunks, is just that, on the last host)
            return replace(self.config, block_size=context_len, anchor_size=1)
        if self.sizes is not None and self.attention == "star":
            block, anchor = self.sizes(context_len)
            return replace(self.config, block_size=block, anchor_size=anchor)
        return self.config

    def _forward(self, state, ids: torch.Tensor, positions: torch.Tensor, **kw):
        fn = self.model if kw.get("logits_to_keep") is not None else self.base
        positions = positions if positions.dim() == 2 else positions.unsqueeze(0)  # (B, S) or one row for all
        return fn(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                  use_cache=True, star=state, **{self._cache_kwarg: TransformersCache(state)}, **kw)

    # -- phase 1 ------------------------------------------------------------------------------

    @_with_star_attention
    def prefill(self, context_ids, *, progress=None) -> StarContext:
        """Phase 1: encode ``context_ids: LongTensor[B, Lc]`` (the whole context, on every rank).

        A context of fewer blocks than there are hosts is fine: the hosts past its blocks hold nothing
        and add nothing to the phase-2 merge (the last host, which answers, always holds the last block).
        ``progress(layer, num_layers)`` is called after each layer's attention.

        A list of contexts of different lengths (each ``(Lc_i,)`` or ``(1, Lc_i)``) is prefilled one after
        another, each with its own block layout, into one context of batch ``S``: their queries (one per
        context) then decode together, each attending its own context."""
        if isinstance(context_ids, (list, tuple)):
            return self._prefill_many(context_ids, progress)
        return self._prefill_one(context_ids, progress)

    def _prefill_many(self, contexts, progress) -> StarContext:
        error = None if contexts else "context_ids is an empty list: pass at least one context"
        for i, c in enumerate(contexts):
            if error is None and not (isinstance(c, torch.Tensor) and (c.dim() == 1 or (c.dim() == 2 and c.shape[0] == 1))):
                error = (f"context {i} of the list must be a LongTensor of token ids, shape (tokens,) or (1, tokens), "
                         f"got {type(c).__name__}" + (f" of shape {tuple(c.shape)}" if isinstance(c, torch.Tensor) else ""))
        self._agree("prefill", {"contexts": len(contexts) if error is None else None}, error)
        members, seconds = [], 0.0
        for c in contexts:
            members.append(self._prefill_one(c.reshape(1, -1), progress))
            seconds += self.stats["prefill_s"]
        longest = max(members, key=lambda m: m.context_len)
        context = replace(longest, batch_size=len(members), kv=ContextKV(self.num_layers), sequences=members,
                          fingerprint=hash(tuple(m.fingerprint for m in members)))
        self.stats = {"prefill_s": seconds, "context_tokens": sum(m.context_len for m in members),
                      "local_tokens": sum(m.layout.num_tokens for m in members),
                      "context_kv_bytes": sum(m.kv.nbytes() for m in members)}
        return context

    def _prefill_one(self, context_ids: torch.Tensor, progress) -> StarContext:
        error = check_ids("context_ids", context_ids, self.vocab_size) or dropout_error(self.model)
        limit = positions_limit(self.model.config)
        if error is None and isinstance(limit, int) and context_ids.shape[1] >= limit:
            error = (f"the context holds {context_ids.shape[1]} tokens, and the model has {limit} positions: no room "
                     "is left for a question; shorten the context")
        ids_hash = fingerprint(context_ids) if error is None else None
        layout = None
        ring = error is None and self._ring(context_ids.shape[1])
        if error is None:
            cfg = self._config_for(context_ids.shape[1])
            try:
                if ring:
                    layout = RingLayout(context_ids.shape[1], self.world_size, self.rank)
                else:
                    layout = BlockLayout.from_config(cfg, context_ids.shape[1], self.world_size, self.rank)
            except StarInputError as exc:
                error = str(exc)
        meta = {"shape": tuple(context_ids.shape) if error is None else None,
                "ids": ids_hash, "config": self.config.to_dict(),
                "attention": self.attention}
        self._agree("prefill", meta, error)
        cfg = self._config_for(context_ids.shape[1])
        recompute = cfg.anchor_source == "recompute"
        context = StarContext(layout=layout, config=cfg, batch_size=context_ids.shape[0],
                              kv=ContextKV(self.num_layers), group=self.group,
                              fingerprint=ids_hash, model_spec=model_spec(self.model), model_ref=weakref.ref(self.model))
        state = (RingPrefillPass if ring else PrefillPass)(context, self.num_layers, check=True, progress=progress)
        self._sync()
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if ring:
            self._forward(state, layout.shard(context_ids, 1), layout.positions())
        else:  # an idle host runs one stand-in row, which PrefillPass keeps none of
            rows = phase1_rows(layout, context_ids, recompute=recompute, context_loss=False, answer_from_last=False)
            self._forward(state, rows.ids, rows.positions)
        self._sync()
        self.stats = {"prefill_s": time.perf_counter() - start, "context_tokens": layout.context_len,
                      "local_tokens": layout.num_tokens, "context_kv_bytes": context.kv.nbytes()}
        return context

    # -- phase 2 ------------------------------------------------------------------------------

    def _holds_query(self, context: StarContext) -> bool:
        return context.group is None or context.layout.is_query_host

    def _check_query(self, step: str, context, query_ids, extra_error: str | None = None, *, listed: bool = False,
                     new_tokens: int = 0, **extra_meta) -> None:
        error = extra_error or check_ids("query_ids", query_ids, self.vocab_size) or dropout_error(self.model)
        if error is None and not isinstance(context, StarContext):
            error = f"context must be what prefill() returned, got {type(context).__name__}"
        if error is None:
            error = self._check_context_model(context)
        if error is None and context.sequences is not None and query_ids.shape[0] != context.batch_size:
            error = (f"the context holds {context.batch_size} contexts but {query_ids.shape[0]} queries came; pass one "
                     "query per context")
        if error is None and listed and context.batch_size != 1 and context.sequences is None:
            error = (f"a list of questions is asked of one context, but this one was prefilled with batch "
                     f"{context.batch_size}; prefill one context (batch 1)")
        limit = positions_limit(self.model.config)
        if error is None and isinstance(limit, int) and context.context_len + query_ids.shape[1] + new_tokens > limit:
            error = (f"the context ({context.context_len} tokens), the longest question ({query_ids.shape[1]}) and "
                     f"{new_tokens} new tokens need up to {context.context_len + query_ids.shape[1] + new_tokens} "
                     f"positions, more than the model's {limit}; shorten the context or the question, or ask for "
                     "fewer new tokens")
        if error is None and query_ids.shape[0] != context.batch_size and context.batch_size != 1:
            error = (f"query_ids has batch {query_ids.shape[0]} but the context was prefilled with batch "
                     f"{context.batch_size}; pass one query per context sequence, or prefill one context "
                     "(batch 1) to ask it several questions")
        if error is None and context.group is not self.group:
            error = "this context was prefilled by an engine with another process group"
        meta = {"shape": tuple(query_ids.shape) if error is None else None,
                "ids": fingerprint(query_ids) if error is None else None,
                "context": context.fingerprint if error is None else None, **extra_meta}
        self._agree(step, meta, error)

    def _check_context_model(self, context: StarContext) -> str | None:
        """The context's KV must come from this engine's model (same weights, shapes, dtype, device)."""
        mine = model_spec(self.model)
        if context.model_spec != mine:
            diff = ", ".join(f"{k} {context.model_spec.get(k)} (here {mine[k]})"
                             for k in mine if context.model_spec.get(k) != mine[k])
            return (f"this context was prefilled with another model: {diff}; prefill the context with this "
                    "engine's model")
        if context.model_ref is None or context.model_ref() is not self.model:
            return ("this context was prefilled with another model object (same shapes, other weights); "
                    "prefill the context with this engine's model")
        return None

    @_with_star_attention
    def score(self, context: StarContext, query_ids) -> "torch.Tensor | list[torch.Tensor]":
        """Logits ``FloatTensor[B, Lq, vocab]`` at the query positions; the context is left unchanged.

        Several questions over one context (prefilled with batch 1): ``query_ids (Q, Lq)``, or a list of
        ``Q`` questions of different lengths, which gives a list of ``FloatTensor[1, L_i, vocab]``. The
        context's KV is read once for all of them."""
        listed = isinstance(query_ids, (list, tuple))
        query_ids, starts, error = questions(query_ids)
        self._check_query("score", context, query_ids, error, listed=listed)
        lq = query_ids.shape[1]
        query_kv = None
        if self._holds_query(context):
            query_kv = QueryKV(self.num_layers, lq, None if starts is None else starts.to(self.device))
        state = QueryPass(context, self.num_layers, query_kv, check=False)
        positions = query_positions(context.context_lens, lq, starts)
        logits = self._forward(state, query_ids, positions, logits_to_keep=0).logits.float()
        if starts is None:
            return logits
        return [logits[i:i + 1, int(starts[i]):] for i in range(len(starts))]

    @_with_star_attention
    def generate(self, context: StarContext, query_ids, max_new_tokens: int, *,
                 sampling: SamplingConfig | None = None, eos_token_id: int | list[int] | None = None,
                 stop_strings: list[str] | None = None, tokenizer=None, pad_token_id: int | None = None,
                 ) -> torch.Tensor:
        """Phase 2 and decoding. Returns the new tokens, ``LongTensor[B, T]`` with ``T <= max_new_tokens``;
        a sequence that stopped early (EOS or a stop string) is padded with ``pad_token_id`` (default:
        the first EOS id, else 0). The same tokens come back on every rank.

        Several questions over one context (prefilled with batch 1): ``query_ids (Q, Lq)``, or a list of
        ``Q`` questions of different lengths; they decode together, each step reading the context's KV
        once for all of them, and each question stops on its own."""
        sampling = sampling or SamplingConfig()
        listed = isinstance(query_ids, (list, tuple))
        query_ids, starts, error = questions(query_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            error = f"max_new_tokens must be a positive integer, got {max_new_tokens!r}"
        elif stop_strings and tokenizer is None:
            error = "stop_strings need a tokenizer to read the generated text: pass tokenizer="
        mode, why_not = (self._decode_mode(context, max_new_tokens) if isinstance(context, StarContext)
                         else ("plain", None))  # a bad context: _check_query says so on every rank
        error = error or why_not
        if error is None and isinstance(query_ids, torch.Tensor):
            error = sampling.seeds_error(query_ids.shape[0])
        self._check_query("generate", context, query_ids, error, listed=listed,
                          new_tokens=max_new_tokens if isinstance(max_new_tokens, int) else 0,
                          max_new_tokens=max_new_tokens,
                          sampling=repr(sampling), eos=repr(eos_token_id), stop=repr(stop_strings), pad=pad_token_id)
        stop = StopRule.make(eos_token_id, pad_token_id, stop_strings, tokenizer)
        batch, lq = query_ids.shape
        holds = self._holds_query(context)
        query_kv = None
        if holds:
            on_device = None if starts is None else starts.to(self.device)
            query_kv = (QueryKV(self.num_layers, lq + max_new_tokens, on_device) if mode == "plain"
                        else StaticQueryKV(self.num_layers, lq + max_new_tokens, self.device, on_device))
        positions = query_positions(context.context_lens, lq, starts)  # the query rows'; then one per step
        decode = _Decode(self, context, query_kv, holds, mode, positions)
        self._sync()
        start = time.perf_counter()
        tokens, first = decode_tokens(decode.logits, query_ids, max_new_tokens, holds=holds, group=context.group,
                                      src=self.world_size - 1, device=self.device, sampling=sampling, stop=stop,
                                      timeout_s=context.config.collective_timeout_s, sync=self._sync)
        self._sync()
        end = time.perf_counter()
        n = tokens.shape[1]
        decode_s = end - first - decode.setup_s  # per-token rate: without the one-off capture
        self.stats.update({"first_token_s": first - start, "new_tokens": n,
                           "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
                           "generate_s": end - start, "decode_mode": decode.used_mode, "decode_setup_s": decode.setup_s})
        if self.device.type == "cuda":
            self.stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return tokens

    def _decode_step(self, context, query_kv, batch: int, pos: int, mode: str) -> DecodeStep:
        """The request's fixed-shape step; with ``decode_graphs='auto'`` a capture that fails (a model whose
        forward synchronises with the host, say) falls back to the same step without a graph, once. With
        several processes the ranks share their captures' outcome first (``first_failure``): a capture
        that failed on any rank makes every rank fall back, or, under ``'on'``, raise the same error,
        so no rank replays a graph whose collectives the others do not run."""
        if mode != "graph":
            return DecodeStep(self, context, query_kv, batch, pos, capture=False)
        step, error, failure = None, None, None
        try:
            step = DecodeStep(self, context, query_kv, batch, pos, capture=True)
        except WarmUpError as exc:  # the step's own run failed, collectives part-way: the request's error
            with guarded_step("decode", context.group):  # the other ranks hear of it through the guard
                raise exc.__cause__ from None
        except Exception as exc:  # noqa: BLE001 - any capture failure: see above
            failure, error = exc, f"{type(exc).__name__}: {str(exc)[:200]}"
        if context.group is not None:
            with guarded_step("decode capture", context.group):
                error = first_failure(context.group, error)
        if error is None:
            return step
        if context.config.decode_graphs == "on":
            if failure is not None and context.group is None:
                raise failure
            failed = StarError(f"decode_graphs='on': capturing the decode step failed on {error}; use "
                               "decode_graphs='auto' (falls back without a graph) or 'static'")
            failed.on_every_rank = context.group is not None  # first_failure: the same outcome on every rank
            raise failed
        warnings.warn(f"decode_graphs='auto': capturing the decode step failed ({error}); decoding without a "
                      "graph. decode_graphs='static' or 'off' skips the attempt", RuntimeWarning, stacklevel=3)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return DecodeStep(self, context, query_kv, batch, pos, capture=False)

    def _decode_mode(self, context: StarContext, max_new_tokens) -> tuple[str, str | None]:
        """``("plain" | "static" | "graph", error)`` for a request, from ``decode_graphs``. Graphs capture
        on CUDA in one process, and, under ``'on'``, across processes whose group runs NCCL (the
        phase-2 merge's all-reduce is captured with the step); ``'auto'`` with several processes decodes
        plainly (a fresh forward per token) until that capture has been measured on several GPUs."""
        choice = context.config.decode_graphs
        cuda, alone = self.device.type == "cuda", context.group is None
        nccl = not alone and "nccl" in str(dist.get_backend(context.group))  # "nccl", "cpu:gloo,cuda:nccl"
        if choice == "on" and not (cuda and (alone or nccl)):
            where = "the model is on " + self.device.type if not cuda else "the processes' group runs " + \
                dist.get_backend(context.group)
            return "plain", ("decode_graphs='on' captures CUDA graphs on CUDA devices, in one process or across "
                             f"processes over NCCL; here {where}. Use decode_graphs='auto' (graphs where they can "
                             "run) or 'static'")
        if choice == "on" or (choice == "auto" and cuda and alone and isinstance(max_new_tokens, int)
                              and max_new_tokens >= DECODE_GRAPH_MIN_TOKENS):
            return "graph", None
        return ("static" if choice == "static" else "plain"), None


class _Decode:
    """The engine's forward of one decode step, for ``decode_tokens``: step 0 runs the question rows through
    a ``QueryPass``; later steps run one token per sequence, plainly (a fresh forward per token) or, from
    step 1 on, through the request's fixed-shape ``DecodeStep`` (``mode`` "static" or "graph")."""

    def __init__(self, engine: StarEngine, context: StarContext, query_kv, holds: bool, mode: str,
                 positions: torch.Tensor):
        self.engine, self.context, self.query_kv, self.holds, self.mode = engine, context, query_kv, holds, mode
        self.positions = positions
        self.pos = context.context_len  # the next position, when every sequence has the same
        self.ends = None if positions.dim() == 1 else positions[:, -1] + 1  # else each sequence's next one
        self.step_fn: DecodeStep | None = None
        self.setup_s = 0.0

    def logits(self, step: int, ids: torch.Tensor) -> torch.Tensor | None:
        """The last row's logits ``(B, V)`` on the query host, None elsewhere."""
        engine, holds = self.engine, self.holds
        if step and self.mode != "plain" and self.step_fn is None:  # fixed-shape steps from here on
            set_up = time.perf_counter()
            if self.query_kv is not None:
                self.query_kv.mark_filled()
            self.step_fn = engine._decode_step(self.context, self.query_kv, ids.shape[0],
                                               self.pos if self.ends is None else self.ends, self.mode)
            self.mode = "graph" if self.step_fn.graph is not None else "static"
            engine._sync()
            self.setup_s = time.perf_counter() - set_up
        if self.step_fn is not None:
            logits = self.step_fn(ids.to(engine.device))
        else:
            state = QueryPass(self.context, engine.num_layers, self.query_kv, check=False)
            if step:
                self.positions = torch.arange(self.pos, self.pos + 1) if self.ends is None else self.ends[:, None]
            out = engine._forward(state, ids, self.positions, **({"logits_to_keep": 1} if holds else {}))
            logits = out.logits[:, -1] if holds else None
        if step and self.ends is not None:
            self.ends = self.ends + 1
        self.pos += ids.shape[1]
        return logits

    @property
    def used_mode(self) -> str:
        """How the steps after the first ran: "plain", "static" or "graph"."""
        return self.mode if self.step_fn is not None else "plain"
