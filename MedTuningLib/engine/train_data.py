"""Training data: cases read and normalised in memory, and the crops drawn from them.

Crops are prepared by a MONAI :class:`~monai.data.Dataset` behind a torch
:class:`~torch.utils.data.DataLoader` (``--workers N``: N worker processes prepare crops while the step runs;
0: the main process prepares each batch before its step). Which case each crop comes from is decided in the
main process (:class:`CropOrder`); every crop carries its own seed, derived from the epoch's seed (itself
from ``(seed, epoch, rank)``) and its place in the epoch, for its position, flips and intensity change. So
the crops are the same whatever ``--workers`` is, and an epoch replayed after a resume draws them again.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import apply_transform
from torch.utils.data import DataLoader, Sampler

from MedTuningLib.errors import MedTuningError

from MedTuningLib.engine.train_options import DEFAULT_WORKERS  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from MedTuningLib.engine.train_options import TrainOptions


def make_scheme(opts: TrainOptions, label_paths: list[Path]):
    from MedTuningLib.data.labels import scheme_from_segmentations, scheme_for_task

    if opts.task == "custom" and not opts.labels:
        segs = [p for p in label_paths if p.name.lower().endswith(".seg.nrrd")]
        if len(segs) != len(label_paths):
            raise MedTuningError("LABEL_SPEC_INVALID",
                                 "a custom task needs segment names: some labels are plain labelmaps",
                                 'name the labels with --labels "Name=1;Other=2,3", or add the cases as .seg.nrrd')
        return scheme_from_segmentations(segs, names=opts.segments)
    return scheme_for_task(opts.task, labels=opts.labels, source=opts.source_labels)


def is_lateral(scheme) -> bool:
    """True when classes differ only by side (right / left lung, kidney): then no left-right flips."""
    for segment in scheme.segments:
        words = segment.name.lower().replace("_", " ").split()
        modifier = (segment.terminology or {}).get("typeModifier") or []
        if "right" in words or "left" in words or any(str(m).lower() in ("right", "left") for m in modifier):
            return True
    return False


def read_raw_case(case, scheme, cache=None, allow_empty: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """A library case as arrays: image ``[C, D, H, W]`` (not yet normalised), label ``[D, H, W]`` class indices.

    Decoding (gzip NIfTI, .seg.nrrd layers) is what costs; the cache keeps the decoded arrays between
    runs (re-tuning on the same library, resume, evaluation).
    """
    from MedTuningLib.data.io import read_case_images, read_label

    def build():
        image, reference = read_case_images(case.image_paths, log=log)
        label = read_label(case.label_path, reference, scheme, allow_empty=allow_empty, log=log)
        spacing = [float(s) for s in reversed(reference.GetSpacing())]  # (z, y, x)
        return image.astype(np.float32), label.astype(np.uint8), {"spacing": spacing}

    if cache is None:
        image, label, meta = build()
    else:
        image, label, meta = cache.get_or_compute(case.image_paths, case.label_path, None, scheme, build)
    return {"id": case.id, "image": image, "label": label, "spacing": tuple(meta["spacing"])}


# Codes of a label that the scheme cannot map: re-raised naming the case (and the model, for a warm start).
_LABEL_CODES = ("UNKNOWN_LABEL_VALUES", "SEGMENT_NAMES_MISMATCH", "LABEL_SPEC_INVALID", "EMPTY_LABEL")


def read_case_for(case, scheme, cache=None, allow_empty: bool = False, log: Callable[[str], None] | None = None,
                  model: Path | None = None) -> dict:
    """:func:`read_raw_case`, with a label the scheme cannot map refused by a message that names the case."""
    try:
        return read_raw_case(case, scheme, cache, allow_empty=allow_empty, log=log)
    except MedTuningError as exc:
        if exc.code not in _LABEL_CODES or "case" in exc.details:
            raise
        whose = f"the label scheme of model {model}" if model is not None else f"the '{scheme.task}' label scheme"
        hint = exc.hint
        if model is not None:
            hint = (f"{hint}; a re-tune keeps {whose} (classes {', '.join(scheme.class_names)}): fix or remove case "
                    f"{case.id!r} ('medtuning cases remove --id {case.id}'), or train a new model")
        raise MedTuningError(exc.code, f"case {case.id!r}: {exc.message} ({whose})", hint,
                             **{**exc.details, "case": case.id}) from exc


def normalise_cases(raw: list[dict], preprocessing) -> list[dict]:
    from MedTuningLib.data.preprocess import normalize_intensity

    return [{"id": c["id"], "image": normalize_intensity(c["image"], preprocessing), "label": c["label"][None],
             "spacing": c["spacing"]} for c in raw]


def select_cases(opts: "TrainOptions", library) -> tuple[list, list, str]:
    """The training and validation cases of the run, and how validation is done (for the model folder)."""
    # Honest scores: test cases are only ever scored (recorded in the model folder), never trained on
    # and never used to pick the best epoch; unlabelled scans have nothing to train on.
    if opts.val_split == "test":
        raise MedTuningError("INVALID_OPTION", "--val-split test would pick the best epoch on the held-out test "
                             "cases, so their scores would no longer be held out",
                             "validate on a 'val' split (medtuning cases split --id ID --split val), or leave "
                             "--val-split at its default; test cases are scored after training anyway")
    for ids, what in ((opts.train_case_ids, "train on"), (opts.val_case_ids, "validate on")):
        for case_id in ids or []:
            case = library.get(case_id)
            if case.split in ("test", "unlabelled"):
                raise MedTuningError("INVALID_OPTION", f"case {case_id!r} is in split '{case.split}': a run may "
                                     f"not {what} it", "choose train or val cases", case=case_id)
    if opts.train_case_ids is not None:
        train = [library.get(i) for i in opts.train_case_ids]
    else:
        train = library.cases("train")
    if not train:
        raise MedTuningError("NO_TRAINING_CASES", f"the case library {opts.library} has no training cases",
                             "add cases with 'medtuning cases add --library ... --split train'")
    if opts.val_case_ids is not None:
        val = [library.get(i) for i in opts.val_case_ids]
    else:
        val = library.cases(opts.val_split) if opts.val_split != "train" else []
    protocol = f"validation on the '{opts.val_split}' split"
    if not val:
        val = list(train)
        protocol = "validation on the training cases (no validation cases in the library: self-fit)"
    modalities = train[0].modalities
    for case in train + val:
        if list(case.modalities) != list(modalities):
            raise MedTuningError("MODALITY_COUNT_MISMATCH",
                                 f"case {case.id} has modalities {case.modalities}, case {train[0].id} has "
                                 f"{modalities}", "train on cases that share the same modalities in the same order")
    return train, val, protocol


@dataclass
class TrainingData:
    """The cases of a run, read, on the working grid and normalised, with what the model folder records."""

    train_cases: list  # library cases
    val_cases: list
    protocol: str  # how validation is done
    scheme: object  # the label scheme
    modalities: list[str]
    preprocessing: object  # data.preprocess.Preprocessing, fitted on the training cases (or the parent's)
    train: list[dict]  # {"id", "image" [C, D, H, W] normalised, "label" [1, D, H, W], "spacing"}
    val: list[dict]
    flip_axes: tuple[int, ...]  # axes crops and test-time augmentation may flip


def read_cases(cases: list, n_train: int, scheme, cache, events, cancel, model: Path | None) -> tuple[list, list]:
    """The raw arrays of ``cases`` (the first ``n_train`` for training, the rest for validation), with progress."""
    raw_train: list[dict] = []
    raw_val: list[dict] = []
    events.progress("prepare", 0, len(cases))
    for i, case in enumerate(cases):
        cancel.check()
        is_val = i >= n_train
        (raw_val if is_val else raw_train).append(
            read_case_for(case, scheme, cache, allow_empty=is_val, log=events.log, model=model))
        events.progress("prepare", i + 1, len(cases))
    return raw_train, raw_val


def onto_working_grid(raw: list[dict], spacing: tuple[float, float, float] | None) -> None:
    """Resample raw cases in place onto the working spacing (images linear, labels nearest); None: keep."""
    from MedTuningLib.data.spacing import to_working_grid

    for case in raw:
        case["image"] = to_working_grid(case["image"], case["spacing"], spacing)
        case["label"] = to_working_grid(case["label"], case["spacing"], spacing, nearest=True)
        case["spacing"] = spacing or case["spacing"]


# ------------------------------------------------------------------------------------------------
# crops
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropKey:
    """One crop to prepare: the index of its case and the seed of its random position, flips and intensity."""

    case: int
    seed: int


def crop_seed(epoch_seed: int, index: int) -> int:
    """The seed of the ``index``-th crop of an epoch whose generators were seeded with ``epoch_seed``."""
    return int(np.random.SeedSequence([epoch_seed % 2**32, index]).generate_state(1)[0])


class CropDataset(Dataset):
    """Training crops of cases held in memory: item :class:`CropKey` -> ``(image [C, D, H, W], label [1, D, H, W])``.

    The MONAI training transforms (data/transforms.py) are reseeded from the key, so a crop does not depend on
    which process prepares it nor on what that process prepared before.
    """

    def __init__(self, cases: list[dict], crop: tuple[int, int, int], num_classes: int,
                 flip_axes: tuple[int, ...] = (0, 1, 2), sampling: str = "foreground",
                 intensity: str = "global") -> None:
        from MedTuningLib.data.transforms import training_transforms

        super().__init__(data=cases, transform=training_transforms(crop, num_classes=num_classes, flip_axes=flip_axes,
                                                                   sampling=sampling, intensity=intensity))
        from MedTuningLib.data.transforms import crop_centre_indices

        # Foreground sampling draws crop centres among the label's voxels: their indices once per case.
        self.indices = [crop_centre_indices(case["label"], crop) if sampling == "foreground" else {}
                        for case in cases]

    def _transform(self, key: CropKey) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        case = self.data[key.case]
        self.transform.set_random_state(seed=key.seed)
        sample = apply_transform(self.transform, {"image": case["image"], "label": case["label"],
                                                  **self.indices[key.case]})
        if isinstance(sample, list):  # crop transforms with num_samples return a list
            sample = sample[0]
        return (torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32),
                torch.as_tensor(np.asarray(sample["label"])).long())


class CropOrder(Sampler):
    """The keys of an epoch's crops, drawn in the main process (so ``--workers`` cannot change them).

    ``random``: each crop from a case drawn at random; ``shuffle`` (official DistributedSampler): every case once
    per pass, in an order drawn per epoch from (seed, epoch) alone, each process taking every world-th.
    """

    def __init__(self, num_cases: int, order: str = "random") -> None:
        self.num_cases = num_cases
        self.order = order
        self.epoch_seed = 0  # seed of the epoch's generators: case draws (random order) and crop seeds
        self.epoch = (0, 0, 0, 1)  # seed, epoch, rank, world: the shuffled order
        self.count: int | None = None  # crops in the epoch; None: as many as asked for

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("an open-ended crop order has no length")
        return self.count

    def __iter__(self) -> Iterator[CropKey]:
        rng = np.random.default_rng(self.epoch_seed)
        seed, epoch, rank, world = self.epoch
        queue: list[int] = []
        passes = 0
        index = 0
        while self.count is None or index < self.count:
            if self.order != "shuffle":
                case = int(rng.integers(self.num_cases))
            else:
                if not queue:
                    order = np.random.default_rng([seed, epoch, passes]).permutation(self.num_cases)
                    # Padded by repeating, as DistributedSampler.
                    order = np.resize(order, -(-len(order) // world) * world)
                    queue = [int(i) for i in order[rank::world]]
                    passes += 1
                case = queue.pop(0)
            yield CropKey(case, crop_seed(self.epoch_seed, index))
            index += 1


def _stack(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([image for image, _ in items]), torch.stack([label for _, label in items])


def _worker_init(worker_id: int) -> None:
    # Cancellation belongs to the main process: a Ctrl-C reaching the whole process group must not end a
    # worker mid-epoch (the main process cancels at its next step and shuts the workers down).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_failure(exc: BaseException, workers: int, dead: str = "") -> MedTuningError | None:
    """The user's error for a crop worker that died, or None when ``exc`` is something else. torch reports the
    death as a RuntimeError ("DataLoader worker ... killed by signal", from wherever the main process was when it
    noticed); while a batch is handed over it may surface as a broken connection instead: then ``dead`` names
    the worker processes found dead (:meth:`CropSampler.batch`)."""
    text = str(exc).strip() or type(exc).__name__
    if not dead and "DataLoader worker" not in text:
        return None
    import shutil

    shm = ""
    if Path("/dev/shm").is_dir():  # where the workers hand their crops over (Linux)
        usage = shutil.disk_usage("/dev/shm")
        shm = f"; /dev/shm has {usage.free / 2**20:.0f} of {usage.total / 2**20:.0f} MB free"
    cause = f"{dead}: {text}" if dead else text
    return MedTuningError("DATA_WORKERS_FAILED", f"a process preparing training crops died ({cause}){shm}",
                          f"--workers 0 prepares the crops in the training process instead (the same results, "
                          f"slower than --workers {workers}); in a container, give it more shared memory (docker run "
                          "--shm-size 2g); the run is resumable with --resume")


class CropSampler:
    """Training batches of random crops from cases held in memory, through a DataLoader over :class:`CropDataset`.

    Per epoch: :meth:`reseed` with the epoch's seed, :meth:`start_epoch` (shuffled order; ``crops`` ends the
    epoch's key stream so workers prepare no crop that is not used), then :meth:`batch` per micro-step.
    """

    def __init__(self, cases: list[dict], crop: tuple[int, int, int], num_classes: int,
                 flip_axes: tuple[int, ...] = (0, 1, 2), sampling: str = "foreground", intensity: str = "global",
                 order: str = "random", workers: int = 0, pin_memory: bool = False) -> None:
        self.cases = cases
        self.dataset = CropDataset(cases, crop, num_classes, flip_axes=flip_axes, sampling=sampling,
                                   intensity=intensity)
        self.keys = CropOrder(len(cases), order)
        self.workers = int(workers)
        self.pin_memory = pin_memory
        self._loader: DataLoader | None = None
        self._batches: Iterator | None = None

    def reseed(self, seed: int) -> None:
        self.keys.epoch_seed = seed % 2**32
        self._batches = None

    def start_epoch(self, seed: int, epoch: int, rank: int, world: int, crops: int | None = None) -> None:
        self.keys.epoch = (seed % 2**32, epoch, rank, world)
        self.keys.count = crops
        self._batches = None

    def _make_loader(self, size: int) -> DataLoader:
        extra: dict = {}
        if self.workers > 0:
            # Persistent: the workers (with their copy-on-write view of the cases) live for the whole run.
            extra = {"persistent_workers": True, "worker_init_fn": _worker_init, "prefetch_factor": 2}
        # Its own generator: the loader's per-epoch base seed must not draw on the global torch generator,
        # which the model's own random layers use (so --workers leaves the training itself unchanged too).
        return DataLoader(self.dataset, batch_size=size, sampler=self.keys, num_workers=self.workers,
                          collate_fn=_stack, pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0),
                          **extra)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``size`` crops of the epoch: images ``[B, C, D, H, W]`` float32, labels ``[B, 1, D, H, W]`` long."""
        if self._loader is None or self._loader.batch_size != size:
            self.close()
            self._loader = self._make_loader(size)
        if self._batches is None:
            self._batches = iter(self._loader)
        try:
            return next(self._batches)
        except StopIteration:
            raise RuntimeError(f"the epoch's {self.keys.count} crops are all used") from None
        except (RuntimeError, OSError, EOFError) as exc:
            dead = self._dead_workers()
            if dead:
                raise worker_failure(exc, self.workers, dead) from exc  # type: ignore[misc]
            raise

    def _dead_workers(self, wait_s: float = 10.0) -> str:
        """The worker processes that have ended, as ``worker pid 123 (signal SIGBUS)``; empty when all are alive.
        A dying worker breaks its connection before it has ended (a core dump takes a while): wait for it."""
        import time

        processes = getattr(getattr(self._loader, "_iterator", None), "_workers", None) or []
        deadline = time.monotonic() + wait_s
        ended = [p for p in processes if getattr(p, "exitcode", None) is not None]
        while processes and not ended and time.monotonic() < deadline:
            time.sleep(0.1)
            ended = [p for p in processes if getattr(p, "exitcode", None) is not None]
        described = []
        for process in ended:
            code = process.exitcode
            try:
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            except ValueError:
                how = f"exit status {code}"
            described.append(f"worker pid {process.pid} ({how})")
        return ", ".join(described)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`batch` starts new ones)."""
        self._batches = None
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
