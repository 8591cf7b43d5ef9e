"""The README documents what the code does: every error code, the two quick-start commands."""

from __future__ import annotations

from pathlib import Path

from MedTuningLib.errors import CATALOGUE

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_error_code_is_documented():
    missing = [code for code in CATALOGUE if f"`{code}`" not in README]
    assert not missing, f"add these codes to the README's error table (medtuning info --errors): {missing}"


def test_quick_start_is_the_two_make_commands():
    quick = README.split("## Quick start", 1)[1].split("```")[1]
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == ["make demo", "make test"]
