"""tools/bench_megatron.py in its smallest form on CPU: a tiny Megatron GPT (2 layers, float32), global
and star training steps each timed, the JSON and Markdown written with their provenance, and the
process group and Megatron's parallel state it made for itself gone afterwards."""

import importlib.util
import json
import os

import pytest

megatron = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install star-sp[megatron])")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("bench_megatron", os.path.join(ROOT, "tools", "bench_megatron.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_bench_megatron_runs_global_and_star_on_cpu(tmp_path):
    import torch.distributed as dist
    from megatron.core import parallel_state

    owned = dist.is_initialized()
    argv = ["--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--contexts", "128", "--target", "16",
            "--layers", "2", "--blocks", "1/4", "--anchors", "block,block/4", "--repeats", "1", "--out", str(tmp_path)]
    assert _tool().main(argv) == 0
    assert dist.is_initialized() == owned  # the tool's own group is gone again (or someone else's kept)
    if not owned:
        assert not parallel_state.model_parallel_is_initialized()

    record = json.loads((tmp_path / "bench_megatron.json").read_text())
    rows = record["rows"]
    assert [(r["method"], r.get("block"), r.get("anchor")) for r in rows] == [
        ("global", None, None), ("star", 32, 32), ("star", 32, 8)]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["context"] == 128 and r["tokens_per_step"] == 144 and r["layers"] == 2
    provenance = record["provenance"]
    assert provenance["megatron_core"] == megatron.__version__ and provenance["device"]
    assert provenance["command"] == "tools/bench_megatron.py " + " ".join(argv)
    md = (tmp_path / "bench_megatron.md").read_text()
    assert "| context | batch | method | checkpointing | block | anchor | step s | tokens/s | vs global | peak GiB |" in md
    assert md.count("| 128 | 1 | star |") == 2 and "| 128 | 1 | global |" in md and "tools/bench_megatron.py" in md
