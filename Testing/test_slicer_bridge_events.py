"""Event parsing: partial lines, noise, unknown kinds, and the progress state the UI shows."""

from __future__ import annotations

import io
import json

import pytest

from MedTuningLib.events import EventStream
from MedTuningLib.slicer_bridge.events import EventReader, RunState, format_duration, parse_line


def lines(*events: dict) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events).encode("utf-8")


TRAIN_RUN = [
    {"event": "start", "command": "train", "version": "0.1.0", "device": "cpu", "t": 0.0},
    {"event": "progress", "phase": "prepare", "step": 1, "total": 2, "t": 0.1},
    {"event": "progress", "phase": "train", "step": 5, "total": 10, "epoch": 1, "epochs": 2, "eta_s": 85.2, "t": 1},
    {"event": "metric", "phase": "train", "epoch": 1, "name": "loss", "value": 0.9, "t": 2},
    {"event": "metric", "phase": "validate", "epoch": 1, "name": "dice/Kidney", "value": 0.5, "t": 2},
    {"event": "metric", "phase": "validate", "epoch": 1, "name": "dice/Kidney tumour", "value": 0.25, "t": 2},
    {"event": "checkpoint", "path": "M.partial/state", "epoch": 1, "best": True, "t": 2},
    {"event": "progress", "phase": "train", "step": 10, "total": 10, "epoch": 2, "epochs": 2, "eta_s": 3, "t": 3},
    {"event": "metric", "phase": "train", "epoch": 2, "name": "loss", "value": 0.4, "t": 4},
    {"event": "metric", "phase": "validate", "epoch": 2, "name": "dice/Kidney", "value": 0.7, "t": 4},
    {"event": "log", "level": "warning", "message": "few cases", "t": 4},
    {"event": "done", "status": "ok", "outputs": {"model": "/m/M"}, "t": 5},
]


def test_byte_by_byte_equals_whole():
    data = lines(*TRAIN_RUN)
    whole = EventReader().feed(data)
    reader = EventReader()
    pieces = [e for i in range(len(data)) for e in reader.feed(data[i:i + 1])] + reader.close()
    assert pieces == whole == TRAIN_RUN


def test_multibyte_letter_split_across_chunks():
    data = lines({"event": "log", "level": "info", "message": "Niere links ü 肾"})
    cut = data.index("ü".encode()) + 1  # inside the two-byte letter
    reader = EventReader()
    assert reader.feed(data[:cut]) == []
    assert reader.feed(data[cut:])[0]["message"] == "Niere links ü 肾"


def test_last_line_without_newline_counts_at_close():
    reader = EventReader()
    assert reader.feed(b'{"event": "done", "status": "ok"') == []
    assert reader.feed(b', "outputs": {}}') == []
    assert reader.close() == [{"event": "done", "status": "ok", "outputs": {}}]


def test_noise_and_crlf_and_non_events_are_kept_apart():
    reader = EventReader()
    events = reader.feed(b'warning from a library\r\n{"event": "log", "message": "x"}\r\n[1, 2]\n{broken\n'
                         b'{"no_event": 1}\n\n')
    assert events == [{"event": "log", "message": "x"}]
    assert reader.noise == ["warning from a library", "[1, 2]", "{broken", '{"no_event": 1}']
    assert parse_line("  ") is None


def test_train_run_state():
    state = RunState()
    seen = []
    for event in TRAIN_RUN[:3]:
        state.apply(event)
        seen.append(state.progress)
    assert state.command == "train" and state.device == "cpu"
    assert state.progress == pytest.approx(0.25)  # epoch 1 of 2, half way
    assert state.eta_s == 85.2 and "1:25 left" in state.status_text and "epoch 1/2" in state.status_text
    state.apply_all(TRAIN_RUN[3:])
    assert state.last_loss == 0.4
    assert state.val_dice == {"Kidney": 0.7, "Kidney tumour": 0.25}
    assert [(p.x, p.value) for p in state.curves["train/loss"]] == [(1, 0.9), (2, 0.4)]
    assert [(p.x, p.value) for p in state.curves["validate/dice/Kidney"]] == [(1, 0.5), (2, 0.7)]
    assert state.checkpoints == [{"path": "M.partial/state", "epoch": 1, "best": True}]
    assert state.warnings == ["few cases"]
    assert state.ok and state.finished and state.progress == 1.0 and state.outputs == {"model": "/m/M"}


def test_progress_never_goes_back_within_a_phase_and_handles_zero_based_epochs():
    state = RunState()
    state.apply({"event": "progress", "phase": "train", "step": 0, "total": 4, "epoch": 0, "epochs": 2})
    assert state.progress == 0.0 and "epoch 1/2" in state.status_text
    state.apply({"event": "progress", "phase": "train", "step": 4, "total": 4, "epoch": 0, "epochs": 2})
    assert state.progress == pytest.approx(0.5)
    state.apply({"event": "progress", "phase": "validate", "step": 1, "total": 10})
    assert state.progress == pytest.approx(0.5)  # a validation pass does not move the bar back
    assert state.status_text.startswith("Validating")


def test_unknown_kinds_fields_and_bad_values_are_ignored():
    state = RunState()
    state.apply({"event": "heartbeat", "x": 1})
    state.apply({"event": "progress", "phase": "infer", "step": "three", "total": None, "new_field": [1]})
    state.apply({"event": "metric", "phase": "train", "name": "loss", "value": None})  # NaN written as null
    state.apply({"event": "metric", "phase": "train", "name": 3, "value": 1.0})
    state.apply({"no": "event"})
    assert state.events_seen == 3 and state.last_loss is None and state.curves == {}
    assert state.status_text.startswith("Segmenting")


def test_error_and_cancel():
    state = RunState()
    state.apply({"event": "error", "code": "LABEL_GRID_MISMATCH", "message": "grids differ", "hint": "resample"})
    assert state.finished and not state.ok and state.error_code == "LABEL_GRID_MISMATCH"
    assert state.error_hint == "resample" and "LABEL_GRID_MISMATCH" in state.status_text
    state = RunState(command="train")
    state.apply({"event": "done", "status": "cancelled", "outputs": {"resume": "M.partial"}})
    assert state.cancelled and not state.ok and "resumed" in state.status_text


def test_reads_what_the_real_event_stream_writes():
    out = io.StringIO()
    stream = EventStream("jsonl", out=out)
    stream.start("segment", device="cpu")
    stream.progress("infer", 3, 6, eta_s=float("nan"))
    stream.metric("validate", "dice/ET", 0.8, epoch=1)
    stream.error("FILE_NOT_FOUND", "no such file", "check the path")
    state = RunState()
    state.apply_all(EventReader().feed(out.getvalue().encode()))
    assert state.command == "segment" and state.progress == 0.5 and state.eta_s is None
    assert state.val_dice == {"ET": 0.8} and state.error_code == "FILE_NOT_FOUND"


def test_format_duration():
    assert format_duration(85.2) == "1:25" and format_duration(4000) == "1:06:40"
    assert format_duration(None) == "" and format_duration(-1) == ""
