"""``star-sp eval`` end to end on a tiny model: rows, summary, plots, resuming, two processes, W&B
offline, and its errors. (The tiny random model scores 0; the scorer is tested on hand-made cases.)"""

import json
import os

import pytest

import workers
from star_sp.apps.cli import main
from star_sp.eval.plots import BASELINE_ZORDER, block_anchor_figure, length_figure, method_label
from star_sp.eval.runner import Method, parse_methods, summarize
from star_sp.testing import save


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval-model")
    save(base / "tiny", "llama", seed=5)
    save(base / "bare", "llama", seed=5, tokenizer=False)
    return base


def _argv(model_dir, out, *extra, model="tiny"):
    return ["--model", str(model_dir / model), "--tasks", "niah_single_1,vt", "--lengths", "200,320",
            "--attention", "star,global", "--block-size", "1/4", "--anchor-size", "block,0", "--samples", "2",
            "--out", str(out), "--dtype", "float64", "--quiet", *extra]


def _rows(out):
    with open(out / "results.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_eval_writes_rows_summary_plots_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", *_argv(model_dir, out)]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 2 * 2 * 2 * 3  # tasks x lengths x samples x methods
    assert {r["method"] for r in rows} == {"global", "star_b1/4_ablock", "star_b1/4_a0"}
    assert {(r["block_size"], r["anchor_size"]) for r in rows if r["length"] == 320 and r["method"] != "global"} == {
        (80, 80), (80, 0)}
    assert all(0 <= r["score"] <= 100 and r["answers"] and r["context_tokens"] > 100 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert "| average |" in printed and "star / global" not in printed or summary["ratio_to_global"] == {}
    assert printed.strip().splitlines()[-1] == f"summary: {out / 'summary.md'}"  # the last line, as the README says
    assert (out / "summary.md").read_text().startswith("| family |")
    for png in ("accuracy_vs_length.png", "accuracy_vs_block_anchor.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: nothing to do, nothing appended
    assert main(["eval", *_argv(model_dir, out)]) == 0
    assert len(_rows(out)) == 24
    # an interrupted run (10 rows kept, the last line cut short) finishes only what is missing
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:30])
    assert main(["eval", *_argv(model_dir, out)]) == 0
    again = _rows_tolerant(out)
    assert len(again) == 24 and again[:10] == [json.loads(x) for x in lines[:10]]
    key = lambda r: (r["task"], r["length"], r["index"], r["method"])  # noqa: E731
    assert {key(r): r["prediction"] for r in again} == {key(json.loads(x)): json.loads(x)["prediction"] for x in lines}
    # a folder made before the prompt keys existed (plain text) resumes as plain
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompt"] == "plain" and settings["template"] is None  # this tokenizer has no template
    (out / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k not in ("prompt", "template")}))
    assert main(["eval", *_argv(model_dir, out)]) == 0 and len(_rows_tolerant(out)) == 24
    # a folder made with other settings is not resumed with these
    assert main(["eval", *_argv(model_dir, out), "--seed", "1"]) == 1
    assert "holds results made with other settings" in capsys.readouterr().err


def _rows_tolerant(out):
    rows = []
    for line in (out / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


@pytest.mark.slow
def test_eval_in_two_processes_matches_one(model_dir, tmp_path, cluster):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--tasks", "vt", "--lengths", "256", "--samples", "1"]
    assert main(["eval", *_argv(model_dir, one), *argv]) == 0
    results = cluster(2).run(workers.cli, "eval", _argv(model_dir, two) + argv)
    assert all(code == 0 for code, _, _ in results), results
    key = lambda r: (r["task"], r["length"], r["index"], r["method"])  # noqa: E731
    assert {key(r): r["prediction"] for r in _rows(one)} == {key(r): r["prediction"] for r in _rows(two)}


def test_batched_samples_give_the_answers_of_one_by_one(model_dir, tmp_path, cluster):
    """--batch: the samples of a task and length answered together (contexts of different lengths in
    one batch) give each sample's answer alone, in one process and in two."""
    alone, together, two = tmp_path / "alone", tmp_path / "together", tmp_path / "two"
    argv = ["--samples", "3", "--lengths", "200,320"]
    assert main(["eval", *_argv(model_dir, alone), *argv, "--batch", "1"]) == 0
    assert main(["eval", *_argv(model_dir, together), *argv, "--batch", "3"]) == 0
    results = cluster(2).run(workers.cli, "eval", _argv(model_dir, two) + argv + ["--batch", "2"])
    assert all(code == 0 for code, _, _ in results), results
    key = lambda r: (r["task"], r["length"], r["index"], r["method"])  # noqa: E731
    want = {key(r): r["prediction"] for r in _rows(alone)}
    assert len(want) == 2 * 2 * 3 * 3 and {r["batch"] for r in _rows(alone)} == {1}
    assert {key(r): r["prediction"] for r in _rows(together)} == want
    assert {r["batch"] for r in _rows(together)} == {3}
    assert {key(r): r["prediction"] for r in _rows(two)} == want


@pytest.mark.slow
def test_wandb_offline_writes_a_run(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "run"
    argv = ["--tasks", "vt", "--lengths", "200", "--samples", "1", "--wandb", "star-sp-test"]
    assert main(["eval", *_argv(model_dir, out), *argv]) == 0
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and os.listdir(out / "wandb" / runs[0] / "files")


@pytest.mark.parametrize("extra, model, words", [
    (("--tasks", "needle"), "tiny", "unknown task 'needle'"),
    (("--lengths", "8k"), "tiny", "exceeds the model's 4096 positions"),
    ((), "bare", "has no tokenizer files"),
    (("--block-size", "huge"), "tiny", "is not understood"),
])
def test_eval_errors(model_dir, tmp_path, capsys, extra, model, words):
    assert main(["eval", *_argv(model_dir, tmp_path / "x", model=model), *extra]) == 1
    assert words in capsys.readouterr().err


def test_methods_and_summary():
    methods = parse_methods(["star", "global"], ["1/4", "512"], ["block", "block/4", "0"])
    assert [m.name for m in methods][:3] == ["star_b1/4_ablock", "star_b1/4_ablock/4", "star_b1/4_a0"]
    assert Method("star", "1/8", "block/4").sizes(16384) == (2048, 512)
    assert Method("global").sizes(4096) == (4096, 4096)
    assert [m.name for m in parse_methods(["ring", "global"], [], [])] == ["ring", "global"]
    assert Method("ring").sizes(4096) == (4096, 4096)
    rows = [{"task": "niah_single_1", "length": 4096, "method": m, "score": s}
            for m, s in (("global", 100), ("global", 80), ("star_b1/4_ablock", 90), ("star_b1/4_ablock", 60))]
    rows += [{"task": "vt", "length": 4096, "method": m, "score": s} for m, s in (("global", 50), ("star_b1/4_ablock", 50))]
    summary = summarize(rows)
    assert summary["by_family"]["niah_single|4096|global"] == 90
    assert summary["average"]["4096|global"] == 70 and summary["average"]["4096|star_b1/4_ablock"] == 62.5
    assert summary["ratio_to_global"]["4096|star_b1/4_ablock"] == pytest.approx(62.5 / 70)


@pytest.mark.parametrize("name, label", [
    ("star_b1/2_ablock", "block L/2, anchor = block"), ("star_b1/4_a0", "block L/4, no anchor"),
    ("star_b1/8_ablock/4", "block L/8, anchor = block/4"), ("star_b2048_a512", "block 2048, anchor 512"),
    ("global", "global"), ("ring", "ring"),
])
def test_method_labels_read_as_words(name, label):
    assert method_label(name) == label


def _plot_summary():
    """Three lengths; one star setting scores exactly as global does (the case that hid global), and
    every bar is near 100 so that a legend anywhere inside the axes would cover one."""
    lengths, methods = [2048, 4096, 8192], ["global", "star_b1/2_a0", "star_b1/2_ablock"]
    scores = {"global": [99.0, 97.0, 95.0], "star_b1/2_ablock": [99.0, 97.0, 95.0], "star_b1/2_a0": [96.0, 94.0, 98.0]}
    return {"methods": methods, "lengths": lengths,
            "average": {f"{n}|{m}": scores[m][i] for m in methods for i, n in enumerate(lengths)}}


def test_length_plot_draws_the_baseline_on_top_and_reads_lengths_in_k():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    fig = length_figure(_plot_summary())
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    base, same = lines["global (exact)"], lines["block L/2, anchor = block"]
    assert list(base.get_ydata()) == list(same.get_ydata())  # identical scores: only style and order tell them apart
    others = [line for line in ax.get_lines() if line is not base]
    assert base.get_zorder() == BASELINE_ZORDER > max(line.get_zorder() for line in others)
    assert ax.get_lines()[-1] is base  # drawn last
    assert base.get_linestyle() == "--" and all(line.get_linestyle() == "-" for line in others)
    assert to_rgba(base.get_color()) == to_rgba("black") and base.get_markerfacecolor() == "none"
    assert base.get_markersize() > max(line.get_markersize() for line in others)  # the ring encloses their dots
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2K", "4K", "8K"]
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())
    plt.close(fig)


def test_block_anchor_plot_has_words_a_label_and_a_legend_beside_the_bars():
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    summary = _plot_summary()
    fig = block_anchor_figure(summary)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("Star Attention setting")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["block L/2,\nno anchor", "block L/2,\nanchor = block"]
    marks = [c for c in ax.collections if isinstance(c, LineCollection)]  # global's score over each bar
    assert len(marks) == len(summary["lengths"])
    for mark, n in zip(marks, summary["lengths"]):
        assert {round(float(y), 6) for seg in mark.get_segments() for _, y in seg} == {summary["average"][f"{n}|global"]}
        assert mark.get_zorder() == BASELINE_ZORDER
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + ([ax.get_legend()] if ax.get_legend() else [])
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    bars = [p for p in ax.patches]
    assert len(bars) == len(summary["lengths"]) * 2
    assert not any(box.overlaps(bar.get_window_extent(renderer)) for bar in bars)
    plt.close(fig)
