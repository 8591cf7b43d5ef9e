"""Warm starts (``--init-from``, ``medtuning retune``): the parent model's label scheme, modalities and base
weights, and the given options that would contradict them."""

from __future__ import annotations

from typing import Callable

from MedTuningLib.engine.train_options import TrainOptions
from MedTuningLib.errors import MedTuningError


def warm_start_scheme(opts: TrainOptions, parent):
    """The label scheme of the model a run warm-starts from; given options that contradict it are refused."""
    from MedTuningLib.data.labels import LabelScheme, normalize_name, scheme_from_spec

    scheme = LabelScheme.from_dict(parent.label_scheme)
    given = opts.explicit
    model = opts.init_from

    def refuse(what: str, theirs: object, ours: object) -> MedTuningError:
        return MedTuningError("INVALID_OPTION", f"--{what} {ours} contradicts the model {model}, trained with "
                              f"{what} {theirs}: a warm start keeps the model's setup",
                              f"drop --{what} (the model's is used), or train a new model without --init-from")

    if "task" in given and given["task"] != scheme.task:
        raise refuse("task", scheme.task, given["task"])
    if "source_labels" in given and scheme.source and given["source_labels"] != scheme.source:
        raise refuse("source-labels", scheme.source, given["source_labels"])
    if "labels" in given:
        wanted = scheme_from_spec(given["labels"], task=scheme.task)
        if [(normalize_name(c.name), sorted(c.source_values)) for c in wanted.classes] != [
                (normalize_name(c.name), sorted(c.source_values)) for c in scheme.classes]:
            spec = ";".join(f"{c.name}={','.join(map(str, c.source_values))}" for c in scheme.classes)
            raise refuse("labels", repr(spec), repr(given["labels"]))
    if "segments" in given and [normalize_name(n) for n in given["segments"]] != [
            normalize_name(n) for n in scheme.class_names]:
        raise refuse("segments", repr(",".join(scheme.class_names)), repr(",".join(given["segments"])))
    for key, theirs in (("arch", parent.arch), ("backbone", parent.backbone), ("method", parent.method_name)):
        if key in given and theirs and given[key] != theirs:
            raise refuse(key, theirs, given[key])
    return scheme


def warm_start_modalities(opts: TrainOptions, parent, library_modalities: list[str],
                          log: Callable[[str], None]) -> list[str]:
    """The model's modalities (channel order); the library's cases must have as many."""
    theirs = list(parent.modalities)
    if len(library_modalities) != len(theirs):
        raise MedTuningError("MODALITY_COUNT_MISMATCH", f"the model {opts.init_from} reads {len(theirs)} modalities "
                             f"({', '.join(theirs)}); the library's cases have {len(library_modalities)} "
                             f"({', '.join(library_modalities)})",
                             "re-tune on a library whose cases have the model's modalities, in its channel order")
    if [m.casefold() for m in library_modalities] != [m.casefold() for m in theirs]:
        log(f"the library names its modalities {library_modalities}, the model {theirs}: they are used in the "
            "model's channel order")
    return theirs


def warm_start_weights(opts: TrainOptions, parent) -> str | None:
    """``--weights`` for a warm start: only where the model's own base-weights file now lies (sha256 checked)."""
    if opts.weights is None:
        return None
    source = str(parent.base_weights.get("source") or "")
    if opts.weights in ("hub", "none"):
        if opts.weights == source:  # the same as recorded: nothing to override
            return None
        raise MedTuningError("INVALID_OPTION", f"--weights {opts.weights}: the model {opts.init_from} was tuned on "
                             f"base weights from '{source}' ({parent.base_weights.get('id') or 'random'})",
                             "drop --weights (the model's base weights are used), or give the base-weights FILE "
                             "when it has moved (its sha256 is checked)")
    return opts.weights


def warm_start_spacing(opts: TrainOptions, parent) -> tuple[float, float, float] | None:
    """The model's working spacing (z, y, x), or None (native); a given ``--spacing`` that differs is refused."""
    from MedTuningLib.data.spacing import describe, parse_spacing_option, same_spacing

    theirs = tuple(reversed(parent.spacing)) if parent.spacing else None
    given = opts.explicit.get("spacing")
    wanted = parse_spacing_option(given) if given is not None else "auto"
    if wanted == "auto":  # for a warm start: the model's
        return theirs  # type: ignore[return-value]
    ours = None if wanted == "native" else wanted
    if (ours is None) != (theirs is None) or (ours is not None and not same_spacing(ours, theirs)):
        raise MedTuningError("INVALID_OPTION", f"--spacing {given} contradicts the model {opts.init_from}, trained "
                             f"at the working spacing {describe(theirs)}: a warm start keeps the model's setup",
                             "drop --spacing (the model's is used), or train a new model without --init-from")
    return theirs  # type: ignore[return-value]
