"""``bench train --repeats N``: methods interleaved in fresh processes, medians of the runs, ratios taken
within each repeat, with their spread. A benchmark, not a timed test: no speed is asserted."""

from __future__ import annotations

from MedTuningLib.bench.train_bench import combine_repeats


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

# The end-to-end run of --repeats is part of test_bench.py::test_bench_train_end_to_end.
