"""tools/bench.py in its smallest form on CPU: every method runs (torch-cp is recorded as needing
CUDA), in one process and in two under torchrun, and the JSON and Markdown carry their provenance."""

import importlib.util
import json
import os

import pytest

from star_sp.testing import save
from test_launch import BIN, ROOT, _launch, free_port

ARGS = ["--contexts", "64,101", "--decode", "3", "--query", "3", "--dtype", "float32", "--project", "4", "--warmup", "40",
        "--methods", "global,engine-global,star,star-paper,ring,torch-cp"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny"
    save(path, "llama", tokenizer=False)
    return path


def _check(out, hosts):
    record = json.loads((out / "bench.json").read_text())
    rows = record["rows"]
    assert record["world_size"] == hosts and record["provenance"]["command"].startswith("tools/bench.py")
    assert {r["method"] for r in rows} == {"global", "engine-global", "star", "star-paper", "ring", "torch-cp"}
    for r in rows:
        if r["method"] == "torch-cp":
            assert "needs CUDA" in r["error"]
            continue
        assert "error" not in r, r
        assert r["ttft_s"] > r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0
        assert r["hosts"] == (1 if r["method"].endswith("global") else hosts)
    star = [(r["context"], r["block"], r["anchor"]) for r in rows if r["method"] == "star"]
    assert star == [(64, -(-64 // hosts), -(-64 // hosts) // 4), (64, -(-64 // hosts), -(-64 // hosts)),
                    (101, -(-101 // hosts), -(-101 // hosts) // 4), (101, -(-101 // hosts), -(-101 // hosts))]
    md = (out / "bench.md").read_text()
    assert "| context | method |" in md and "torch" in md and "tools/bench.py" in md
    # phase 1 projected for 4 hosts, ours and the paper's form, for each length and anchor, labelled so
    projected = record["projection"]
    assert len(projected) == 2 * 2 * 2 and all(r["projected"] and r["hosts"] == 4 for r in projected)
    for r in projected:
        assert r["block"] == -(-r["context"] // 4) and r["phase1_compute_s"] > 0
        measured_bcast = r["method"] == "star (projected)" and hosts > 1
        assert (r["anchor_broadcast_s"] is not None) == measured_bcast
        assert r["phase1_s"] == pytest.approx(r["phase1_compute_s"] + (r["anchor_broadcast_s"] or 0))
    assert "PROJECTION" in md


def test_bench_one_process(tiny, tmp_path):
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "tools", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tiny), *ARGS, "--out", str(tmp_path / "one")]) == 0
    _check(tmp_path / "one", 1)


@pytest.mark.slow
def test_bench_two_processes(tiny, tmp_path):
    proc = _launch([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "tools/bench.py", "--model", str(tiny), *ARGS, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(tmp_path / "two", 2)


@pytest.mark.slow
def test_multi_gpu_check_passes_on_cpu_processes():
    """tools/multi_gpu_check.py (run first on a multi-GPU machine) on gloo: every check passes."""
    proc = _launch([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "tools/multi_gpu_check.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 check(s) failed on 2 process(es), cpu" in proc.stdout
    assert proc.stdout.count("ok   rank") == 2 * (2 * (5 + 4) + 3)  # ranks x (dtypes x checks + engine)
