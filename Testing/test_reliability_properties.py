"""Issue 6, item 5: property-based tests (hypothesis) of the readers, the event stream and the manifest.

- Readers: any small volume with any spacing, origin and axis-aligned direction, written as NRRD or NIfTI,
  reads back as the same array on the same grid; any truncation, random bytes or damaged header gives
  FILE_UNREADABLE (or another MedTuningError), never another exception.
- Events: any field values (NaN, infinities, unicode, nesting) give exactly one valid JSON line each.
- Manifest: cases round-trip; any path string either resolves inside the library or is refused with
  PATH_ESCAPES_LIBRARY.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from MedTuningLib.errors import MedTuningError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])

# Axis-aligned directions: every permutation of the axes with every sign (what NRRD and NIfTI both store exactly).
DIRECTIONS = [tuple(float(v) for v in (np.eye(3)[list(perm)] * np.asarray(signs)[:, None]).T.ravel())
              for perm in itertools.permutations(range(3)) for signs in itertools.product((1, -1), repeat=3)]

shapes = st.tuples(st.integers(2, 6), st.integers(2, 7), st.integers(2, 7))
spacings = st.tuples(*[st.floats(0.05, 8.0, allow_nan=False) for _ in range(3)])
origins = st.tuples(*[st.floats(-2000.0, 2000.0, allow_nan=False) for _ in range(3)])
dtypes = st.sampled_from([np.float32, np.int16, np.uint8, np.float64, np.int32])
suffixes = st.sampled_from([".nrrd", ".nii.gz", ".nii", ".mha"])


_BASE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _scratch_base(tmp_path_factory):
    _BASE.append(tmp_path_factory.mktemp("properties"))
    yield
    _BASE.pop()


def _scratch() -> Path:
    """A fresh folder per example, under pytest's temporary folder (cleaned up like the others)."""
    base = _BASE[-1] if _BASE else None
    return Path(tempfile.mkdtemp(prefix="ex-", dir=base))


@SETTINGS
@given(shape=shapes, spacing=spacings, origin=origins, direction=st.sampled_from(DIRECTIONS), dtype=dtypes,
       suffix=suffixes, seed=st.integers(0, 2**31 - 1))
def test_volumes_round_trip_with_their_geometry(shape, spacing, origin, direction, dtype, suffix, seed):
    from MedTuningLib.data.io import read_image

    rng = np.random.default_rng(seed)
    array = (rng.normal(0, 100, shape) if np.dtype(dtype).kind == "f" else
             rng.integers(0, 200, shape)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path = _scratch() / f"volume{suffix}"
    sitk.WriteImage(image, str(path), suffix.endswith(".gz") or suffix == ".nrrd")
    back = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), array.astype(np.float32))
    tolerance = 1e-5 if suffix in (".nrrd", ".mha") else 1e-4  # NIfTI stores float32 geometry
    np.testing.assert_allclose(back.GetSpacing(), spacing, rtol=tolerance)
    np.testing.assert_allclose(back.GetOrigin(), origin, rtol=tolerance, atol=tolerance * 2000)
    np.testing.assert_allclose(back.GetDirection(), direction, atol=1e-5)


def _valid_file(suffix: str) -> bytes:
    image = sitk.GetImageFromArray(np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5))
    image.SetSpacing((0.7, 0.8, 2.5))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"v{suffix}"
        sitk.WriteImage(image, str(path), suffix.endswith(".gz"))
        return path.read_bytes()


VALID = {suffix: _valid_file(suffix) for suffix in (".nrrd", ".nii.gz", ".nii", ".mha")}


@SETTINGS
@given(suffix=st.sampled_from(sorted(VALID)), fraction=st.floats(0.0, 0.995))
def test_any_truncation_is_file_unreadable(suffix, fraction):
    from MedTuningLib.data.io import read_image

    data = VALID[suffix]
    cut = int(len(data) * fraction)
    assume(cut < len(data))
    path = _scratch() / f"cut{suffix}"
    path.write_bytes(data[:cut])
    with pytest.raises(MedTuningError) as info:
        read_image(path)
    assert info.value.code == "FILE_UNREADABLE", (cut, len(data), info.value)
    assert info.value.hint


@SETTINGS
@given(suffix=st.sampled_from([".nrrd", ".nii.gz", ".nii", ".mha", ".seg.nrrd", ".txt"]),
       data=st.binary(min_size=0, max_size=2000))
def test_random_bytes_are_file_unreadable(suffix, data):
    from MedTuningLib.data.io import read_image

    path = _scratch() / f"random{suffix}"
    path.write_bytes(data)
    with pytest.raises(MedTuningError) as info:
        read_image(path)
    assert info.value.code == "FILE_UNREADABLE", info.value


@SETTINGS
@given(suffix=st.sampled_from(sorted(VALID)), edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                            min_size=1, max_size=8))
def test_damaged_headers_never_raise_anything_but_a_medtuning_error(suffix, edits):
    """Bytes of the header changed at random: the file reads (as some 3D volume) or is refused with a code."""
    from MedTuningLib.data.io import read_image

    data = bytearray(VALID[suffix])
    for position, value in edits:
        data[position % len(data)] = value
    path = _scratch() / f"damaged{suffix}"
    path.write_bytes(bytes(data))
    try:
        image = read_image(path)
    except MedTuningError as exc:
        assert exc.code in ("FILE_UNREADABLE", "IMAGE_DIMENSION", "NON_FINITE_VOXELS", "IMAGE_GEOMETRY_AMBIGUOUS",
                            "IMAGE_GRID_SHEARED"), exc
    else:
        assert image.GetDimension() == 3 and np.isfinite(sitk.GetArrayViewFromImage(image)).all()


@SETTINGS
@given(data=st.binary(min_size=0, max_size=3000))
def test_damaged_segmentations_are_file_unreadable(data):
    from MedTuningLib.data.io import read_segmentation_header

    path = _scratch() / "label.seg.nrrd"
    path.write_bytes(data)
    try:
        read_segmentation_header(path)
    except MedTuningError as exc:
        assert exc.code == "FILE_UNREADABLE"


# ------------------------------------------------------------------------------------------------
# the event stream
# ------------------------------------------------------------------------------------------------

# Text as file names and messages bring it: any code point except lone surrogates (tested on their own below).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True,
                                                                                         allow_infinity=True), texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
field_names = texts.filter(lambda k: k not in ("event", "t"))


def _decode_all(payload: bytes) -> list[dict]:
    text = payload.decode("utf-8")
    assert text.endswith("\n") or not text
    lines = text.split("\n")[:-1]
    return [json.loads(line) for line in lines]


def _same(sent, got) -> bool:
    if isinstance(sent, float) and not math.isfinite(sent):
        return got is None
    if isinstance(sent, (list, tuple)):
        return isinstance(got, list) and len(sent) == len(got) and all(map(_same, sent, got))
    if isinstance(sent, dict):
        return isinstance(got, dict) and set(map(str, sent)) == set(got) and all(
            _same(v, got[str(k)]) for k, v in sent.items())
    return sent == got


@SETTINGS
@given(kind=st.sampled_from(["start", "progress", "metric", "log", "checkpoint", "error", "done"]),
       fields=st.lists(st.dictionaries(field_names, values, max_size=5), min_size=1, max_size=4))
def test_any_event_is_one_valid_json_line(kind, fields):
    from MedTuningLib.events import EventStream

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", newline="\n", write_through=True)
    stream = EventStream("jsonl", out=out, err=io.StringIO())
    for f in fields:
        stream.emit(kind, **f)
    out.flush()
    events = _decode_all(raw.getvalue())
    assert len(events) == len(fields)
    for sent, got in zip(fields, events):
        assert got["event"] == kind and isinstance(got["t"], (int, float))
        for key, value in sent.items():
            assert _same(value, got[key]), (key, value, got[key])


def test_numpy_torch_and_paths_in_events_are_plain_json():
    import torch

    from MedTuningLib.events import EventStream

    buf = io.StringIO()
    stream = EventStream("jsonl", out=buf)
    stream.metric("train", "loss", np.float32("nan"), epoch=np.int64(3), extra=[torch.tensor(2.5), Path("a b/é")])
    stream.progress("train", 1, 2, eta_s=float("inf"))
    first, second = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert first["value"] is None and first["epoch"] == 3 and first["extra"] == [2.5, "a b/é"]
    assert second["eta_s"] is None


def test_file_names_that_are_not_utf8_still_give_a_json_line():
    from MedTuningLib.events import EventStream

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    name = os.fsdecode(b"scan-\xff\xfe.nrrd")  # how Python sees such a file name on Linux
    EventStream("jsonl", out=out).error("FILE_UNREADABLE", f"the image {name} cannot be read", "check it")
    out.flush()
    assert len(_decode_all(raw.getvalue())) == 1


# ------------------------------------------------------------------------------------------------
# the manifest
# ------------------------------------------------------------------------------------------------

ids = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)
rel_paths = st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"),
                             min_size=1, max_size=12).filter(lambda p: p not in (".", "..")),
                     min_size=1, max_size=3).map("/".join)
cases_strategy = st.lists(
    st.fixed_dictionaries({
        "id": ids,
        "images": st.dictionaries(ids, rel_paths, min_size=1, max_size=3),
        "label": rel_paths,
        "split": st.sampled_from(["train", "val", "test"]),
        "provenance": st.fixed_dictionaries({"from": st.sampled_from(["import", "scene", "correction"]),
                                             "source": texts}),
    }), max_size=5, unique_by=lambda c: c["id"])


@SETTINGS
@given(cases=cases_strategy)
def test_manifest_round_trips(cases):
    from MedTuningLib.cases import Case, manifest_to_dict, parse_manifest

    root = _scratch()
    parsed = parse_manifest(json.loads(json.dumps(manifest_to_dict(
        [Case.from_dict(c, root) for c in cases]), ensure_ascii=False)), root)
    assert [c.to_dict() for c in parsed] == [{**c, "images": dict(c["images"])} for c in cases]
    for case in parsed:
        for path in [*case.image_paths, case.label_path]:
            assert str(path.resolve()).startswith(str(root.resolve()) + os.sep)


segment = st.one_of(st.sampled_from(["..", ".", "", "~", "cases", "a b", "é", "\\..", "..\\x", "C:", "/"]),
                    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=6))
any_path = st.one_of(st.lists(segment, max_size=5).map("/".join), st.lists(segment, max_size=5).map("\\".join),
                     st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30))


@pytest.fixture(scope="module")
def library_with_a_way_out(tmp_path_factory):
    """A library folder holding a symbolic link that points outside it."""
    root = tmp_path_factory.mktemp("prop-lib") / "library"
    (root / "cases" / "c1").mkdir(parents=True)
    outside = root.parent / "outside"
    outside.mkdir()
    (root / "cases" / "link").symlink_to(outside, target_is_directory=True)
    return root


@SETTINGS
@given(rel=st.one_of(any_path, any_path.map(lambda p: "cases/link/" + p)))
def test_manifest_paths_never_escape_the_library(rel, library_with_a_way_out):
    from MedTuningLib.cases import resolve_inside

    root = library_with_a_way_out
    base = root.resolve()
    try:
        resolved = resolve_inside(root, rel)
    except MedTuningError as exc:
        assert exc.code == "PATH_ESCAPES_LIBRARY" and exc.hint
        return
    except (ValueError, OSError):  # e.g. names the OS cannot represent: refused, but not silently accepted
        pytest.fail(f"{rel!r} raised something other than PATH_ESCAPES_LIBRARY")
    real = resolved.resolve()
    assert real == base or base in real.parents, (rel, real)


@SETTINGS
@given(rel=any_path)
def test_a_manifest_naming_any_path_is_refused_or_stays_inside(rel, library_with_a_way_out):
    from MedTuningLib.cases import CaseLibrary

    root = library_with_a_way_out
    manifest = {"format_version": 1, "cases": [{"id": "x", "images": {"CT": rel}, "label": "cases/c1/label.nrrd",
                                                 "split": "train"}]}
    (root / "cases.json").write_text(json.dumps(manifest), encoding="utf-8")
    try:
        cases = CaseLibrary(root).cases()
    except MedTuningError as exc:
        assert exc.code in ("PATH_ESCAPES_LIBRARY", "LIBRARY_INVALID"), exc
    else:
        real = cases[0].image_paths[0].resolve()
        assert real == root.resolve() or root.resolve() in real.parents
    finally:
        (root / "cases.json").unlink()
