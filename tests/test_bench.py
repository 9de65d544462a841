"""tools/bench.py in its smallest form on CPU: every method runs (torch-cp is recorded as needing
CUDA), in one process and on two ranks (the gloo pool, as under torchrun), and the JSON and Markdown
carry their provenance."""

import importlib.util
import json
import os

import pytest

import workers
from star_sp.testing import save
from test_launch import ROOT

ARGS = ["--contexts", "64,101", "--decode", "3", "--query", "3", "--dtype", "float32", "--project", "4", "--warmup", "40",
        "--methods", "global,engine-global,star,star-paper,ring,torch-cp"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny"
    save(path, "llama", tokenizer=False)
    return path


def _check(out, hosts, model):
    from transformers import AutoConfig

    bench = _bench()
    cfg = AutoConfig.from_pretrained(model)
    record = json.loads((out / "bench.json").read_text())
    rows = record["rows"]
    assert record["world_size"] == hosts and record["provenance"]["command"].startswith("tools/bench.py")
    assert {r["method"] for r in rows} == {"global", "engine-global", "star", "star-paper", "ring", "torch-cp"}
    for r in rows:
        if r["method"] == "torch-cp":
            assert "needs CUDA" in r["error"]
            continue
        assert "error" not in r, r
        # time to first token: prefill plus the first step (per rank; the row keeps each figure's slowest rank)
        assert r["prefill_s"] <= r["ttft_s"] <= r["prefill_s"] + r["first_token_s"]
        assert r["decode_ms_per_token"] is not None  # --decode 3: every method here decodes
        assert r["hosts"] == (1 if r["method"].endswith("global") else hosts)
        # the floor is the busiest host's work for this row's own method, sizes and hosts
        assert r["floor_s"] == pytest.approx(bench.prefill_floor(cfg, r["method"], r["context"], r["hosts"],
                                                                 r.get("block"), r.get("anchor"), record["rates"]))
    star = [(r["context"], r["block"], r["anchor"]) for r in rows if r["method"] == "star"]
    assert star == [(64, -(-64 // hosts), -(-64 // hosts) // 4), (64, -(-64 // hosts), -(-64 // hosts)),
                    (101, -(-101 // hosts), -(-101 // hosts) // 4), (101, -(-101 // hosts), -(-101 // hosts))]
    md = (out / "bench.md").read_text()
    assert "| context | method |" in md and "torch" in md and "tools/bench.py" in md
    # phase 1 projected for 4 hosts (and, with several processes, for the run's own size, which
    # calibrates the others), ours and the paper's form, for each length and anchor, labelled so
    projected = record["projection"]
    counts = [4] if hosts == 1 else [hosts, 4]
    assert sorted(r["hosts"] for r in projected) == sorted(counts * 2 * 2 * 2) and all(r["projected"] for r in projected)
    measured = {(r["context"], r["method"], r["anchor_spec"]): r["prefill_s"] for r in rows if r["method"].startswith("star")}
    for r in projected:
        if hosts == 1:
            assert r["calibration"] is None and r["phase1_calibrated_s"] is None
        else:
            key = (r["context"], r["method"].replace(" (projected)", ""), r["anchor_spec"])
            own = [q for q in projected if q["hosts"] == hosts and q["method"] == r["method"]
                   and (q["context"], q["anchor_spec"]) == (r["context"], r["anchor_spec"])]
            assert r["calibration"] == pytest.approx(measured[key] / own[0]["phase1_s"])
            assert r["phase1_calibrated_s"] == pytest.approx(r["phase1_s"] * r["calibration"])
        assert r["block"] == -(-r["context"] // r["hosts"])
        measured_bcast = r["method"] == "star (projected)" and hosts > 1
        assert (r["anchor_broadcast_s"] is not None) == measured_bcast
        assert r["phase1_s"] == pytest.approx(r["phase1_compute_s"] + (r["anchor_broadcast_s"] or 0))
    assert "PROJECTION" in md


def _bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "tools", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_calibration_by_hand():
    """Each projection is scaled by measured / projected at the run's own host count, for its own
    context, method and anchor setting; nothing is calibrated without a matching measured row."""
    bench = _bench()
    rows = [{"context": 100, "method": "star", "hosts": 2, "block": 50, "anchor_spec": "block", "prefill_s": 1.1},
            {"context": 100, "method": "star", "hosts": 2, "block": 50, "anchor_spec": "block/4", "prefill_s": 0.9},
            {"context": 100, "method": "star-paper", "hosts": 2, "block": 50, "anchor_spec": "block", "error": "oom"},
            {"context": 100, "method": "ring", "hosts": 2, "prefill_s": 5.0}]

    def proj(method, hosts, spec, t):
        return {"context": 100, "method": f"{method} (projected)", "hosts": hosts, "anchor_spec": spec, "phase1_s": t}

    projected = [proj("star", 2, "block", 1.0), proj("star", 4, "block", 0.5), proj("star", 2, "block/4", 0.6),
                 proj("star", 4, "block/4", 0.3), proj("star-paper", 2, "block", 2.0), proj("star-paper", 4, "block", 1.0),
                 {"context": 100, "hosts": 8, "method": "projection", "error": "out of memory"}]
    bench.calibrate(rows, projected, 2)
    got = [(p.get("calibration"), p.get("phase1_calibrated_s")) for p in projected]
    assert got[0] == pytest.approx((1.1, 1.1)) and got[1] == pytest.approx((1.1, 0.55))
    assert got[2] == pytest.approx((1.5, 0.9)) and got[3] == pytest.approx((1.5, 0.45))
    assert got[4] == (None, None) and got[5] == (None, None)  # its measured row failed
    assert got[6] == (None, None)
    bench.calibrate(rows, [proj("star", 4, "block", 0.5)], 2)  # no projection at the run's own size
    bench.calibrate(rows, one := [proj("star", 1, "block", 0.5)], 1)  # one process: nothing to calibrate by
    assert one[0]["calibration"] is None


def test_bench_one_process(tiny, tmp_path):
    bench = _bench()
    assert bench.main(["--model", str(tiny), *ARGS, "--out", str(tmp_path / "one")]) == 0
    _check(tmp_path / "one", 1, tiny)


def test_causal_sdpa_for_context_parallelism_matches_the_model(tiny):
    """torch-cp's attention function (plain causal SDPA, mask ignored, GQA heads repeated) gives the
    model's own logits."""
    import torch
    from transformers import AutoModelForCausalLM

    bench = _bench()
    model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").double().eval()
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA is exercised
    ids = torch.randint(4, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        bench.register_causal_sdpa()
        model.set_attn_implementation(bench.CAUSAL_SDPA)
        got = model(ids).logits
    assert (got - want).abs().max().item() < 1e-10


def test_prefill_floor_counts_the_work_of_the_busiest_host():
    bench = _bench()
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_attention_heads=4, hidden_size=32, num_key_value_heads=2, head_dim=8,
                          intermediate_size=48, num_hidden_layers=2)
    rates = {"matmul_tflops": 1e-12, "attention_causal_tflops": 1e-12, "attention_full_tflops": 0.5e-12}
    floor = lambda *a: pytest.approx(bench.prefill_floor(cfg, *a, rates), rel=1e-12)  # noqa: E731
    linear = 2 * 2 * (32 * 8 * 12 + 3 * 32 * 48)  # 2 FLOPs x 2 layers x parameters, per row
    pair = 4 * 4 * 8 * 2
    L = 101
    assert floor("global", L, 1, None, None) == linear * L + pair * L * (L + 1) / 2
    assert floor("star", L, 1, L, 17) == bench.prefill_floor(cfg, "ring", L, 1, None, None, rates)
    assert floor("global", L, 1, None, None) == bench.prefill_floor(cfg, "ring", L, 1, None, None, rates)
    # one host, blocks of 40, 40, 21 behind an anchor of 17 (full pairs at half the rate: twice the time)
    tri = lambda n: n * (n + 1) / 2  # noqa: E731
    assert floor("star", L, 1, 40, 17) == linear * L + pair * (2 * tri(40) + tri(21) + 2 * 17 * (40 + 21))
    # three hosts: the busiest is a middle one (40 rows behind the anchor); the paper's form recomputes it
    assert floor("star", L, 3, 40, 17) == linear * 40 + pair * (tri(40) + 2 * 17 * 40)
    assert floor("star-paper", L, 3, 40, 17) == linear * 57 + pair * (tri(40) + tri(17) + 2 * 17 * 40)
    assert floor("ring", L, 4, None, None) == (linear * L + pair * tri(L)) / 4


@pytest.mark.slow
def test_bench_two_processes(tiny, tmp_path, cluster):
    """``main`` on two ranks of the gloo pool (``init_from_env`` takes the pool's group as a launcher's):
    the launchers themselves are tested in ``test_launch.py``."""
    results = cluster(2).run(workers.tool_main, os.path.join(ROOT, "tools", "bench.py"),
                             ["--model", str(tiny), *ARGS, "--out", str(tmp_path / "two")], timeout_s=300)
    assert [code for code, _ in results] == [0, 0], results
    _check(tmp_path / "two", 2, tiny)


@pytest.mark.slow
def test_multi_gpu_check_passes_on_cpu_processes(cluster):
    """tools/multi_gpu_check.py (run first on a multi-GPU machine) on two ranks of the gloo pool: every
    check passes."""
    results = cluster(2).run(workers.tool_main, os.path.join(ROOT, "tools", "multi_gpu_check.py"), None,
                             timeout_s=300)
    assert [code for code, _ in results] == [0, 0], results
    out = results[0][1]  # rank 0 prints every rank's lines
    assert "0 check(s) failed on 2 process(es), cpu" in out, out
    assert out.count("ok   rank") == 2 * (2 * (5 + 10 + 2) + 3), out  # ranks x (dtypes x checks + engine)
    assert results[1][1] == "", results[1][1]


def test_host_overhead_tool_runs_and_reports(capsys):
    """tools/host_overhead.py in its smallest form runs and prints its three figures with the settings
    it ran (its numbers are timings: a difference of two, the plain model's per-token figure, can be
    anything on a busy CPU, so only their presence is checked)."""
    import re

    spec = importlib.util.spec_from_file_location("host_overhead", os.path.join(ROOT, "tools", "host_overhead.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--layers", "2", "--context", "96", "--block", "40", "--anchor", "8", "--tokens", "3",
                      "--repeats", "1", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    figures = re.fullmatch(r"plain decode ms/token (-?[0-9.]+); star prefill s ([0-9.]+), decode ms/token ([0-9.]+) "
                           r"\(2 layers, hidden 64, context 96, block 40, anchor 8, cpu\)", line)
    assert figures, line
