"""Star Attention in Megatron-core GPT models, on CPU with gloo, context parallelism 1-3: the loss and
every parameter's gradient against the float64 oracle (the same weights through Megatron's own layers
under the dense ``M_star`` mask), greedy tokens against the oracle's, and block >= sequence against
Megatron's own ``DotProductAttention``.

Tolerance: both sides run in float64 and differ only in the order of the attention's sums (the merge
of blocks' parts and of the ranks' partial results; about 1e-15 relative per step), so 1e-9 leaves
six orders of magnitude for accumulation through two layers and the loss.
"""

import re

import pytest
import torch

megatron = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install star-sp[megatron])")

import megatron_common as mc  # noqa: E402

TOL = 1e-9

CASES = [  # (lc, lt, block, anchor, anchor source, context loss weight): awkward sizes
    dict(lc=23, lt=5, block=8, anchor=3, anchor_source="broadcast", weight=0.3, batch=2),   # short last block
    dict(lc=21, lt=4, block=8, anchor=8, anchor_source="recompute", weight=0.0, batch=1),   # anchor = block
    dict(lc=6, lt=3, block=4, anchor=0, anchor_source="broadcast", weight=0.5, batch=2),    # anchor 0, lc < a + b
    dict(lc=5, lt=3, block=4, anchor=4, anchor_source="broadcast", weight=0.2, batch=1),    # lc < anchor + block
]


def _check_train(results):
    for r in results:
        assert r["loss_error"] < TOL, r["loss_error"]
        worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, worst
    assert len({r["loss"] for r in results}) == 1  # the same loss on every rank


@pytest.mark.parametrize("case", range(len(CASES)))
def test_one_rank_gradients_equal_the_oracle(cluster, case):
    _check_train(cluster(1).run(mc.train_step, CASES[case]))


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_context_parallel_gradients_equal_the_oracle(cluster, n, case):
    _check_train(cluster(n).run(mc.train_step, CASES[case]))


@pytest.mark.parametrize("n", [1, 2])
def test_logits_a_chunk_at_a_time_keep_the_oracle_gradients(cluster, n):
    """``loss_chunk_tokens=3`` (fewer than the rows the loss reads, with the context loss on): the output
    layer never sees more than 3 rows, forward or backward, and the gradients are the oracle's."""
    results = cluster(n).run(mc.train_step, dict(CASES[0], chunk=3))
    _check_train(results)
    for r in results:
        assert r["head_rows"] and max(r["head_rows"]) <= 3, r["head_rows"]


RECOMPUTE = {  # Megatron's recomputation settings, run by star_recompute as torch's non-reentrant checkpoint
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),  # core attention (Star's module)
    "selective-mlp": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
}
RECOMPUTED_CALLS = {"full": 2, "full-block": 1, "selective": 2, "selective-mlp": 2}  # of the model's 2 layers


@pytest.mark.parametrize("n,recompute,case", [(1, "full", 0), (2, "full", 0), (3, "full", 0), (1, "selective", 1),
                                              (2, "selective", 1), (3, "selective", 1), (2, "full-block", 3),
                                              (2, "selective-mlp", 2)])
def test_gradients_with_megatrons_recomputation_equal_the_oracle(cluster, n, recompute, case):
    """``recompute_granularity`` full and selective: each recomputed layer calls Star's module a second
    time in the backward pass (without collectives), and the gradients are the oracle's."""
    results = cluster(n).run(mc.train_step, dict(CASES[case], recompute=RECOMPUTE[recompute]))
    _check_train(results)
    for r in results:
        calls = r["attention_calls"]
        assert len(calls) == 2 + RECOMPUTED_CALLS[recompute] and all(grad for _, grad in calls), calls


@pytest.mark.parametrize("n", [1, 2])
def test_offloading_what_megatrons_recomputation_keeps_equals_the_oracle(cluster, n):
    """``offload_activations``: every checkpoint's inputs (True), or the first one's (1), wait in host
    memory; the gradients stay the oracle's."""
    for offload, checkpoints in ((True, [0, 1]), (1, [0])):
        results = cluster(n).run(mc.train_step, dict(CASES[0], recompute=RECOMPUTE["full"], offload=offload))
        _check_train(results)
        for r in results:
            assert r["offloaded"]["checkpoints"] == checkpoints and r["offloaded"]["bytes"] > 0, r["offloaded"]


def test_recomputation_that_cannot_run_under_star_is_one_line(cluster):
    from types import SimpleNamespace

    from star_sp.integrations.megatron.recompute import recompute_error

    ring = dict(CASES[0], attention="ring", recompute=RECOMPUTE["full"], bad_labels=False)
    results = cluster(2).run(mc.bad_train, ring)
    assert all("attention='ring' does not recompute" in r for r in results) and len(set(results)) == 1, results
    for config, message in ((dict(recompute_modules=["core_attn", "moe_act"]), r"selective recomputation of "
                             r"\['moe_act'\] is not supported under Star; recompute_modules may hold"),
                            (dict(fp8="hybrid"), "TransformerEngine's checkpoint"),
                            (dict(distribute_saved_activations=True), "distribute_saved_activations is not")):
        assert re.search(message, recompute_error(SimpleNamespace(recompute_granularity="selective", **config)))
    assert recompute_error(SimpleNamespace(recompute_granularity=None, fp8="hybrid")) is None
    no_recompute = dict(CASES[0], offload=True, bad_labels=False)
    (line,) = cluster(1).run(mc.bad_train, no_recompute)
    assert "offload_activations offloads what activation recomputation keeps; set the model's" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["global", "ring"])
def test_global_and_ring_gradients_equal_the_causal_oracle(cluster, attention):
    spec = dict(CASES[0], attention=attention)
    _check_train(cluster(3).run(mc.train_step, spec))
    _check_train(cluster(1).run(mc.train_step, spec))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("questions", [False, True])
def test_prefill_and_greedy_decode_equal_the_oracle(cluster, n, questions):
    spec = dict(CASES[0], lt=4, new=5, questions=questions)  # questions: several over one context
    for r in cluster(n).run(mc.generate, spec):
        assert torch.equal(r["tokens"], r["oracle"]), (r["tokens"], r["oracle"])


@pytest.mark.slow
def test_ring_prefill_and_decode_equal_the_causal_oracle(cluster):
    spec = dict(CASES[0], lt=4, new=4, attention="ring")
    for r in cluster(2).run(mc.generate, spec):
        assert torch.equal(r["tokens"], r["oracle"])


def test_one_block_equals_megatrons_own_dot_product_attention(cluster):
    """Block >= sequence: Star is causal attention, so it must equal the stock local spec's module."""
    (error,) = cluster(1).run(mc.one_block_against_stock)
    assert error < TOL, error


def test_bad_input_on_one_rank_is_one_error_on_every_rank(cluster):
    results = cluster(2).run(mc.bad_train, CASES[0], 1)
    assert all("outside the model's vocabulary" in r for r in results), results
    assert len(set(results)) == 1


def test_bad_settings_are_refused_in_one_line():
    from star_sp import StarConfig, StarInputError
    from star_sp.integrations.megatron import star_layer_spec

    with pytest.raises(StarInputError, match="must be a star_sp.StarConfig"):
        star_layer_spec(object(), None)
    with pytest.raises(StarInputError, match="attention must be one of"):
        star_layer_spec(object(), StarConfig(block_size=8, anchor_size=2), attention="flash")
    with pytest.raises(StarInputError, match="core_attention slot"):
        star_layer_spec(object(), StarConfig(block_size=8, anchor_size=2))


def test_flags_give_the_spec_and_bad_ones_one_line():
    import argparse

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from star_sp import StarInputError
    from star_sp.integrations.megatron import StarCoreAttention
    from star_sp.integrations.megatron.args import add_star_args, check_star_args, star_spec_from_args

    parser = add_star_args(argparse.ArgumentParser())
    local = get_gpt_layer_local_spec()
    spec = star_spec_from_args(parser.parse_args(["--attention", "star", "--star-block-size", "64",
                                                  "--star-anchor-size", "16"]), local)
    slot = spec.submodules.self_attention.submodules.core_attention
    assert slot.module is StarCoreAttention and slot.params["star"].anchor_size == 16
    assert slot.params["attention"] == "star"
    assert star_spec_from_args(parser.parse_args([]), local) is local  # Megatron's own attention, untouched
    for argv, message in ((["--attention", "star"], "needs --star-block-size"),
                          (["--attention", "star", "--star-block-size", "0"], "positive number"),
                          (["--attention", "star", "--star-block-size", "8", "--star-anchor-size", "9"],
                           "between 0 and the block size")):
        with pytest.raises(StarInputError, match=message):
            star_spec_from_args(parser.parse_args(argv), local)
    args = parser.parse_args(["--attention", "star", "--star-block-size", "8"])
    args.context_parallel_size = 3
    with pytest.raises(StarInputError, match="must divide the number of processes"):
        check_star_args(args, 4)
    with pytest.raises(StarInputError, match="shorter than one token per"):
        check_star_args(args, 3, sequence_length=2)
    check_star_args(args, 6, sequence_length=3)


@pytest.mark.slow
def test_the_readme_example_trains_and_answers_on_two_ranks():
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "examples/megatron_gpt.py"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = re.findall(r"rank (\d): loss ([\d.]+) -> ([\d.]+), answer \[([\d, ]+)\]", run.stdout)
    assert sorted(r for r, *_ in lines) == ["0", "1"], run.stdout
    assert len({tuple(rest) for _, *rest in lines}) == 1  # the same loss and answer on both ranks
    _, first, last, answer = lines[0]
    assert float(last) < float(first) / 10 and answer == "42, 43, 44, 45"


@pytest.mark.parametrize("n", [1, 2])
def test_megatrons_own_loop_with_a_contiguous_split_equals_the_oracle(cluster, n):
    """No star-sp step: each CP rank's rows are its contiguous share of the context (whole blocks)."""
    spec = dict(lc=32, block=8, anchor=3, batch=2)
    for error in cluster(n).run(mc.own_loop, spec):
        assert error < TOL, error


def test_megatrons_own_loop_refuses_what_it_cannot_run_on_every_rank(cluster):
    results = cluster(2).run(mc.own_loop_refusals)
    assert results[0] == results[1]  # the same line on every rank, none left waiting
    no_rope, ring, recompute, block, checkpoint = results[0]
    assert "needs use_star_positions(model)" in no_rope
    assert "needs context parallel size 1" in ring
    assert "anchor_source='broadcast'" in recompute
    assert "choose a block size that divides 16" in block
    assert "does not take recompute_granularity" in checkpoint


def test_generation_stops_at_eos_row_by_row(cluster):
    """A row that produced EOS keeps producing EOS (padding) while the others go on; all stop when every
    row has produced it."""
    for r in cluster(2).run(mc.generate, dict(CASES[0], lt=4, new=6, eos_at=2)):
        tokens, stopped, eos = r["tokens"], r["stopped"], r["eos"]
        for row in range(tokens.shape[0]):
            hit = (tokens[row] == eos).nonzero()
            cut = int(hit[0]) + 1 if len(hit) else tokens.shape[1]
            assert torch.equal(stopped[row, :cut], tokens[row, :cut])
            assert bool((stopped[row, cut:] == eos).all())
        assert stopped.shape[1] <= tokens.shape[1]
