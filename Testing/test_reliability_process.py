"""Issue 6, items 2 and 5, with real backend processes (``python -m MedTuningLib``, no shell): training
killed at random moments resumes to the weights of an uninterrupted run, SIGTERM cancels with exit 130
and a resumable state, a kill during ``cases add`` leaves a valid manifest, a second run into the same
output folder is refused and a killed holder leaves no stale lock, and every stdout line is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import TINY_TRAIN, make_blob_library, write_blob_case

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [*TINY_TRAIN, "--labels", "Blob=1", "--epochs", "4", "--steps-per-epoch", "2", "--seed", "5"]


def backend_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


class Backend:
    """One backend process with its stdout read line by line (each line must be one JSON object)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "MedTuningLib", *argv, "--events", "jsonl"], cwd=ROOT,
                                     env=backend_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.events: list[dict] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[bytes] = []
        threading.Thread(target=lambda: self._stderr.append(self.proc.stderr.read()), daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8").rstrip("\n")
            with self._changed:
                self.lines.append(line)
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    self.events.append({"event": "NOT JSON", "line": line})
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 120.0) -> dict | None:
        """The first event satisfying ``predicate``; None if the process ended first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no matching event in {timeout} s; last: {self.events[-3:]}")
                self._changed.wait(0.2)

    def finish(self, timeout: float = 180.0) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(10)
        assert_json_lines(self.lines)
        return status

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)
        assert_json_lines(self.lines)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")


def assert_json_lines(lines: list[str]) -> None:
    for line in lines:
        assert isinstance(json.loads(line), dict), line  # raises on a line that is not JSON


def run_backend(argv: list[str], timeout: float = 300.0) -> tuple[int, list[dict]]:
    done = subprocess.run([sys.executable, "-m", "MedTuningLib", *argv, "--events", "jsonl"], cwd=ROOT,
                          env=backend_env(), capture_output=True, timeout=timeout)
    lines = done.stdout.decode("utf-8").splitlines()
    assert_json_lines(lines)
    return done.returncode, [json.loads(line) for line in lines]


def is_train_step(event: dict) -> bool:
    return event.get("event") == "progress" and event.get("phase") == "train"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    from conftest import run_cli

    return make_blob_library(run_cli, tmp_path_factory.mktemp("process"), n_train=2, n_test=0)


@pytest.fixture(scope="module")
def reference_weights(library, tmp_path_factory):
    """The uninterrupted run (same seed and settings) the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "straight"
    status, events = run_backend(["train", "--library", str(library), "--out", str(out), *TRAIN])
    assert status == 0, events[-3:]
    return load_file(str(out / "weights.safetensors"))


def test_training_killed_at_random_moments_then_terminated_resumes_to_the_same_weights(library, reference_weights,
                                                                                      tmp_path):
    """SIGKILL at three seeded random moments of training, then SIGTERM; after each, OUT does not exist and
    ``--resume`` continues (from the last epoch's state); the finished weights equal the straight run's."""
    rng = random.Random(20240617)
    out = tmp_path / "model"
    partial = out.with_name("model.partial")
    total_steps = 4 * 2
    resume: list[str] = []
    kill_points = sorted(rng.sample(range(1, total_steps), 3))
    for step in kill_points:
        backend = Backend(["train", "--library", str(library), "--out", str(out), *TRAIN, *resume])
        reached = backend.wait_for(lambda e: is_train_step(e) and e["step"] >= step)
        if reached is None:  # finished (or failed) before the kill point: nothing left to interrupt
            pytest.fail(f"the run ended before step {step}: {backend.events[-3:]}\n{backend.stderr[-2000:]}")
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere within the step, a save, a validation
        backend.kill()
        assert not out.exists(), f"{out} exists after a kill at step {step}"
        assert partial.is_dir()
        state = partial / "state.json"
        resume = ["--resume"] if state.exists() else []
        if state.exists():
            json.loads(state.read_text(encoding="utf-8"))  # the state on disk is complete JSON, never half-written
    # SIGTERM: cancelled at the next step, exit 130, a resumable state.
    backend = Backend(["train", "--library", str(library), "--out", str(out), *TRAIN, *resume])
    assert backend.wait_for(is_train_step) is not None, backend.stderr[-2000:]
    backend.proc.send_signal(signal.SIGTERM)
    status = backend.finish()
    if status == 0:  # the run was already past its last step when the signal came: nothing to resume
        pytest.skip("SIGTERM arrived after training had finished")
    assert status == 130, (status, backend.events[-3:], backend.stderr[-2000:])
    assert backend.events[-1]["event"] == "done" and backend.events[-1]["status"] == "cancelled"
    assert backend.events[-1]["outputs"]["partial"] == str(partial.absolute())
    assert not out.exists() and (partial / "state.json").is_file()
    # Resume to completion.
    status, events = run_backend(["train", "--library", str(library), "--out", str(out), *TRAIN, "--resume"])
    assert status == 0, events[-3:]
    assert any(e["event"] == "log" and "resuming after epoch" in e["message"] for e in events)
    assert not partial.exists()
    weights = load_file(str(out / "weights.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-5, atol=1e-6, msg=key)


def test_second_run_into_the_same_output_is_refused_and_a_killed_holder_leaves_no_lock(library, tmp_path, cli):
    out = tmp_path / "model"
    long_run = ["train", "--library", str(library), "--out", str(out), *TINY_TRAIN, "--labels", "Blob=1",
                "--epochs", "200", "--steps-per-epoch", "1", "--seed", "2"]
    holder = Backend(long_run)
    try:
        assert holder.wait_for(is_train_step) is not None, holder.stderr[-2000:]
        status, events = cli(long_run)
        assert status == 2 and events[-1]["code"] == "OUTPUT_EXISTS" and "--resume" in events[-1]["hint"]
        status, events = cli([*long_run, "--resume"])
        assert status == 2 and events[-1]["code"] == "OUTPUT_LOCKED", events[-1]
        assert str(holder.proc.pid) in events[-1]["message"]
        # Another process is refused the same way.
        status, events = run_backend([*long_run, "--resume"])
        assert status == 2 and events[-1]["code"] == "OUTPUT_LOCKED"
        assert holder.proc.poll() is None, "the first run was disturbed"
    finally:
        holder.kill()
    # The kernel dropped the killed holder's lock: a resume gets it at once (a STOP file ends it right away).
    (out.with_name("model.partial") / "STOP").write_text("", encoding="utf-8")
    status, events = cli([*long_run, "--resume"])
    assert status == 130 and events[-1]["status"] == "cancelled", events[-3:]
    assert not out.exists()


def _library_is_valid(library: Path, sources: dict[str, str]) -> list[str]:
    """Every listed case has all its files, each a complete copy of its source; returns the case ids."""
    from MedTuningLib.cases import CaseLibrary

    cases = CaseLibrary(library).cases()
    for case in cases:
        for path in [*case.image_paths, case.label_path]:
            assert path.is_file(), f"case {case.id} lists {path}, which is missing"
        digest = hashlib.sha256(case.image_paths[0].read_bytes()).hexdigest()
        assert digest == sources[case.id], f"case {case.id}'s image is not a complete copy"
    return [c.id for c in cases]


def test_kill_during_cases_add_leaves_a_valid_manifest(tmp_path):
    """SIGKILL at seeded random moments of ``cases add`` (spread over a whole add, copy and manifest write
    included): the manifest always parses, lists only complete cases, the lock is not stale."""
    rng = random.Random(7)
    library = tmp_path / "library"
    sources: dict[str, str] = {}

    def add(case_id: str) -> Backend:
        image, label = write_blob_case(tmp_path / "src", case_id, seed=len(sources) + 1, shape=(24, 96, 96))
        sources[case_id] = hashlib.sha256(image.read_bytes()).hexdigest()
        return Backend(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                        "--id", case_id])

    first = add("first")
    assert first.finish() == 0, first.stderr[-2000:]
    # The add's own work (checks, copy, manifest) runs between its start and done events.
    window = first.events[-1]["t"] - first.events[0]["t"]
    assert _library_is_valid(library, sources) == ["first"]
    listed, interrupted = ["first"], 0
    for attempt in range(10):
        backend = add(f"k{attempt}")
        assert backend.wait_for(lambda e: e.get("event") == "start") is not None, backend.stderr[-2000:]
        time.sleep(rng.uniform(0.4, 1.3) * window)
        interrupted += backend.proc.poll() is None
        backend.kill()
        ids = _library_is_valid(library, sources)
        assert ids[: len(listed)] == listed and set(ids) - set(listed) <= {f"k{attempt}"}, ids
        listed = ids
    assert interrupted >= 3, "the kills came too late to interrupt an add"
    # The library still takes cases: no stale lock, leftovers of interrupted adds are skipped.
    last = add("after")
    assert last.finish() == 0, (last.events[-2:], last.stderr[-2000:])
    assert _library_is_valid(library, sources)[-1] == "after"


def test_every_stdout_line_is_json_for_refusals_and_text_mode_keeps_stdout_clean(tmp_path):
    """Errors from argument parsing to a missing file come as JSON events on stdout, with exit 2."""
    for argv, code in ((["train", "--crop", "4x4"], "USAGE"),
                       (["segment", "--model", str(tmp_path / "none"), "--image", str(tmp_path / "x.nrrd"),
                         "--out", str(tmp_path / "r.seg.nrrd")], "FILE_NOT_FOUND"),
                       (["cases", "list", "--library", str(tmp_path / "nowhere")], "FILE_NOT_FOUND")):
        status, events = run_backend(argv)
        assert status == 2 and events[-1]["event"] == "error" and events[-1]["code"] == code, events


def test_an_ascii_locale_still_gives_utf8_json_lines_and_readable_text(tmp_path):
    """Some machines (CI among them) run Python with an ASCII locale: the event stream stays UTF-8 JSON and
    human text never crashes on a character the terminal cannot show."""
    env = {**backend_env(), "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    probe = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                           env=env, capture_output=True, timeout=60)
    if b"ANSI" not in probe.stdout and b"ascii" not in probe.stdout.lower():
        pytest.skip(f"this Python does not use an ASCII locale under LC_ALL=C ({probe.stdout!r})")
    model = tmp_path / "none"
    argv = ["segment", "--model", str(model), "--image", str(tmp_path / "scan.nrrd"), "--out", str(tmp_path / "r.seg.nrrd")]
    done = subprocess.run([sys.executable, "-m", "MedTuningLib", *argv, "--events", "jsonl"], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)
    lines = done.stdout.decode("utf-8").splitlines()
    assert_json_lines(lines)
    assert done.returncode == 2 and json.loads(lines[-1])["code"] == "FILE_NOT_FOUND"
    # text mode: the message is printed (non-ASCII characters escaped, not a crash with INTERNAL_ERROR)
    done = subprocess.run([sys.executable, "-m", "MedTuningLib", *argv], cwd=ROOT, env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert b"FILE_NOT_FOUND" in done.stderr and b"Traceback" not in done.stderr
    # characters an ASCII terminal cannot show: escaped in text, UTF-8 in the JSON stream
    script = ("import sys; from MedTuningLib.cli import _make_output_streams_safe; from MedTuningLib.events import "
              "EventStream; mode = sys.argv[1]; _make_output_streams_safe(mode); "
              "EventStream(mode).log('Dice 0.91 \\u00b1 0.02 on Donn\\u00e9es'); "
              "mode == 'text' and print('| mean \\u00b1 sd |')")  # tables go to stdout in text mode
    text = subprocess.run([sys.executable, "-c", script, "text"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert text.returncode == 0 and b"\\xb1" in text.stderr and b"| mean \\xb1 sd |" in text.stdout, text.stderr[-2000:]
    jsonl = subprocess.run([sys.executable, "-c", script, "jsonl"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert jsonl.returncode == 0, jsonl.stderr[-2000:]
    assert json.loads(jsonl.stdout.decode("utf-8"))["message"] == "Dice 0.91 \u00b1 0.02 on Donn\u00e9es"


def test_a_crop_worker_that_dies_is_reported_with_what_to_do(library, tmp_path):
    """A DataLoader worker killed mid-run (as the kernel does when /dev/shm is full): DATA_WORKERS_FAILED with the
    --workers 0 hint, exit 3, the state resumable and no model folder that looks finished."""
    import psutil

    out = tmp_path / "model"
    backend = Backend(["train", "--library", str(library), "--out", str(out), *TINY_TRAIN, "--labels", "Blob=1",
                       "--epochs", "1000", "--steps-per-epoch", "2", "--workers", "1"])
    try:
        assert backend.wait_for(is_train_step, timeout=180) is not None, backend.stderr[-2000:]
        workers = psutil.Process(backend.proc.pid).children()
        assert len(workers) == 1, workers
        workers[0].send_signal(signal.SIGBUS)
        status = backend.finish(timeout=120)
    finally:
        if backend.proc.poll() is None:
            backend.kill()
    error = backend.events[-1]
    assert status == 3 and error["event"] == "error" and error["code"] == "DATA_WORKERS_FAILED", (
        backend.events[-3:], backend.stderr[-3000:])
    # torch words the cause as "killed by signal: Bus error", "exited unexpectedly" or a broken connection, by
    # when it notices; the message says a worker died and how much shared memory is free.
    assert "--workers 0" in error["hint"] and "preparing training crops died" in error["message"], error
    assert "/dev/shm has" in error["message"], error
    assert (tmp_path / "model.partial").is_dir() and not out.exists()
