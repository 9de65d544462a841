"""StarConfig validation and BlockLayout arithmetic (bugs here misplace tokens on every path)."""

import pytest
import torch

from star_sp import BlockLayout, StarConfig, StarInputError


@pytest.mark.parametrize("kw, words", [
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(block_size=-3), "block_size must be a positive integer"),
    (dict(block_size=2.5), "block_size must be a positive integer"),
    (dict(block_size=True), "block_size must be a positive integer"),
    (dict(block_size=8, anchor_size=-1), "anchor_size must be a non-negative integer"),
    (dict(block_size=8, anchor_size=9), "must not exceed block_size"),
    (dict(block_size=8, anchor_source="everywhere"), "anchor_source must be one of"),
    (dict(block_size=8, backend="fastest"), "backend must be one of"),
    (dict(block_size=8, collective_timeout_s=0), "collective_timeout_s"),
])
def test_config_rejects_bad_values(kw, words):
    with pytest.raises(StarInputError, match=words):
        StarConfig(**kw)


@pytest.mark.parametrize("block, anchor, words", [
    (0, 0, "block_size must be a positive integer (a number of tokens), got 0"),
    (2.5, 1, "block_size must be a positive integer (a number of tokens), got 2.5"),
    (True, 1, "block_size must be a positive integer (a number of tokens), got True"),
    (8, -1, "anchor_size must be a non-negative integer (0: no anchor, an ablation), got -1"),
    (8, 1.5, "anchor_size must be a non-negative integer (0: no anchor, an ablation), got 1.5"),
    (8, False, "anchor_size must be a non-negative integer (0: no anchor, an ablation), got False"),
    (8, 9, "anchor_size (9) must not exceed block_size (8); lower anchor_size or raise block_size"),
])
def test_block_and_anchor_are_checked_in_one_place_with_one_message(block, anchor, words):
    """StarConfig, BlockLayout and ops.star_attention refuse a bad block or anchor size with the same
    message (one check, ``config.check_block_anchor``), which names the value and how to fix it."""
    from star_sp.ops import star_attention

    q = torch.zeros(1, 1, 10, 4)
    for call in (lambda: StarConfig(block_size=block, anchor_size=anchor), lambda: BlockLayout(10, block, anchor),
                 lambda: star_attention(q, q, q, context_len=10, block_size=block, anchor_size=anchor)):
        with pytest.raises(StarInputError) as got:
            call()
        assert str(got.value) == words


def test_config_defaults():
    c = StarConfig(block_size=64)
    assert c.anchor == 64 and StarConfig(block_size=64, anchor_size=16).anchor == 16
    with pytest.raises(TypeError):
        StarConfig(64)  # keyword-only: no silent swap of block and anchor


@pytest.mark.parametrize("kw, words", [
    (dict(context_len=0, block_size=4, anchor_size=4), "context is empty"),
    (dict(context_len=10, block_size=4, anchor_size=5), "must not exceed"),
    (dict(context_len=10, block_size=4, anchor_size=4, world_size=2, rank=2), "rank must be in"),
    (dict(context_len=10, block_size=4, anchor_size=4, world_size=0), "world_size"),
])
def test_layout_rejects_bad_values(kw, words):
    with pytest.raises(StarInputError, match=words):
        BlockLayout(**kw)


@pytest.mark.parametrize("context_len", [1, 5, 13, 16, 17, 61])
@pytest.mark.parametrize("block_size", [1, 4, 7, 16, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_layout_partitions_context(context_len, block_size, world_size):
    layouts = [BlockLayout(context_len, block_size, min(3, block_size), world_size, r) for r in range(world_size)]
    n = -(-context_len // block_size)
    assert layouts[0].num_blocks == n
    # contiguous, in order, covering every token exactly once, no padding
    covered = []
    for lay in layouts:
        s, e = lay.token_range
        covered += list(range(s, e))
        assert lay.num_tokens == sum(lay.block_lengths) == e - s
        assert lay.is_idle == (e == s)
        assert torch.equal(lay.positions(), torch.arange(s, e))
    assert covered == list(range(context_len))
    # balanced to one block; the last rank holds the final block; exactly one anchor owner
    counts = [len(lay.blocks) for lay in layouts]
    assert max(counts) - min(counts) <= 1
    assert layouts[-1].is_query_host and (n - 1) in layouts[-1].blocks
    owners = [lay.rank for lay in layouts if lay.owns_anchor]
    assert owners == [layouts[0].anchor_owner] and 0 in layouts[owners[0]].blocks
    assert sum(lay.is_idle for lay in layouts) == max(0, world_size - n)
    # the ragged last block is kept exactly
    assert layouts[0].block_range(n - 1)[1] == context_len
    assert layouts[0].block_range(n - 1)[1] - layouts[0].block_range(n - 1)[0] == context_len - (n - 1) * block_size


def test_layout_more_hosts_than_blocks_and_recompute_rows():
    lays = [BlockLayout(10, 6, 4, 4, r) for r in range(4)]
    assert [list(lay.blocks) for lay in lays] == [[], [0], [], [1]]
    assert lays[1].owns_anchor and lays[3].needs_anchor and not lays[0].needs_anchor
    assert lays[3].anchor_rows(recompute=True) == 4 and lays[3].anchor_rows(recompute=False) == 0
    assert lays[1].anchor_rows(recompute=True) == 0
    assert lays[3].positions(recompute=True).tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    # a context shorter than the anchor: the anchor is the whole (single) block
    assert BlockLayout(3, 8, 8).anchor_len == 3


def test_layout_shard_checks_length():
    lay = BlockLayout(10, 4, 2, 2, 1)
    x = torch.arange(10).view(1, 10)
    assert lay.shard(x, 1).tolist() == [[4, 5, 6, 7, 8, 9]]
    with pytest.raises(StarInputError, match="expected 10 context tokens"):
        lay.shard(torch.arange(9).view(1, 9), 1)


def test_run_config_carries_decode_graphs(tmp_path):
    """``decode_graphs`` from a TOML run config and from the command line reaches StarConfig; a bad
    value is refused with the valid choices."""
    from star_sp.apps.runconfig import RunConfig

    path = tmp_path / "run.toml"
    path.write_text('model = "m"\nblock_size = 8\ndecode_graphs = "static"\n')
    assert RunConfig.load(str(path), {}).star_config().decode_graphs == "static"
    assert RunConfig.load(str(path), {"decode_graphs": "off"}).star_config().decode_graphs == "off"
    assert RunConfig(model="m").star_config().decode_graphs == "auto"
    path.write_text('model = "m"\ndecode_graphs = "always"\n')
    with pytest.raises(StarInputError, match="decode_graphs must be one of"):
        RunConfig.load(str(path), {})
