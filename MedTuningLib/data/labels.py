"""Label schemes: which source label values are trained as which class, what is evaluated, what is written.

docs/method.md, "Label schemes": a scheme has training classes (disjoint sets of source label values,
trained with softmax), evaluation regions (unions of classes) and says which of the two are written
as segments. Presets ship as package data (``MedTuningLib/presets/kits.json``, ``brats.json``); a
custom scheme comes from the segment names of the user's .seg.nrrd files or from an explicit mapping
such as ``"Kidney=2,3;Spleen=1"`` for unnamed labelmaps. Class index 0 is always background.
"""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from MedTuningLib.errors import MedTuningError

PRESETS = ("kits", "brats")
BRATS_SOURCES = ("brats2015", "brats2019", "brats2023")

# What 3D Slicer gives a new segment: the generic "Tissue" entry of its default anatomy list.
GENERIC_TERMINOLOGY: dict[str, Any] = {
    "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
    "category": ["SCT", "85756007", "Tissue"],
    "type": ["SCT", "85756007", "Tissue"],
    "anatomicContextName": "Anatomic codes - DICOM master list",
}

# Distinct colours for segments that bring none (custom --labels schemes), 0..1 RGB.
PALETTE: list[tuple[float, float, float]] = [
    (0.502, 0.682, 0.502), (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.690),
    (0.863, 0.961, 0.078), (0.306, 0.247, 0.000), (1.000, 0.980, 0.863), (0.902, 0.863, 0.275),
]


@dataclass
class ClassDef:
    """A training class: the source label values it is made of (empty when matched by segment name)."""

    name: str
    source_values: list[int] = field(default_factory=list)


@dataclass
class RegionDef:
    """An evaluation region: a union of classes (1-based class indices)."""

    name: str
    class_indices: list[int]


@dataclass
class SegmentDef:
    """A segment written into results: name, colour (0..1 RGB) and terminology in slicerio's dict form."""

    name: str
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    terminology: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(GENERIC_TERMINOLOGY))


# Characters no segment name, description or terminology entry may hold: they end or add lines of a NRRD
# header (a crafted name could add or change header fields), or reorder text (bidirectional overrides).
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Slicer serialises terminology as fields joined by "^", entries by "~" and tags by "|".
TERMINOLOGY_SEPARATORS = "~^|"
MAX_NAME_LENGTH = 200


def text_problem(text: Any, what: str, separators: str = "", max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why ``text`` cannot go into a file format (None when it can): not text, empty, too long, a control
    character or line break, a bidirectional override, or one of ``separators``."""
    if not isinstance(text, str):
        return f"{what} {text!r} is not text"
    if not text.strip() and what.endswith("name"):
        return f"{what} is empty"
    if len(text) > max_length:
        return f"{what} {text[:40]!r}… is longer than {max_length} characters"
    for char in text:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in _BIDI_CONTROLS:
            return f"{what} {text!r} holds the control character U+{ord(char):04X}"
        if char in separators:
            return f"{what} {text!r} holds {char!r}, which separates fields in .seg.nrrd or DICOM files"
        if ord(char) > 127:  # the NRRD library behind slicerio writes headers as ASCII only
            return (f"{what} {text!r} holds {char!r}: .seg.nrrd segment names and terminology are written as plain "
                    "ASCII (letters without accents, digits, punctuation)")
    return None


def _terminology_problem(terminology: Any, what: str) -> str | None:
    if not isinstance(terminology, dict):
        return f"the terminology of {what} is not an object"
    for key, value in terminology.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is None:
                continue
            problem = text_problem(item, f"terminology {key} of {what}", TERMINOLOGY_SEPARATORS, 500)
            if problem:
                return problem
    return None


def normalize_name(name: str) -> str:
    """Segment names compare case-, accent-form- and separator-insensitively ("Left_Lung" == "left lung")."""
    text = unicodedata.normalize("NFKC", name).casefold().replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def terminology_matches(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Same category, type and type modifier codes (coding scheme + value; meanings may differ)."""
    if not a or not b:
        return False

    def code(entry: dict[str, Any], key: str) -> tuple[str, str] | None:
        value = entry.get(key)
        if not value or not any(value[:2]):
            return None
        return (str(value[0]), str(value[1]))

    if code(a, "category") is None or code(a, "type") is None:
        return False
    return all(code(a, key) == code(b, key) for key in ("category", "type", "typeModifier"))


@dataclass
class LabelScheme:
    """Classes (trained), regions (evaluated), segments (written); see the module docstring."""

    task: str
    classes: list[ClassDef]
    regions: list[RegionDef]
    write: str = "classes"  # "classes" or "regions"
    segments: list[SegmentDef] = field(default_factory=list)
    composite: list[str] = field(default_factory=list)
    source: str | None = None  # the source label convention (brats2015 / brats2019 / brats2023)
    # Source values in no class: "error" (presets: a wrong convention is caught) or "background"
    # (explicit --labels mappings: organs the user did not name are background).
    unlisted: str = "error"

    def __post_init__(self) -> None:
        self.validate()

    # -- basic facts --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of network outputs, background included."""
        return len(self.classes) + 1

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def by_segment_name(self) -> bool:
        """Custom schemes built from .seg.nrrd files have no source values: classes match by name."""
        return not any(c.source_values for c in self.classes)

    def validate(self) -> None:
        def bad(message: str) -> MedTuningError:
            return MedTuningError("LABEL_SPEC_INVALID", f"label scheme '{self.task}': {message}",
                                  "fix the --labels mapping or the scheme in medtuning.json")

        if not self.classes:
            raise bad("it has no classes")
        # Names and terminology are written into .seg.nrrd headers, DICOM SEG, JSON and HTML (issue 15).
        for kind, items in (("class", self.classes), ("region", self.regions), ("segment", self.segments)):
            for item in items:
                problem = text_problem(item.name, f"{kind} name", "\\")  # DICOM's value separator
                if problem:
                    raise bad(problem)
        for segment in self.segments:
            problem = _terminology_problem(segment.terminology, f"segment {segment.name!r}")
            color = segment.color
            if problem is None and (not isinstance(color, (tuple, list)) or len(color) != 3 or not all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in color)):
                problem = f"segment {segment.name!r} has the colour {color!r}, not three numbers from 0 to 1"
            if problem:
                raise bad(problem)
        for name in self.composite:
            if text_problem(name, "composite region name"):
                raise bad(text_problem(name, "composite region name"))
        names = [normalize_name(c.name) for c in self.classes]
        if len(set(names)) != len(names):
            raise bad("two classes have the same name")
        seen: dict[int, str] = {}
        for cls in self.classes:
            for value in cls.source_values:
                if value == 0:
                    raise bad(f"class '{cls.name}' uses label value 0, which is background")
                if value in seen:
                    raise bad(f"label value {value} is in both '{seen[value]}' and '{cls.name}'")
                seen[value] = cls.name
        for region in self.regions:
            if not region.class_indices or any(not 1 <= i <= len(self.classes) for i in region.class_indices):
                raise bad(f"region '{region.name}' refers to classes that do not exist")
        if self.write not in ("classes", "regions"):
            raise bad(f"write must be 'classes' or 'regions', not {self.write!r}")
        wanted = self.region_names if self.write == "regions" else self.class_names
        if self.segments and sorted(self.segment_names) != sorted(wanted):
            raise bad(f"segments {self.segment_names} must be the {self.write} {wanted}")
        if self.unlisted not in ("error", "background"):
            raise bad(f"unlisted must be 'error' or 'background', not {self.unlisted!r}")

    def class_index(self, name: str) -> int | None:
        """1-based index of the class called ``name`` (name compared loosely), or None."""
        key = normalize_name(name)
        for index, cls in enumerate(self.classes, start=1):
            if normalize_name(cls.name) == key:
                return index
        return None

    def segment(self, name: str) -> SegmentDef | None:
        key = normalize_name(name)
        return next((s for s in self.segments if normalize_name(s.name) == key), None)

    # -- arrays -------------------------------------------------------------------------------
    def lookup_table(self) -> dict[int, int]:
        """Source label value -> class index."""
        return {value: index for index, cls in enumerate(self.classes, start=1) for value in cls.source_values}

    def encode(self, values: np.ndarray, what: str = "label") -> np.ndarray:
        """Source label values -> class indices (uint8; 0 = background). UNKNOWN_LABEL_VALUES otherwise."""
        if self.by_segment_name:
            raise MedTuningError(
                "LABEL_SPEC_INVALID", f"the '{self.task}' scheme matches segments by name, but the {what} is "
                "a labelmap without segment names",
                'give the labels as .seg.nrrd with named segments, or a mapping such as --labels "Kidney=2,3;Spleen=1"')
        values = np.asarray(values)
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise MedTuningError("UNKNOWN_LABEL_VALUES", f"the {what} holds non-integer values: is it an image "
                                     "rather than a label?", "give a labelmap with integer label values")
            values = values.astype(np.int64)
        table = self.lookup_table()
        present, inverse = np.unique(values, return_inverse=True)
        mapped = np.zeros(len(present), dtype=np.uint8 if self.num_classes < 256 else np.int16)
        unknown = []
        for i, value in enumerate(present.tolist()):
            if value == 0:
                continue
            if value in table:
                mapped[i] = table[value]
            elif self.unlisted == "background" and value > 0:  # a negative value is never a label (issue 15)
                mapped[i] = 0
            else:
                unknown.append(int(value))
        if unknown:
            known = ", ".join(f"{c.name}={','.join(map(str, c.source_values))}" for c in self.classes)
            hint = "check the label file, or choose a scheme that defines these values"
            if self.task == "brats":
                hint = ("the BraTS label convention may be another one: try --source-labels "
                        + " / ".join(s for s in BRATS_SOURCES if s != self.source))
            raise MedTuningError("UNKNOWN_LABEL_VALUES",
                                 f"the {what} holds label values {unknown[:20]} that the '{self.task}' scheme "
                                 f"({self.source or 'classes'}: {known}) does not define", hint,
                                 values=unknown[:20])
        return mapped[inverse].reshape(values.shape)

    def region_masks(self, class_map: np.ndarray) -> dict[str, np.ndarray]:
        """One boolean mask per evaluation region, by region name."""
        return {r.name: np.isin(class_map, r.class_indices) for r in self.regions}

    def class_masks(self, class_map: np.ndarray) -> dict[str, np.ndarray]:
        """One boolean mask per class (background excluded), by class name."""
        return {c.name: class_map == i for i, c in enumerate(self.classes, start=1)}

    def output_masks(self, class_map: np.ndarray) -> dict[str, np.ndarray]:
        """The masks written as segments, in ``segments`` order (regions overlap; classes do not)."""
        masks = self.region_masks(class_map) if self.write == "regions" else self.class_masks(class_map)
        return {s.name: masks[s.name] for s in self.segments}

    def decode_regions(self, masks: dict[str, np.ndarray]) -> np.ndarray:
        """Class map from region masks (e.g. corrected BraTS ET / TC / WT segments read back).

        Each voxel gets the class whose region memberships match the voxel's (ET+TC+WT -> ET class,
        TC+WT -> necrosis, WT only -> oedema). A voxel whose memberships fit no class (e.g. ET drawn
        outside WT) takes the smallest region containing it, which is what the annotator drew last.
        """
        shape = next(iter(masks.values())).shape
        membership = np.zeros(shape, dtype=np.int64)  # bit r set: voxel inside region r
        bits = {}
        for r_index, region in enumerate(self.regions):
            bits[region.name] = 1 << r_index
            if region.name in masks:
                membership |= np.where(masks[region.name], bits[region.name], 0)
        out = np.zeros(shape, dtype=np.uint8 if self.num_classes < 256 else np.int16)
        given = [r for r in self.regions if r.name in masks]
        signature = {}
        for c_index in range(1, len(self.classes) + 1):
            sig = sum(bits[r.name] for r in given if c_index in r.class_indices)
            signature.setdefault(sig, c_index)
        matched = np.zeros(shape, dtype=bool)
        for sig, c_index in signature.items():
            if sig == 0:
                continue
            hit = membership == sig
            out[hit] = c_index
            matched |= hit
        leftover = (membership != 0) & ~matched
        if leftover.any():
            for region in sorted(given, key=lambda r: -len(r.class_indices)):  # smallest region last wins
                sel = leftover & masks[region.name]
                out[sel] = min(region.class_indices)
        return out

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "source": self.source, "write": self.write, "unlisted": self.unlisted,
            "classes": [{"name": c.name, "source_values": list(c.source_values)} for c in self.classes],
            "regions": [{"name": r.name, "classes": list(r.class_indices)} for r in self.regions],
            "composite": list(self.composite),
            "segments": [{"name": s.name, "color": [round(float(v), 6) for v in s.color],
                          "terminology": copy.deepcopy(s.terminology)} for s in self.segments],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelScheme":
        try:
            classes = [ClassDef(str(c["name"]), [int(v) for v in c.get("source_values", [])])
                       for c in data["classes"]]
            regions = []
            for r in data.get("regions", []):
                indices = [int(i) if not isinstance(i, str) else _class_index_by_name(classes, i)
                           for i in r["classes"]]
                regions.append(RegionDef(str(r["name"]), indices))
            segments = [SegmentDef(str(s["name"]), tuple(float(v) for v in s.get("color", (0.5, 0.5, 0.5))),
                                   dict(s.get("terminology") or GENERIC_TERMINOLOGY)) for s in data.get("segments", [])]
            return cls(task=str(data.get("task", "custom")), classes=classes, regions=regions,
                       write=str(data.get("write", "classes")), segments=segments,
                       composite=[str(n) for n in data.get("composite", [])], source=data.get("source"),
                       unlisted=str(data.get("unlisted", "error")))
        except (KeyError, TypeError, ValueError) as exc:
            raise MedTuningError("LABEL_SPEC_INVALID", f"the label scheme description is incomplete: {exc}",
                                 "the model folder or preset is damaged") from exc


def _class_index_by_name(classes: Sequence[ClassDef], name: str) -> int:
    for index, cls in enumerate(classes, start=1):
        if normalize_name(cls.name) == normalize_name(name):
            return index
    raise ValueError(f"region refers to unknown class {name!r}")


# -- presets ------------------------------------------------------------------------------------

def load_preset_json(name: str) -> dict[str, Any]:
    """A preset file shipped in ``MedTuningLib/presets`` (package data)."""
    text = resources.files("MedTuningLib").joinpath("presets", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def scheme_from_preset(name: str, source: str | None = None) -> LabelScheme:
    """The ``kits`` or ``brats`` preset; ``source`` picks the BraTS label convention (default brats2015)."""
    if name not in PRESETS:
        raise MedTuningError("INVALID_OPTION", f"there is no label preset {name!r}",
                             f"choose one of {', '.join(PRESETS)}, or --task custom")
    data = load_preset_json(name)
    sources = data.pop("sources", None)
    if sources is not None:  # classes depend on the source convention
        source = source or data.get("default_source")
        if source not in sources:
            raise MedTuningError("INVALID_OPTION", f"unknown {name} label convention {source!r}",
                                 f"choose one of {', '.join(sources)}")
        data["classes"] = sources[source]["classes"]
        data["source"] = source
    elif source is not None:
        raise MedTuningError("INVALID_OPTION", f"the {name} preset has no source label conventions",
                             "drop --source-labels (it applies to the brats task)")
    return LabelScheme.from_dict(data)


_SPEC_ITEM = re.compile(r"^\s*(?P<name>[^=]+?)\s*=\s*(?P<values>[-0-9,\s]+?)\s*$")


def scheme_from_spec(spec: str, task: str = "custom") -> LabelScheme:
    """A custom scheme from ``"Kidney=2,3;Spleen=1"`` (ranges ``5-7`` allowed); other values are background."""
    classes: list[ClassDef] = []
    if not spec or not spec.strip():
        raise MedTuningError("LABEL_SPEC_INVALID", "the --labels mapping is empty",
                             'write it as NAME=VALUES separated by ";", e.g. "Kidney=2,3;Spleen=1"')
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        match = _SPEC_ITEM.match(item)
        if not match:
            raise MedTuningError("LABEL_SPEC_INVALID", f"cannot read {item!r} in the --labels mapping",
                                 'write each class as NAME=VALUES, e.g. "Kidney=2,3;Spleen=1"')
        values: list[int] = []
        try:
            for token in filter(None, (t.strip() for t in match["values"].split(","))):
                if "-" in token[1:]:
                    lo, hi = (int(v) for v in token.split("-", 1))
                    if hi < lo:
                        raise ValueError(token)
                    values.extend(range(lo, hi + 1))
                else:
                    values.append(int(token))
        except ValueError:
            raise MedTuningError("LABEL_SPEC_INVALID", f"label values in {item!r} are not integers or ranges",
                                 'write values as 2,3 or 5-7') from None
        if not values or any(v < 0 for v in values):
            raise MedTuningError("LABEL_SPEC_INVALID", f"{item!r} needs positive label values",
                                 "0 is background and cannot be a class")
        classes.append(ClassDef(match["name"], values))
    segments = [SegmentDef(c.name, PALETTE[i % len(PALETTE)]) for i, c in enumerate(classes)]
    regions = [RegionDef(c.name, [i]) for i, c in enumerate(classes, start=1)]
    return LabelScheme(task=task, classes=classes, regions=regions, write="classes", segments=segments,
                       unlisted="background")


def scheme_from_segmentations(paths: Iterable[Path], names: Sequence[str] | None = None,
                              task: str = "custom") -> LabelScheme:
    """A custom scheme from the segment names of .seg.nrrd files (every case must have them).

    ``names`` keeps a subset (e.g. the two lungs of a chest segmentation); by default all segments of
    the first file, and every other file must have the same set (SEGMENT_NAMES_MISMATCH otherwise).
    Colours and terminology come from the first file that has each segment.
    """
    from MedTuningLib.data.io import read_segmentation_header

    paths = [Path(p) for p in paths]
    if not paths:
        raise MedTuningError("NO_TRAINING_CASES", "no segmentation files to take segment names from",
                             "add labelled cases (.seg.nrrd) to the library")
    headers = [(p, read_segmentation_header(p)) for p in paths]
    first_path, first = headers[0]
    all_of_first = names is None
    if names is None:
        names = [s.get("name", s.get("id", "")) for s in first["segments"]]
    if not names:
        raise MedTuningError("EMPTY_LABEL", f"{first_path} has no segments", "draw segments in 3D Slicer and save again")
    wanted = {normalize_name(n): n for n in names}
    if len(wanted) != len(names):
        raise MedTuningError("LABEL_SPEC_INVALID", "two segment names are the same", "rename the segments")
    found: dict[str, dict] = {}
    for path, header in headers:
        have = {normalize_name(s.get("name", "")): s for s in header["segments"]}
        missing = [n for k, n in wanted.items() if k not in have]
        # With all segments of the first case as classes, every case must have exactly that set.
        extra = [s.get("name", "") for k, s in have.items() if k not in wanted] if all_of_first else []
        if missing or extra:
            what = (f"has no segment named {', '.join(map(repr, missing))}" if missing
                    else f"has segments {', '.join(map(repr, extra))} that {first_path.name} does not have")
            raise MedTuningError(
                "SEGMENT_NAMES_MISMATCH", f"{path} {what} (its segments: "
                f"{', '.join(repr(s.get('name', '')) for s in header['segments'])})",
                "name the segments the same in every case (Segment Editor: double-click a name to rename), "
                "or choose the segments to train", path=str(path), missing=missing, extra=extra)
        for key, segment in have.items():
            found.setdefault(key, segment)
    classes = [ClassDef(n) for n in names]
    segments = []
    for i, n in enumerate(names):
        seg = found[normalize_name(n)]
        color = tuple(float(v) for v in seg.get("color", PALETTE[i % len(PALETTE)]))[:3]
        segments.append(SegmentDef(n, color, dict(seg.get("terminology") or GENERIC_TERMINOLOGY)))  # type: ignore[arg-type]
    regions = [RegionDef(n, [i]) for i, n in enumerate(names, start=1)]
    return LabelScheme(task=task, classes=classes, regions=regions, write="classes", segments=segments)


def scheme_for_task(task: str, labels: str | None = None, source: str | None = None,
                    segmentation_paths: Iterable[Path] = ()) -> LabelScheme:
    """The scheme a ``train`` command asks for: a preset, an explicit mapping, or segment names."""
    if task in PRESETS:
        return scheme_from_preset(task, source if task == "brats" else None)
    if labels:
        return scheme_from_spec(labels, task=task)
    return scheme_from_segmentations(segmentation_paths, task=task)
