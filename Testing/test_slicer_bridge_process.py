"""The process runner against real processes: the backend's events on a pipe, exit statuses,
and cancel (STOP file, SIGTERM, then killing the whole tree)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from MedTuningLib.slicer_bridge.commands import InfoParams, TrainParams, backend_argv
from MedTuningLib.slicer_bridge.process import BackendProcess, CommandChain, ExitKind, exit_kind

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def backend(*argv: str, **kwargs) -> BackendProcess:
    return BackendProcess([PY, "-m", "MedTuningLib", *argv, "--events", "jsonl"], pythonpath=ROOT, **kwargs)


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "fake_backend.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [PY, str(path)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_exit_kinds():
    assert exit_kind(0) is ExitKind.OK and exit_kind(2) is ExitKind.BAD_INPUT and exit_kind(3) is ExitKind.FAILURE
    assert exit_kind(130) is ExitKind.CANCELLED and exit_kind(-9) is ExitKind.KILLED
    assert exit_kind(-9, stop_requested=True) is ExitKind.CANCELLED and exit_kind(1) is ExitKind.FAILURE


def test_usage_error_from_the_real_backend(tmp_path):
    run = backend("train", "--library", str(tmp_path), cwd=tmp_path).start()
    assert run.running and run.pid
    assert run.wait(timeout=120) == 2
    assert run.exit is ExitKind.BAD_INPUT and not run.running
    assert run.state.error_code == "USAGE" and "--out" in run.state.error_message
    assert run.state.finished and not run.state.ok and run.reader.noise == []  # stdout held only events


def test_info_through_the_real_backend(tmp_path):
    """``info`` is a real sub-command; whatever this build answers, state and exit status agree."""
    run = BackendProcess(backend_argv(PY, InfoParams()), pythonpath=ROOT, cwd=tmp_path).start()
    status = run.wait(timeout=300)
    assert status is not None and run.state.finished
    assert run.state.ok == (status == 0)
    if status != 0:
        assert run.state.error_code and run.state.error_message


def test_poll_never_blocks_and_sees_events_as_they_come(tmp_path):
    argv = script(tmp_path, """
        import json, sys, time
        for i in range(3):
            sys.stdout.write(json.dumps({"event": "progress", "phase": "train", "step": i + 1, "total": 3}))
            sys.stdout.flush()
            time.sleep(0.3)
            sys.stdout.write("\\n"); sys.stdout.flush()   # the line completes later: a partial line
        print("a stray print", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        print(json.dumps({"event": "done", "status": "ok", "outputs": {"x": "ü"}}), flush=True)
    """)
    run = BackendProcess(argv).start()
    steps, slowest = [], 0.0
    while not run.finished:
        t0 = time.monotonic()
        for event in run.poll():
            steps.append(event.get("step"))
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.02)
    assert slowest < 0.2  # a UI timer tick never waits on the process
    assert steps == [1, 2, 3, None] and run.state.ok and run.state.outputs == {"x": "ü"}
    assert run.reader.noise == ["a stray print"] and "to stderr" in run.stderr_tail()


def test_crash_without_events_reports_stderr(tmp_path):
    run = BackendProcess(script(tmp_path, "raise SystemExit('boom: out of disk')")).start()
    assert run.wait(timeout=60) == 1
    assert run.exit is ExitKind.FAILURE and run.state.finished and not run.state.ok
    assert "boom: out of disk" in run.state.error_hint and "exit status 1" in run.state.error_message


COOPERATIVE = """
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(json.dumps({"event": "start", "command": "train", "child": child.pid}), flush=True)
    workdir = Path(os.environ["MEDTUNING_WORKDIR"])
    stop = {"why": None}
    signal.signal(signal.SIGTERM, lambda *a: stop.update(why="SIGTERM"))
    while stop["why"] is None:
        if (workdir / "STOP").exists():
            stop["why"] = "STOP file"
        time.sleep(0.05)
    child.terminate(); child.wait()
    (workdir / "resume.json").write_text(json.dumps({"why": stop["why"]}))
    print(json.dumps({"event": "done", "status": "cancelled", "outputs": {"why": stop["why"]}}), flush=True)
    sys.exit(130)
"""


def wait_for_event(run: BackendProcess, kind: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in run.poll():
            if event["event"] == kind:
                return event
        time.sleep(0.02)
    raise AssertionError(f"no {kind} event")


def test_cooperative_cancel_writes_stop_and_ends_cleanly(tmp_path):
    workdir = tmp_path / "model.partial"
    workdir.mkdir()
    (workdir / "STOP").write_text("left over from an earlier cancel", encoding="utf-8")
    run = BackendProcess(script(tmp_path, COOPERATIVE), workdir=workdir, grace_s=30).start()
    child = wait_for_event(run, "start")["child"]  # a stale STOP was removed, or it would have stopped
    assert alive(child)
    run.request_stop()
    assert (workdir / "STOP").exists()
    assert run.wait(timeout=30) == 130
    assert run.exit is ExitKind.CANCELLED and not run.killed and run.state.cancelled
    assert (workdir / "resume.json").exists() and not alive(child)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is a POSIX signal")
def test_stop_file_alone_is_honoured(tmp_path):
    workdir = tmp_path / "work"
    run = BackendProcess(script(tmp_path, COOPERATIVE), workdir=workdir).start()
    wait_for_event(run, "start")
    (workdir / "STOP").write_text("", encoding="utf-8")
    assert run.wait(timeout=30) == 130 and run.state.outputs == {"why": "STOP file"}


STUBBORN = """
    import json, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
                              "print(g.pid, flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    print(json.dumps({"event": "start", "command": "train", "child": child.pid, "grandchild": grandchild}), flush=True)
    while True:
        time.sleep(0.1)
"""


def test_stubborn_process_tree_is_killed_after_the_grace_period(tmp_path):
    run = BackendProcess(script(tmp_path, STUBBORN), workdir=tmp_path / "w", grace_s=1.0).start()
    start = wait_for_event(run, "start")
    pids = [run.pid, start["child"], start["grandchild"]]
    assert all(alive(p) for p in pids)
    run.request_stop()
    t0 = time.monotonic()
    assert run.wait(timeout=30) is not None
    assert run.killed and time.monotonic() - t0 >= 0.9
    assert run.exit is ExitKind.CANCELLED and run.state.cancelled  # asked for, so a cancel
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_kill_tree_without_asking_is_reported_as_killed(tmp_path):
    run = BackendProcess(script(tmp_path, STUBBORN)).start()
    wait_for_event(run, "start")
    run.kill_tree()
    run.wait(timeout=30)
    assert run.exit is ExitKind.KILLED and not run.state.ok and "killed" in run.state.error_message


def test_chain_runs_steps_in_order_and_stops_at_a_failure(tmp_path):
    ok = script(tmp_path, 'import json; print(json.dumps({"event": "done", "status": "ok"}))')
    order = []

    def step(name: str, argv: list[str]):
        def make() -> BackendProcess:
            order.append(name)
            return BackendProcess(argv)
        return make

    chain = CommandChain([step("add 1", ok), step("add 2", ok)]).start()
    assert chain.wait(timeout=60) and order == ["add 1", "add 2"] and chain.ok
    order.clear()
    bad = backend("train", "--library", str(tmp_path)).argv
    chain = CommandChain([step("add", ok), step("bad", bad), step("never", ok)]).start()
    assert chain.wait(timeout=120) is False and order == ["add", "bad"]
    assert chain.last.state.error_code == "USAGE"


def test_chain_cancel_stops_current_and_skips_the_rest(tmp_path):
    chain = CommandChain([lambda: BackendProcess(script(tmp_path, COOPERATIVE), workdir=tmp_path / "w"),
                          lambda: pytest.fail("a cancelled chain must not start the next step")]).start()
    wait_for_event(chain.current, "start")
    chain.request_stop()
    assert chain.wait(timeout=30) is False and chain.completed[0].state.cancelled


def test_train_command_workdir_is_where_stop_goes(tmp_path):
    params = TrainParams(library=tmp_path / "lib", out=tmp_path / "M")
    run = BackendProcess(backend_argv(PY, params), workdir=params.workdir())
    assert run.env["MEDTUNING_WORKDIR"] == str(tmp_path / "M.partial")
