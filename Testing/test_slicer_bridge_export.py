"""Case-export naming: safe, readable, unique file names from any node name."""

from __future__ import annotations

import re

import pytest

from MedTuningLib.slicer_bridge.export import (ExportNamer, plan_case_export, safe_stem, suggest_case_id,
                                               unique_node_name)

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.mark.parametrize("name, expected", [
    ("CT chest", "CT_chest"), ("CT chest ü", "CT_chest_u"), ("Ñandú/../../etc", "Nandu_.._.._etc"),
    ("  MR  T1 (ce)  ", "MR_T1_ce"), ("CON", "CON_"), ("com1.nrrd", "com1.nrrd_"), ("a:b*c?", "a_b_c"),
])
def test_safe_stem(name, expected):
    assert safe_stem(name) == expected


@pytest.mark.parametrize("name", ["", "肾脏", "🫘🫘", "...", "الكلى", "x" * 500, "a\x00b", "..\\..\\win"])
def test_safe_stem_is_always_a_plain_file_name(name):
    stem = safe_stem(name)
    assert SAFE.match(stem) and not stem.startswith(".") and len(stem) <= 70 and "/" not in stem


def test_different_non_latin_names_stay_different():
    assert safe_stem("肾脏") != safe_stem("肝脏")
    assert safe_stem("肾脏") == safe_stem("肾脏")  # stable


def test_namer_unique_case_insensitive_and_respects_existing_files(tmp_path):
    (tmp_path / "ct.nrrd").write_text("x", encoding="utf-8")
    namer = ExportNamer(tmp_path)
    first = namer.path("CT")
    second = namer.path("ct")
    third = namer.path("C T") and namer.path("CT")
    assert first.name == "CT_2.nrrd" and second.name == "ct_3.nrrd" and third.name == "CT_4.nrrd"
    assert namer.path("CT", ".seg.nrrd").name == "CT.seg.nrrd"  # another suffix is another file


def test_case_plan_writes_files_the_names_allow(tmp_path):
    plan = plan_case_export(tmp_path, ["T1 ce", "T1 ce", "FLAIR ü"], "Segmentation 肾")
    names = [p.name for p in plan.images]
    assert names == ["T1_ce.nrrd", "T1_ce_2.nrrd", "FLAIR_u.nrrd"]
    assert plan.label.name.endswith(".seg.nrrd") and plan.label.parent == tmp_path
    for path in [*plan.images, plan.label]:
        path.write_bytes(b"data")  # the names are valid on this file system
    assert len(list(tmp_path.iterdir())) == 4
    with pytest.raises(ValueError):
        plan_case_export(tmp_path, [], "seg")


def test_case_ids_and_node_names():
    assert suggest_case_id("CT chest", ["CT_chest", "ct_chest_2"]) == "CT_chest_3"
    assert suggest_case_id("", []) == "case"
    assert unique_node_name("CT segmentation", []) == "CT segmentation"
    assert unique_node_name("CT segmentation", ["CT segmentation", "CT segmentation (2)"]) == "CT segmentation (3)"
