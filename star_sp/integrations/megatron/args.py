"""Command-line flags that select Star Attention in a Megatron-core GPT model.

    parser = add_star_args(argparse.ArgumentParser())     # or Megatron-LM: pretrain(..., extra_args_provider=add_star_args)
    args = parser.parse_args()
    spec = star_spec_from_args(args, get_gpt_layer_local_spec())   # None: keep Megatron's own attention

Flags: ``--attention {global,star,ring}`` (default: Megatron's own attention, untouched),
``--star-block-size`` and ``--star-anchor-size`` (tokens; the anchor defaults to the block),
``--star-anchor-source {broadcast,recompute}``. The context-parallel size is Megatron's
``--context-parallel-size``: the CP group is Star's group. ``check_star_args(args, world_size,
sequence_length)`` turns a bad combination into one line (``StarInputError``) before anything is built.
"""

from __future__ import annotations

import argparse

from ...config import ANCHOR_SOURCES, ATTENTIONS, StarConfig
from ...errors import StarInputError


def add_star_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Star flags to ``parser`` (in a group of their own) and return it."""
    g = parser.add_argument_group("star attention (star-sp)")
    g.add_argument("--attention", choices=ATTENTIONS, default=None,
                   help="core attention: star (Star Attention over the context-parallel group), global (exact, "
                        "one block), ring (exact ring attention); default: Megatron's own")
    g.add_argument("--star-block-size", type=int, default=None, help="context tokens per block (required for star)")
    g.add_argument("--star-anchor-size", type=int, default=None,
                   help="anchor tokens: the context's first tokens that every block attends (default: the block size; "
                        "0 for none)")
    g.add_argument("--star-anchor-source", choices=ANCHOR_SOURCES, default="broadcast",
                   help="the anchor's KV computed once and broadcast, or recomputed on every rank")
    return parser


def star_config_from_args(args) -> StarConfig | None:
    """The ``StarConfig`` of the parsed flags (None without ``--attention``); one line for a bad one."""
    attention = getattr(args, "attention", None)
    if attention is None:
        return None
    block = args.star_block_size
    if attention == "star" and block is None:
        raise StarInputError("--attention star needs --star-block-size (tokens per block, e.g. 4096)")
    if block is not None and (isinstance(block, bool) or block < 1):
        raise StarInputError(f"--star-block-size must be a positive number of tokens, got {block}")
    block = block or 1  # global and ring: the module uses one block (the sizes are not read)
    anchor = block if args.star_anchor_size is None else args.star_anchor_size
    if anchor < 0 or anchor > block:
        raise StarInputError(f"--star-anchor-size must be between 0 and the block size ({block}), got {anchor}")
    return StarConfig(block_size=block, anchor_size=anchor, anchor_source=args.star_anchor_source)


def check_star_args(args, world_size: int, sequence_length: int | None = None) -> None:
    """One line for a context-parallel size that does not divide the world, or a sequence shorter than
    one token per CP rank (``--attention star``)."""
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp < 1 or world_size % cp:
        raise StarInputError(f"--context-parallel-size {cp} must divide the number of processes ({world_size}); "
                             "each context-parallel group is one Star group")
    if getattr(args, "attention", None) and sequence_length is not None and sequence_length < cp:
        raise StarInputError(f"a sequence of {sequence_length} tokens is shorter than one token per "
                             f"context-parallel rank ({cp}); use longer sequences or a smaller --context-parallel-size")


def star_spec_from_args(args, spec):
    """The layer spec for the parsed flags: ``spec`` with Star's core attention, or ``spec`` itself
    without ``--attention``."""
    config = star_config_from_args(args)
    if config is None:
        return spec
    from .attention import star_layer_spec

    return star_layer_spec(spec, config, args.attention)


__all__ = ["add_star_args", "check_star_args", "star_config_from_args", "star_spec_from_args"]
