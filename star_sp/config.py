"""One validated configuration for Star Attention (``StarConfig``)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Literal

from .errors import StarInputError

AnchorSource = Literal["broadcast", "recompute"]
Backend = Literal["auto", "cpu", "flash", "cudnn", "efficient", "math"]

# The choices a user can name, in one place: the command line, the run configs, the job settings and the
# adapters all read these (a training job takes the subsets that train: float64 and float16 do not, and
# ring attention has no training loss in transformers).
ANCHOR_SOURCES: tuple[str, ...] = ("broadcast", "recompute")
BACKENDS: tuple[str, ...] = ("auto", "cpu", "flash", "cudnn", "efficient", "math")
DECODE_GRAPHS: tuple[str, ...] = ("auto", "on", "off", "static")
DECODE_KERNELS: tuple[str, ...] = ("torch", "triton")
PHASE2_MERGES: tuple[str, ...] = ("allreduce", "allgather")
ATTENTIONS: tuple[str, ...] = ("star", "global", "ring")
TRAIN_ATTENTIONS: tuple[str, ...] = ("star", "global")
DTYPES: tuple[str, ...] = ("auto", "float32", "float64", "bfloat16", "float16")
TRAIN_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
DECODE_GRAPH_MIN_TOKENS = 8
MAX_COLLECTIVE_TIMEOUT_S = 10 ** 9
"""The longest ``collective_timeout_s`` (about 31 years). Torch's collectives set a deadline of the wall clock
plus the timeout in int64 nanoseconds since 1970, which overflows about 7.4e9 s from now: a longer
timeout makes gloo time out at once or wait for ever."""


def is_integer(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (it may be infinite or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_block_anchor(block_size: object, anchor_size: object) -> None:
    """The one check of block and anchor sizes, used by ``StarConfig``, ``BlockLayout`` and
    ``ops.star_attention``: ``block_size >= 1`` and ``0 <= anchor_size <= block_size``, both integers
    (``anchor_size`` 0: no anchor, an ablation). Raises ``StarInputError`` naming the value and the fix."""
    if not is_integer(block_size) or block_size <= 0:
        raise StarInputError(f"block_size must be a positive integer (a number of tokens), got {block_size!r}")
    if not is_integer(anchor_size) or anchor_size < 0:
        raise StarInputError(f"anchor_size must be a non-negative integer (0: no anchor, an ablation), "
                             f"got {anchor_size!r}")
    if anchor_size > block_size:
        raise StarInputError(f"anchor_size ({anchor_size}) must not exceed block_size ({block_size}); "
                             "lower anchor_size or raise block_size")


@dataclass(frozen=True, kw_only=True)
class StarConfig:
    """How Star Attention cuts and encodes a context.

    Checks run in ``__post_init__``; every bad value raises ``StarInputError`` (a ``ValueError``)
    naming the valid choices.
    """

    block_size: int
    """Tokens per context block (``b``). The last block may be shorter; it is never padded."""

    anchor_size: int | None = None
    """Tokens of the anchor (``a``), the context's first tokens, ``0 <= a <= block_size``.
    ``None`` means ``block_size``, as in the paper; ``0`` means no anchor at all (every block encoded
    alone: the ablation that shows what the anchor is for, outside the paper's ``1 <= a``)."""

    anchor_source: AnchorSource = "broadcast"
    """Where a host that does not own block 0 gets the anchor's KV in phase 1: ``"broadcast"`` (the
    owner of block 0 sends it layer by layer; the anchor never runs through the other hosts' linear
    layers) or ``"recompute"`` (every host encodes ``[anchor; block]`` itself, the paper's form)."""

    phase2_merge: Literal["allreduce", "allgather"] = "allreduce"
    """How hosts merge phase-2 results: one max and one sum all-reduce of numerators and denominators
    (default), or ``"allgather"``, the paper's reference form (every output and LSE to every host).
    With ``anchor_source="recompute"`` it makes the paper's form of Star Attention, for comparison."""

    backend: Backend = "auto"
    """Attention kernel: ``"auto"`` picks the fastest that supports the inputs (cuDNN, then flash,
    then memory-efficient on CUDA; the fused CPU kernel on CPU); any other name is used or refused,
    never replaced silently."""

    collective_timeout_s: float = 600.0
    """Seconds a group-wide step may wait for the other ranks before every rank raises; finite, at most
    ``MAX_COLLECTIVE_TIMEOUT_S``."""

    decode_graphs: Literal["auto", "on", "off", "static"] = "auto"
    """How decode steps run. ``"auto"``: as one captured CUDA graph per request, replayed per token,
    in one process on CUDA when at least ``DECODE_GRAPH_MIN_TOKENS`` tokens may be generated; plainly
    otherwise. ``"on"``: always captured, in one process or across processes over NCCL, with phase 2's
    all-reduce merge inside the graph (an error elsewhere: CPU, gloo; the ranks share the capture's
    outcome, so a failure on one raises on all).
    ``"off"``: plainly, a fresh forward per token. ``"static"``: the capturable step (fixed shapes,
    device-side positions) run without capture, on any device and any number of processes."""

    decode_kernel: Literal["torch", "triton"] = "torch"
    """The attention of a fixed-shape decode step (``decode_graphs`` other than ``"off"``): ``"torch"``,
    the context's KV and the step's own attended apart and merged; ``"triton"``, both in one split-KV
    pass (``ops/decode_kernel.py``; needs triton, CUDA tensors). Not yet measured against ``"torch"``.
    A batch of several contexts of different lengths (``prefill`` of a list) decodes with ``"torch"``."""

    compile: bool | str = False
    """Fuse the model's own element-wise work (norms, rotary embedding, activations, residual adds) with
    ``torch.compile`` around Star's attention, in prefill and decoding (``integrations/hf/compiled.py``):
    ``True`` (the ``inductor`` backend) or a ``torch.compile`` backend's name. Compiled once per engine
    and layer, for every length (dynamic shapes); a model it cannot compile runs as it is, with one
    warning. The compile time is reported apart (``engine.stats["compile_s"]``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise StarInputError(f"compile must be True, False or a torch.compile backend name, got {self.compile!r}")
        check_block_anchor(self.block_size, self.block_size if self.anchor_size is None else self.anchor_size)
        if self.anchor_source not in ANCHOR_SOURCES:
            raise StarInputError(f"anchor_source must be one of {ANCHOR_SOURCES}, got {self.anchor_source!r}")
        if self.phase2_merge not in PHASE2_MERGES:
            raise StarInputError(f"phase2_merge must be 'allreduce' or 'allgather', got {self.phase2_merge!r}")
        if self.backend not in BACKENDS:
            raise StarInputError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.decode_graphs not in DECODE_GRAPHS:
            raise StarInputError(f"decode_graphs must be one of {DECODE_GRAPHS}, got {self.decode_graphs!r}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise StarInputError(f"decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}")
        if self.decode_kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise StarInputError("decode_kernel='triton' needs the triton package: pip install triton (or use "
                                 "decode_kernel='torch')")
        timeout = self.collective_timeout_s
        if not is_number(timeout) or not 0 < timeout <= MAX_COLLECTIVE_TIMEOUT_S:  # NaN fails the comparison
            raise StarInputError(f"collective_timeout_s must be a positive number of seconds, at most "
                                 f"{MAX_COLLECTIVE_TIMEOUT_S:.0e} (about 31 years: torch's collective deadlines "
                                 f"overflow beyond that), got {timeout!r}")

    @property
    def anchor(self) -> int:
        """The anchor size in tokens, with ``None`` resolved to ``block_size``."""
        return self.block_size if self.anchor_size is None else self.anchor_size

    def to_dict(self) -> dict:
        return asdict(self)
