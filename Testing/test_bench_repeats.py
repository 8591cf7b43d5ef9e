"""``bench train --repeats N``: methods interleaved in fresh processes, medians of the runs, ratios taken
within each repeat, with their spread. A benchmark, not a timed test: no speed is asserted."""

from __future__ import annotations

import json
import statistics

from MedTuningLib.bench.train_bench import combine_repeats

TINY = ["--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224", "--crop", "2x32x32", "--device", "cpu"]


def test_ratios_are_taken_within_a_repeat_then_their_median():
    def run(full, med):
        return {"same_settings": {"full": {"step_s": full, "peak_mb": 100.0, "time_ratio": 1.0, "memory_ratio": 1.0,
                                           "tuned": 10},
                                  "med_tuning": {"step_s": med, "peak_mb": 50.0, "time_ratio": round(med / full, 3),
                                                 "memory_ratio": 0.5, "tuned": 2}}}

    # A slow spell in the second repeat slows both methods: the ratio stays, the raw times do not.
    combined = combine_repeats([run(1.0, 0.7), run(2.0, 1.4), run(1.0, 0.8)])["same_settings"]
    med = combined["med_tuning"]
    assert med["repeats"] == 3 and med["time_ratio_runs"] == [0.7, 0.7, 0.8]
    assert med["time_ratio"] == 0.7 and med["time_ratio_spread"] == [0.7, 0.8]
    assert med["step_s"] == 0.8 and med["step_s_runs"] == [0.7, 1.4, 0.8]
    assert combined["full"]["time_ratio"] == 1.0 and combined["full"]["time_ratio_spread"] == [1.0, 1.0]


def test_bench_train_repeats_end_to_end(cli, tmp_path):
    out = tmp_path / "train.json"
    status, events = cli(["bench", "train", *TINY, "--batch", "1", "--in-channels", "1", "--classes", "2",
                          "--methods", "full,med_tuning", "--steps", "1", "--warmup", "1", "--repeats", "2",
                          "--json", str(out)])
    assert status == 0, events[-3:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["config"]["repeats"] == 2
    logs = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("bench train:")]
    order = [m.split(":")[1].split("(")[0].strip() for m in logs if "same settings" in m]
    assert order == ["full", "med_tuning", "full", "med_tuning"]  # interleaved, not A A B B
    med = data["same_settings"]["med_tuning"]
    assert med["repeats"] == 2 and len(med["time_ratio_runs"]) == 2
    assert med["time_ratio"] == round(statistics.median(med["time_ratio_runs"]), 4)
    low, high = med["time_ratio_spread"]
    assert low <= med["time_ratio"] <= high
    done = [e for e in events if e["event"] == "done"][-1]
    assert "spread" in done["outputs"]["tables"]["same_settings"].splitlines()[0]
