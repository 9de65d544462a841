"""A user error or Ctrl-C under torchrun and the deepspeed launcher (CPU, gloo, two processes): the
cause is printed once, first; torchrun's failure report ends with it as the root cause; every process
exits promptly, non-zero, and none is left behind.

torchrun's own report (its log lines, the traceback of its ``ChildFailedError`` or ``SignalException``,
the failure summary) comes from the launcher's parent process and cannot be changed from a child. Each
test therefore first measures that report for children that say nothing (``--no-python false``, or
``sleep`` interrupted), and bounds star-sp's output by it plus the lines star-sp is allowed to add.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cluster import free_port
from star_sp.testing import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TORCHRUN = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"]
NPROC = 2
LOG_LINE = re.compile(r"^[IWE]\d{4} ")  # torchrun's log records (glog format)
SHUTDOWN_S = 30  # torchrun's default shutdown timeout: a child still alive then is SIGKILLed


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _lines(text: str) -> list[str]:
    """Output lines, without blank ones and progress bars (weights loading, prefill)."""
    return [line for line in text.split("\n") if line.strip() and "Loading weights" not in line and "] layer " not in line]


def _gone(pids, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("launch-models")
    save(base / "tiny", "llama", seed=3, tokenizer=False)
    save(base / "sliding", "mistral", tokenizer=False, sliding_window=8)
    return base


@pytest.fixture(scope="module")
def bare_failure_lines():
    """Lines torchrun prints when both children exit 1 without a word."""
    proc = _run([*TORCHRUN, "--no-python", "false"])
    assert proc.returncode != 0
    return len(_lines(proc.stdout + proc.stderr))


@pytest.mark.slow
@pytest.mark.parametrize("extra, model, message, code", [
    (("--block-size", "0"), "tiny",
     "star-sp: error: block_size must be a positive integer (a number of tokens), got 0", 1),
    (("--block-size", "abc"), "tiny",
     "star-sp generate: error: argument --block-size: invalid int value: 'abc' (see star-sp generate --help)", 2),
    ((), "sliding", "star-sp: error: MistralForCausalLM uses sliding-window attention", 1),
])
def test_torchrun_user_error_is_told_once_first_and_last(model_dirs, bare_failure_lines, extra, model, message, code):
    proc = _run([*TORCHRUN, "launch/infer.py", "--model", str(model_dirs / model), "--random-context", "40",
                 "--random-query", "3", "--max-new-tokens", "2", *extra])
    lines = _lines(proc.stdout + proc.stderr)
    text = "\n".join(lines)
    assert proc.returncode != 0, text
    ours = [line for line in lines if not LOG_LINE.match(line)]
    assert ours[0].startswith(message), text  # the first thing after the launcher's log and the loading bar
    assert sum(line.startswith(message) for line in lines) == 1, text  # once, not once per rank
    root = text[text.index("Root Cause"):]
    assert re.search(rf"traceback : {re.escape(message)}", root), text  # and the root cause at the end
    assert f"exitcode  : {code} " in text and "[rank" not in text, text
    assert f'File "{ROOT}/star_sp' not in text and f'File "{ROOT}/launch' not in text, text  # no trace of ours
    # torchrun's own report for two failed children, plus: our line, torchrun's note that it copied our
    # error file, and one "Sending process ... closing signal SIGTERM" if the other rank was still exiting
    assert len(lines) <= bare_failure_lines + 1 + 1 + (NPROC - 1), text
    pids = [int(p) for p in re.findall(r"\(pid: (\d+)\)", text)]
    assert len(set(pids)) == NPROC and _gone(pids), text


def _interrupt_after(cmd, ready: str, env=None, ignore_sigint: bool = False, wait_s: float = SHUTDOWN_S + 30):
    """Start ``cmd`` in its own session, wait until its output holds ``ready``, send SIGINT to the
    session's process group (as Ctrl-C does to a terminal's foreground group); returns (exit code,
    output, seconds from SIGINT to exit, pids of every process it had started)."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=ignore)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: [chunks.append(c) for c in iter(lambda: proc.stdout.read1(4096), b"")])
    reader.start()
    deadline = time.monotonic() + 240
    try:
        while ready not in b"".join(chunks).decode(errors="replace"):
            assert proc.poll() is None, b"".join(chunks).decode(errors="replace")
            assert time.monotonic() < deadline, "never got ready: " + b"".join(chunks).decode(errors="replace")
            time.sleep(0.1)
        pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            code = None  # still running
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
    return code, b"".join(chunks).decode(errors="replace"), elapsed, pids


@pytest.mark.slow
def test_ctrl_c_under_torchrun_ends_every_process_quietly():
    bare_code, bare, _, _ = _interrupt_after([*TORCHRUN, "--no-python", "bash", "-c", "echo ready; sleep 60"],
                                             ready="ready\nready")
    bare_lines = len(_lines(bare)) - 2  # without the two "ready"
    code, out, elapsed, pids = _interrupt_after(
        [*TORCHRUN, "launch/infer.py", "--model", "configs/models/tiny-llama", "--random-weights", "--random-context",
         "1024", "--random-query", "4", "--block-size", "256", "--max-new-tokens", "100000"],
        ready="layer 4/4")  # the prefill bar is full: decoding, with collectives every token
    assert code != 0 and bare_code != 0
    assert out.count("star-sp: interrupted") == 1, out
    assert "KeyboardInterrupt" not in out and "[rank" not in out and out.count("Traceback") <= 1, out
    assert "Unable to shutdown process" not in out, out  # nobody had to be killed
    assert elapsed < SHUTDOWN_S and _gone(pids), out
    assert len(_lines(out)) <= bare_lines + 1, out  # torchrun's report of an interrupt and our one line


@pytest.mark.slow
def test_ctrl_c_in_one_process_exits_130_with_one_line():
    code, out, elapsed, pids = _interrupt_after(
        [os.path.join(BIN, "star-sp"), "generate", "--model", "configs/models/tiny-llama", "--random-weights",
         "--random-context", "1024", "--random-query", "4", "--block-size", "256", "--max-new-tokens", "100000"],
        ready="layer 4/4")
    assert code == 130, out
    assert out.splitlines()[-1] == "star-sp: interrupted" and "Traceback" not in out, out
    assert elapsed < 10 and _gone(pids), out


@pytest.mark.slow
def test_deepspeed_user_error_is_told_once(model_dirs):
    proc = _run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                 "launch/infer.py", "--model", str(model_dirs / "tiny"), "--random-context", "40", "--random-query", "3",
                 "--block-size", "0"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert text.count("block_size must be a positive integer") == 1, text
    assert "Traceback" not in text, text


@pytest.mark.slow
def test_a_command_started_to_ignore_ctrl_c_keeps_ignoring_it():
    """``star-sp ... &`` in a script, or under nohup, starts with SIGINT ignored: star-sp leaves it so."""
    code, out, _, _ = _interrupt_after(
        [os.path.join(BIN, "star-sp"), "generate", "--model", "configs/models/tiny-llama", "--random-weights",
         "--random-context", "1024", "--random-query", "4", "--block-size", "256", "--max-new-tokens", "100000"],
        ready="layer 4/4", ignore_sigint=True, wait_s=3)
    assert code is None and "interrupted" not in out, out
