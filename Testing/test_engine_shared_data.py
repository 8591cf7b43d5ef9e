"""train / segment / evaluate on the real volumes of ../shared/data (skipped where it is absent).

These check the pipeline on real files and label conventions with tiny models (seconds of training),
not accuracy: the README's results table comes from examples/real_data.sh.
"""

from __future__ import annotations

import json

import numpy as np
import slicerio

TINY = ["--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224",
        "--backbone-args", "depth=4,embed_dim=48,num_heads=2,patch_size=16", "--decoder-width", "16",
        "--weights", "none", "--batch", "2", "--device", "cpu", "--precision", "fp32", "--epochs", "1",
        "--steps-per-epoch", "2", "--val-every", "5"]


def test_brats_2015_labels_give_overlapping_et_tc_wt(shared_data, cli, tmp_path):
    cases = ["brats_2013_pat0003_1", "brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    library = tmp_path / "brats"
    # A 32-slice slab through the tumours (slices 58-142 in these cases) of each case, on a 2 mm working grid:
    # the label conventions and the scores are the point here, not the full volumes (whose reading, resampling
    # and HD95 on 240x240x155 took most of a minute); segment below still reads a whole volume.
    for i, case in enumerate(cases):
        folder = shared_data / "brats2015" / case
        status, events = cli(["cases", "add", "--library", str(library), "--id", case, "--slices", "80:112",
                              "--split", "test" if i == 2 else "train",
                              "--image", str(folder / "Flair_subtrMeanDivStd.nii.gz"), "--modality", "FLAIR",
                              "--image", str(folder / "T1c_subtrMeanDivStd.nii.gz"), "--modality", "T1c",
                              "--label", str(folder / "OTMultiClass.nii.gz")])
        assert status == 0, events[-1]
    model = tmp_path / "brats-model"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--task", "brats",
                          "--source-labels", "brats2015", "--crop", "16x128x128", "--spacing", "2,2,2", *TINY])
    assert status == 0, events[-2:]
    manifest = json.loads((model / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["modalities"] == ["FLAIR", "T1c"]
    assert [s["name"] for s in manifest["label_scheme"]["segments"]] == ["ET", "TC", "WT"]
    test_case = shared_data / "brats2015" / cases[2]
    out = tmp_path / "pat6.seg.nrrd"
    status, events = cli(["segment", "--model", str(model), "--image", str(test_case / "Flair_subtrMeanDivStd.nii.gz"),
                          "--image", str(test_case / "T1c_subtrMeanDivStd.nii.gz"), "--out", str(out)])
    assert status == 0, events[-2:]
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["ET", "TC", "WT"]
    assert seg["voxels"].shape[-3:] == (240, 240, 155)  # layers first: ET, TC, WT overlap
    assert seg["voxels"].ndim == 4
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--report", str(tmp_path / "r")])
    assert status == 0, events[-2:]
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert report["regions"] == ["ET", "TC", "WT"] and [c["id"] for c in report["cases"]] == [cases[2]]
    assert all(f"hd95/{r}" in report["cases"][0]["metrics"] for r in report["regions"])


def test_kidneys_on_abdominal_ct_with_a_held_out_slab(shared_data, cli, tmp_path):
    ct, seg = shared_data / "abdomen-ct-mr" / "ct.nii.gz", shared_data / "abdomen-ct-mr" / "ct_seg.nii.gz"
    library = tmp_path / "kidney"
    for case_id, split, slices in (("train-slab", "train", "0:86"), ("held-out-slab", "test", "86:")):
        status, events = cli(["cases", "add", "--library", str(library), "--id", case_id, "--split", split,
                              "--slices", slices, "--image", str(ct), "--modality", "CT", "--label", str(seg)])
        assert status == 0, events[-1]
    model = tmp_path / "kidney-model"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Kidney=2,3",
                          "--crop", "16x64x64", *TINY])
    assert status == 0, events[-2:]
    manifest = json.loads((model / "medtuning.json").read_text(encoding="utf-8"))
    assert manifest["preprocessing"]["kinds"] == ["CT"]
    status, events = cli(["evaluate", "--model", str(model), "--library", str(library), "--report", str(tmp_path / "r")])
    assert status == 0, events[-2:]
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert [c["id"] for c in report["cases"]] == ["held-out-slab"]
    assert 0.0 <= report["summary"]["dice/Kidney"]["mean"] <= 1.0


def test_spleen_segmentation_has_the_input_geometry(shared_data, cli, tmp_path):
    import SimpleITK as sitk

    ct, seg = shared_data / "spleen-ct" / "ct.nii.gz", shared_data / "spleen-ct" / "ct_seg.nii.gz"
    library = tmp_path / "spleen"
    status, events = cli(["cases", "add", "--library", str(library), "--id", "train-slab", "--slices", "0:16",
                          "--image", str(ct), "--modality", "CT", "--label", str(seg)])
    assert status == 0, events[-1]
    model = tmp_path / "spleen-model"
    status, events = cli(["train", "--library", str(library), "--out", str(model), "--labels", "Spleen=1",
                          "--crop", "8x64x64", *TINY])
    assert status == 0, events[-2:]
    out = tmp_path / "spleen.seg.nrrd"
    status, events = cli(["segment", "--model", str(model), "--image", str(ct), "--out", str(out)])
    assert status == 0, events[-2:]
    result = slicerio.read_segmentation(str(out))
    image = sitk.ReadImage(str(ct))
    assert result["voxels"].shape[-3:] == image.GetSize()
    ijk = np.array(result["ijkToLPS"])
    # NIfTI is RAS on disk; SimpleITK and Slicer both work in LPS, so the origins must agree in LPS.
    np.testing.assert_allclose(ijk[:3, 3], image.GetOrigin(), atol=1e-4)
