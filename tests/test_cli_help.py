"""Every command that ``star-sp generate --help`` and ``star-sp eval --help`` show runs as written, on
CPU, from the repository's root (here: a scratch folder that links the root's examples/, configs/ and
launch/, so that runs/ lands there). generate's torchrun command runs with the other launchers of
``launch/infer.py`` in ``test_launch.py``."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from star_sp.apps.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _commands(text: str) -> list[str]:
    """Command lines of a help text: lines that start with star-sp or torchrun, with their ``\\``
    continuations, without a trailing ``# comment``."""
    commands, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith(("star-sp ", "torchrun ")):
            current = ""
        if current is not None:
            current += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                commands.append(current.split("  #")[0].strip())
                current = None
    return commands


def test_the_help_shows_commands(capsys):
    generate, evaluate = _commands(_help("generate", capsys)), _commands(_help("eval", capsys))
    assert len(generate) == 3 and len(evaluate) == 2, (generate, evaluate)
    assert any(c.startswith("torchrun ") for c in generate) and any(c.startswith("torchrun ") for c in evaluate)
    # generate's torchrun command (launch/infer.py) runs, as written, with the other launchers of that flow in
    # test_launch.py::test_infer_under_the_launchers_matches_one_process; the others run below
    assert [c.split()[0] for c in generate] == ["star-sp", "torchrun", "star-sp"], generate


def _needle_answer() -> str:
    """The number the shipped example's query asks for, read from the example's context."""
    with open(os.path.join(ROOT, "examples", "needle-2k-query.txt")) as f:
        key = re.search(r"number for ([\w-]+)", f.read()).group(1)
    with open(os.path.join(ROOT, "examples", "needle-2k.txt")) as f:
        return re.search(rf"{re.escape(key)} is:? (\d+)", f.read()).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("command, index", [("generate", 0), ("generate", 2), ("eval", 0), ("eval", 1)])
def test_every_command_in_the_help_runs_as_written(capsys, tmp_path, command, index):
    line = _commands(_help(command, capsys))[index]
    for name in ("examples", "configs", "launch"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, line + "\n" + proc.stdout + proc.stderr[-3000:]
    if "needle-2k" in line:  # the shipped model finds the needle, in one process and in two
        assert proc.stdout.strip().splitlines()[0].split()[0] == _needle_answer(), proc.stdout
    if command == "eval":
        out = shlex.split(line)[shlex.split(line).index("--out") + 1]
        assert proc.stdout.strip().splitlines()[-1] == f"summary: {os.path.join(out, 'summary.md')}"
        assert (tmp_path / out / "summary.md").exists()
