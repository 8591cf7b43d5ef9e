"""``medtuning compare``: the paper-style table from model folders, in-process through the CLI."""

from __future__ import annotations

import csv
import io
import json
import sys
import types
from pathlib import Path

import pytest

from MedTuningLib.cli import main

FULL = 27_154_000


def _model(folder: Path, method: str, tuned: int, inserted: int, dice: dict, hd95: dict, seconds: float,
           memory: float, evaluation: bool = True, pretrained: bool = True) -> Path:
    """A model folder as 'medtuning train' writes it (only what compare reads is realistic)."""
    folder.mkdir(parents=True)
    best = {f"dice/{r}": v for r, v in dice.items()} | {"dice/mean": sum(dice.values()) / len(dice)}
    summary = {f"dice/{r}": {"mean": v, "std": 0.02, "n": 3} for r, v in dice.items()}
    summary |= {f"hd95/{r}": {"mean": v, "std": 1.0, "n": 3} for r, v in hd95.items()}
    manifest = {
        "format_version": 1,
        "architecture": {"arch": "swin_unet", "backbone": "swin_tiny_patch4_window7_224", "in_channels": 1,
                         "num_classes": 3, "method": method},
        "method": {"name": method, "adapter": {"alpha": 6.0}},
        "base_weights": {"id": "swin_tiny_patch4_window7_224.ms_in1k", "source": "file", "sha256": "ab" * 32,
                         "pretrained": pretrained},
        "pretrained": pretrained,
        "parameters": {"full": FULL, "tuned": tuned, "inserted": inserted, "head": 6_752_000},
        "label_scheme": {"name": "kits"}, "modalities": ["CT"], "preprocessing": {}, "crop": [16, 128, 128],
        "stored": "tuned",
        "training": {"epochs": 20, "seconds": seconds, "peak_memory_mb": memory, "best": best, "best_epoch": 18},
    }
    if evaluation:
        manifest["evaluation"] = {"split": "test", "regions": list(dice), "summary": summary,
                                  "cases": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}
    (folder / "medtuning.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture
def three_models(tmp_path):
    return [
        _model(tmp_path / "full", "full", FULL, 0, {"kidney": 0.91, "tumour": 0.62, "composite": 0.765},
               {"kidney": 4.1, "tumour": 12.0}, 1800.0, 9000.0),
        _model(tmp_path / "head", "head", 6_752_000, 0, {"kidney": 0.86, "tumour": 0.55, "composite": 0.705},
               {"kidney": 5.0, "tumour": 9.5}, 600.0, 4100.0),
        _model(tmp_path / "med", "med_tuning", 7_489_000, 738_000, {"kidney": 0.93, "tumour": 0.60, "composite": 0.765},
               {"kidney": 3.2, "tumour": 10.0}, 700.0, 4500.0),
    ]


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    return {r["model"]: r for r in rows}


def test_compare_three_model_folders(cli, tmp_path, three_models):
    out = tmp_path / "cmp"
    status, events = cli(["compare", *map(str, three_models), "--out", str(out)])
    assert status == 0, events
    done = events[-1]
    assert done["event"] == "done" and done["status"] == "ok"
    assert done["outputs"]["markdown"] == str(out / "compare.md") and Path(done["outputs"]["csv"]).is_file()
    table = next(e for e in events if e["event"] == "table")
    assert [r["method"] for r in table["rows"]] == ["full", "head", "med_tuning"]

    rows = _csv_rows(out / "compare.csv")
    best = {name: set(filter(None, r["best"].split(";"))) for name, r in rows.items()}
    assert best["med"] >= {"dice/kidney", "hd95/kidney", "dice/composite"}  # a tie on composite with full
    assert best["full"] >= {"dice/tumour", "dice/composite"}
    assert best["head"] >= {"tuned_params", "tuned_percent_of_full", "training_minutes", "peak_memory_mb", "hd95/tumour"}
    assert "inserted_params" in best["head"] and "inserted_params" in best["full"]  # zero inserted: lower is better
    assert float(rows["med"]["tuned_percent_of_full"]) == pytest.approx(100 * 7_489_000 / FULL)
    assert rows["med"]["metrics_source"] == "last evaluation: test (3 cases)"
    assert "dice/mean" not in rows["med"]  # only the evaluation's regions

    md = (out / "compare.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "tuned params (M)" in header and "inserted params (M)" in header and "Dice kidney" in header
    assert "HD95 tumour (mm)" in header and "training time (min)" in header and "peak memory (MB)" in header
    med_line = next(line for line in md.splitlines() if line.startswith("| med "))
    assert "**0.9300**" in med_line and "7.489" in med_line and "0.738" in med_line
    assert not list(out.glob(".*tmp*"))

    # an earlier comparison is never replaced silently
    before = (out / "compare.md").read_bytes()
    status, events = cli(["compare", str(three_models[0]), str(three_models[1]), "--out", str(out)])
    assert status == 2 and events[-1]["code"] == "OUTPUT_EXISTS" and "--force" in events[-1]["hint"]
    assert (out / "compare.md").read_bytes() == before
    status, events = cli(["compare", str(three_models[0]), str(three_models[1]), "--out", str(out), "--force"])
    assert status == 0 and (out / "compare.md").read_bytes() != before


def test_compare_text_mode_prints_markdown(tmp_path, three_models, capsys):
    assert main(["compare", *map(str, three_models)]) == 0
    out = capsys.readouterr().out
    assert "| model | method |" in out and "**0.9300**" in out and "Best value per column in bold" in out


def test_compare_falls_back_to_training_figures_and_says_so(cli, tmp_path, three_models):
    extra = _model(tmp_path / "scratch", "scratch", FULL, 0, {"kidney": 0.7, "tumour": 0.3, "composite": 0.5},
                   {}, 2000.0, 9100.0, evaluation=False, pretrained=False)
    status, events = cli(["compare", str(three_models[0]), str(extra), "--out", str(tmp_path / "o")])
    assert status == 0, events
    rows = _csv_rows(tmp_path / "o" / "compare.csv")
    assert rows["scratch"]["metrics_source"] == "training: best validation"
    assert rows["scratch"]["method"] == "scratch (not pretrained)"
    assert rows["scratch"]["hd95/kidney"] == "" and "dice/mean" not in rows["scratch"]
    assert any(e["event"] == "log" and e["level"] == "warning" and "different sources" in e["message"]
               for e in events)
    # a validation Dice is not ranked against a test Dice; parameters still are
    assert not any(k.startswith(("dice/", "hd95/")) for r in rows.values() for k in r["best"].split(";"))
    assert "tuned_params" in rows["scratch"]["best"] or "tuned_params" in rows["full"]["best"]
    md = (tmp_path / "o" / "compare.md").read_text(encoding="utf-8")
    assert "**0.9100**" not in md and "not directly comparable" in md


@pytest.mark.parametrize("damage, code", [
    (lambda d: (d / "medtuning.json").write_text("{not json", encoding="utf-8"), "MODEL_FOLDER_INVALID"),
    (lambda d: (d / "medtuning.json").unlink(), "MODEL_FOLDER_INVALID"),
    (lambda d: (d / "medtuning.json").write_text("[1, 2]", encoding="utf-8"), "MODEL_FOLDER_INVALID"),
    (lambda d: (d / "medtuning.json").write_text('{"parameters": {"full": 1}}', encoding="utf-8"), "MODEL_FOLDER_INVALID"),
    (lambda d: (d / "medtuning.json").write_text('{"method": {"name": "full"}, "parameters": {"full": "x"}}', encoding="utf-8"),
     "MODEL_FOLDER_INVALID"),
])
def test_broken_model_folder_is_an_error_event(cli, three_models, damage, code):
    damage(three_models[1])
    status, events = cli(["compare", *map(str, three_models)])
    assert status == 2
    assert events[-1]["event"] == "error" and events[-1]["code"] == code
    assert str(three_models[1]) in events[-1]["message"] and events[-1]["hint"]


def test_missing_model_folder_mentions_unfinished_training(cli, tmp_path, three_models):
    (tmp_path / "late.partial").mkdir()
    status, events = cli(["compare", str(three_models[0]), str(tmp_path / "late")])
    assert status == 2 and events[-1]["code"] == "FILE_NOT_FOUND"
    assert "not finished" in events[-1]["hint"]


def test_compare_with_library_evaluates_every_model(cli, tmp_path, three_models, monkeypatch):
    """--library: each model evaluated on the same split (evaluate_model stood in for: no torch here)."""
    calls = []

    def fake_evaluate_model(model_dir, library, split, device, events):
        calls.append((Path(model_dir).name, Path(library), split, device))
        score = {"full": 0.8, "head": 0.7, "med": 0.85}[Path(model_dir).name]
        return {"model": str(model_dir), "split": split, "regions": ["spleen"],
                "cases": [{"id": "s1", "metrics": {"dice/spleen": score, "hd95/spleen": 10 * (1 - score)}}],
                "summary": {"dice/spleen": {"mean": score, "std": 0.0, "n": 1},
                            "hd95/spleen": {"mean": 10 * (1 - score), "std": 0.0, "n": 1}}}

    stand_in = types.ModuleType("MedTuningLib.engine.evaluate")
    stand_in.evaluate_model = fake_evaluate_model
    import MedTuningLib.engine  # noqa: F401  (the package itself is light)

    monkeypatch.setitem(sys.modules, "MedTuningLib.engine.evaluate", stand_in)
    status, events = cli(["compare", *map(str, three_models), "--library", str(tmp_path / "lib"),
                          "--split", "val", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert status == 0, events
    assert calls == [(n, tmp_path / "lib", "val", "cpu") for n in ("full", "head", "med")]
    rows = _csv_rows(tmp_path / "o" / "compare.csv")
    assert rows["med"]["metrics_source"] == "evaluated: val (1 case)"
    assert "dice/kidney" not in rows["med"] and rows["med"]["dice/spleen"] == "0.85"
    assert set(rows["med"]["best"].split(";")) >= {"dice/spleen", "hd95/spleen"}
