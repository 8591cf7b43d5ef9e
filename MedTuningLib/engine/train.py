"""The training run behind ``medtuning train`` (also ``retune`` and ``demo``).

A run works in ``OUT.partial/`` (resume state, curves, the ``STOP`` file) and renames it to ``OUT``
only when complete, so a folder named ``OUT`` is always a finished model. The resume state is
written at the end of every epoch (safetensors + JSON, never pickle). Every epoch reseeds all
random generators from ``(seed, epoch, rank)``, so a run resumed after a kill continues exactly as
the uninterrupted run would have.

Under ``torchrun`` the run is data-parallel (gloo on CPU, NCCL on GPU): every rank draws its own
crops, gradients are averaged by DistributedDataParallel, and rank 0 validates and writes files.

The parts, each in its own module of ``engine/``:

- ``train_options``: :class:`TrainOptions` (the parsed options) and the resume fingerprint;
- ``train_data``: cases read, resampled and normalised; crops through a MONAI Dataset and a DataLoader
  (``--workers``);
- ``warm_start``: what ``--init-from`` keeps of the parent model; ``setup``: the model on its device;
- ``resume``: the resume state; ``loop``: the epoch loop (seeds, schedule from ``objectives``, time
  budget from ``budget``, cancel) calling this run's hooks for steps, metrics, validation and files;
- ``scoring``: validation and held-out test scores; ``publish``: the model folder and its history.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from MedTuningLib.cancel import CancelToken
from MedTuningLib.engine.device import autocast, resolve_device
from MedTuningLib.engine.distributed import Distributed, seed_everything
from MedTuningLib.engine.loop import TrainingLoop
from MedTuningLib.engine.modelfolder import now_iso, read_model_manifest, save_safetensors, weights_to_store
from MedTuningLib.engine.objectives import make_loss
from MedTuningLib.engine.publish import publish_model
from MedTuningLib.engine.recipe import steps_per_epoch as recipe_steps_per_epoch
from MedTuningLib.engine.recipe import use_sync_batchnorm
from MedTuningLib.engine.resume import (BEST_WEIGHTS, STATE_JSON, check_resumable, flatten_optimizer, load_state,
                                        save_state, unflatten_optimizer)
from MedTuningLib.engine.scoring import validate_cases
from MedTuningLib.engine.setup import ModelSetup, prepare_model
from MedTuningLib.engine.train_data import (DEFAULT_WORKERS, CropSampler, TrainingData, is_lateral, make_scheme,
                                            normalise_cases, onto_working_grid, read_case_for, read_cases,
                                            read_raw_case, select_cases, worker_failure)
from MedTuningLib.engine.train_options import TrainOptions, parse_backbone_args
from MedTuningLib.engine.warm_start import warm_start_modalities, warm_start_scheme, warm_start_weights
from MedTuningLib.errors import Cancelled, MedTuningError
from MedTuningLib.events import EventStream
from MedTuningLib.fileio import FileLock, check_output_folder, ensure_writable_dir

# Names other modules, tests and scripts import from here.
__all__ = ["BEST_WEIGHTS", "DEFAULT_WORKERS", "STATE_JSON", "CropSampler", "Distributed", "TrainOptions",
           "TrainingRun", "is_lateral", "make_loss", "make_scheme", "normalise_cases", "parse_backbone_args",
           "read_case_for", "read_raw_case", "seed_everything", "warm_start_modalities", "warm_start_scheme",
           "warm_start_weights"]
_flatten_optimizer, _unflatten_optimizer = flatten_optimizer, unflatten_optimizer


class TrainingRun:
    """One ``medtuning train`` run; :meth:`run` returns the outputs for the ``done`` event."""

    def __init__(self, opts: TrainOptions, events: EventStream, cancel: CancelToken | None = None,
                 command: str = "train") -> None:
        self.opts = opts
        self.events = events
        self.cancel = cancel or CancelToken()
        self.command = command
        self.dist = Distributed.from_env()
        self.out = Path(opts.out).absolute()
        self.work = self.out.with_name(self.out.name + ".partial")
        self.curves = None
        self.parent = None  # the --init-from model's manifest
        self.spacing: tuple[float, float, float] | None = None  # working spacing (z, y, x); None: native
        self.batchnorm = "BatchNorm"

    # -- preparation --------------------------------------------------------------------------------
    def _inputs(self) -> list[tuple[str, Path | None]]:
        """What the run reads: never replaced by its output (issue 15: --force once deleted the library)."""
        weights = Path(self.opts.weights) if self.opts.weights not in (None, "hub", "none", "auto") else None
        return [("case library (--library)", Path(self.opts.library)),
                ("model folder of --init-from", self.opts.init_from), ("base-weights file (--weights)", weights)]

    def _check_output(self) -> None:
        # --force replaces only an earlier model folder (medtuning.json and MedTuning's own files).
        check_output_folder(self.out, "model", self.opts.force, inputs=self._inputs())
        check_resumable(self.work, self.opts.resume)

    def _working_spacing(self, raw_train: list[dict]) -> tuple[float, float, float] | None:
        """The model's working spacing (z, y, x) or None (native): a warm start keeps its model's."""
        from MedTuningLib.data.spacing import describe, parse_spacing_option, working_spacing_for
        from MedTuningLib.engine.warm_start import warm_start_spacing

        if self.parent is not None:
            spacing = warm_start_spacing(self.opts, self.parent)
            origin = "kept from the model it starts from"
        else:
            spacing = working_spacing_for(parse_spacing_option(self.opts.spacing), raw_train)
            origin = {"auto": "from the training cases", "native": "as given"}.get(self.opts.spacing, "as given")
        self.events.log(f"working spacing {describe(spacing)} ({origin})")
        return spacing  # type: ignore[return-value]

    def _prepare_data(self) -> TrainingData:
        """Cases selected, read (through the case cache), on the working grid and normalised."""
        from MedTuningLib.cases import CaseLibrary
        from MedTuningLib.data.cache import CaseCache
        from MedTuningLib.data.preprocess import Preprocessing
        from MedTuningLib.paths import medtuning_home

        opts, events = self.opts, self.events
        library = CaseLibrary(opts.library)
        train_cases, val_cases, protocol = select_cases(opts, library)
        self.parent = read_model_manifest(opts.init_from) if opts.init_from is not None else None
        if self.parent is not None:
            scheme = warm_start_scheme(opts, self.parent)
            modalities = warm_start_modalities(opts, self.parent, train_cases[0].modalities, events.log)
        else:
            scheme = make_scheme(opts, [c.label_path for c in train_cases + val_cases])
            modalities = list(train_cases[0].modalities)
        cache = CaseCache(medtuning_home() / "cache") if self.dist.main else None
        self.library, self.cache = library, cache
        raw_train, raw_val = read_cases(train_cases + val_cases, len(train_cases), scheme, cache, events, self.cancel,
                                        opts.init_from)
        self.spacing = self._working_spacing(raw_train)
        onto_working_grid(raw_train + raw_val, self.spacing)
        if self.parent is not None:
            # A warm start keeps the model's CT window and statistics: refitting them on the new cases would
            # shift every input the tuned weights were fitted to.
            preprocessing = Preprocessing.from_dict(self.parent.preprocessing)
        else:
            # CT window and statistics come from the training cases only, then are fixed in the model folder.
            preprocessing = Preprocessing.infer(modalities, [raw_train[0]["image"]])
            preprocessing.fit([(c["image"], c["label"]) for c in raw_train])
        # Axes of the [D, H, W] arrays; W runs left-right in axial scans. Left/right segments must not be
        # mirrored into each other, so their models never see left-right flips (nor use them at test time).
        flip_axes = (0, 1) if is_lateral(scheme) else (0, 1, 2)
        return TrainingData(train_cases=train_cases, val_cases=val_cases, protocol=protocol, scheme=scheme,
                            modalities=modalities, preprocessing=preprocessing,
                            train=normalise_cases(raw_train, preprocessing),
                            val=normalise_cases(raw_val, preprocessing), flip_axes=flip_axes)

    # -- state ----------------------------------------------------------------------------------------
    def _save_state(self, model, optimizer, state: dict) -> None:
        save_state(self.work, self.stored_tensors(model), optimizer, state)

    def stored_tensors(self, model) -> dict[str, torch.Tensor]:
        return weights_to_store(model, self.base["pretrained"])[1]

    def _load_stored(self, model, tensors: dict[str, torch.Tensor]) -> None:
        if self.base["pretrained"]:
            model.load_tuned_state_dict(tensors)
        else:
            model.load_state_dict(tensors)

    # -- main -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        opts = self.opts
        device = resolve_device(opts.device, self.dist.local_rank)
        self.events.start(self.command, device=str(device), world_size=self.dist.world)
        if self.opts.recipe:  # what --recipe set, and what the command line overrode (engine/recipe.py)
            from MedTuningLib.engine.recipe import describe_recipe

            self.events.log(describe_recipe(self.opts.recipe))
        if self.dist.main:
            self._check_output()
        self.dist.setup(device)
        lock = None
        created = self.dist.main and not self.work.exists()
        try:
            if self.dist.main:
                ensure_writable_dir(self.out.parent, "output")
                ensure_writable_dir(self.work, "model")
                lock = FileLock(self.work / ".lock", "OUTPUT_LOCKED", "model folder").acquire()
            self.cancel.watch_dir = self.work
            return self._run(device)
        except BaseException as exc:
            # A run that failed before its first resumable state leaves nothing behind; nor does a diverged
            # one (resuming it with the same settings diverges again).
            diverged = isinstance(exc, MedTuningError) and exc.code == "TRAINING_DIVERGED"
            if created and lock is not None and (diverged or not (self.work / STATE_JSON).exists()):
                lock.release()
                lock = None
                shutil.rmtree(self.work, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                lock.release()
            self.dist.teardown()

    def _run(self, device: torch.device) -> dict:
        from MedTuningLib.reports.curves import TrainingCurves

        opts, events = self.opts, self.events
        t_start = time.monotonic()
        data = self._prepare_data()
        setup = prepare_model(opts, self.parent, len(data.modalities), data.scheme.num_classes, device, events)
        model, self.base = setup.model, setup.base
        tuned = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(tuned, lr=opts.lr, weight_decay=opts.weight_decay, amsgrad=True)
        if len(data.flip_axes) < 3:
            events.log("left/right segments: no left-right flips in training or test-time augmentation")
        sampler = CropSampler(data.train, setup.crop, data.scheme.num_classes, flip_axes=data.flip_axes,
                              sampling=opts.crop_sampling, intensity=opts.intensity_aug, order=opts.case_order,
                              workers=opts.workers, pin_memory=device.type == "cuda")
        # Crops per optimiser step: batch x accumulate x processes (one GPU with --accumulate 8 = 8 GPUs x 2).
        steps_per_epoch = opts.steps_per_epoch or recipe_steps_per_epoch(len(data.train), opts.batch * opts.accumulate,
                                                                         self.dist.world, opts.epoch_passes)

        start_epoch, total_epochs, elapsed_before = 0, opts.epochs, 0.0
        best = {"score": -1.0, "epoch": 0, "metrics": {}}
        if opts.resume:
            state, weights, optimizer_state = load_state(self.work, opts.fingerprint())
            self._load_stored(model, {k: v.to(device) for k, v in weights.items()})
            optimizer.load_state_dict(optimizer_state)
            start_epoch, total_epochs = state["epoch"], state["total_epochs"]
            elapsed_before, best = state["elapsed_s"], state["best"]
            self.curves = TrainingCurves.load(self.work, last_epoch=start_epoch)
            events.log(f"resuming after epoch {start_epoch} of {total_epochs}")
        else:
            self.curves = TrainingCurves(self.work)

        train_model = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if opts.sync_batchnorm:  # the official choice; torch has it on GPUs only (engine/recipe.py)
                model, self.batchnorm = use_sync_batchnorm(model, device, self.dist.world, events.log)
                setup.model = model
            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        epochs = _Epochs(self, setup, data, train_model, optimizer, sampler, best)
        loop = TrainingLoop(opts, self.dist, events, self.cancel, epochs, steps_per_epoch, start_epoch, total_epochs,
                            elapsed_before, t_start)
        epochs.loop = loop
        if self.dist.main and not opts.resume:
            self._save_state(model, optimizer, epochs.state(0))
        try:
            epoch = loop.run()
        except Cancelled as exc:
            exc.outputs = {"partial": str(self.work)}  # type: ignore[attr-defined]
            raise
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            failed_worker = worker_failure(exc, opts.workers)
            if failed_worker is not None:
                raise failed_worker from exc
            # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError ("... can't allocate memory").
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and not any(
                    text in str(exc) for text in ("out of memory", "can't allocate memory", "not enough memory")):
                raise
            where = "GPU" if device.type == "cuda" else "computer"
            raise MedTuningError("OUT_OF_MEMORY", f"the {where} ran out of memory at crop {setup.crop} and batch "
                                 f"{opts.batch}", "use a smaller --batch or --crop, or --checkpointing on; the run is "
                                 "resumable with --resume after that") from exc
        finally:
            sampler.close()  # the crop workers end with the training, before test scoring and writing

        if not self.dist.main:
            return {}
        return publish_model(self, setup, data, epochs.best, epoch, loop.elapsed())

    def _train_step(self, model, optimizer, sampler, loss_fn, device, dtype) -> float:
        opts = self.opts
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(opts.accumulate):
            images, labels = sampler.batch(opts.batch)
            images, labels = images.to(device), labels.to(device)
            sync = micro == opts.accumulate - 1 or not self.dist.enabled
            context = model.no_sync() if not sync else _nullcontext()
            with context:
                with autocast(device, dtype):
                    logits = model(images)
                loss = loss_fn(logits.float(), labels) / opts.accumulate
                if not torch.isfinite(loss):
                    raise MedTuningError("TRAINING_DIVERGED", "the training loss became NaN or infinite",
                                         "lower --lr (e.g. 5e-4), or use --precision fp32")
                loss.backward()
            total += float(loss.detach())
        optimizer.step()
        # The loss is computed before the update: an update that makes a weight NaN/Inf (e.g. --lr too
        # large) shows only here. Such a run stops; nothing is published.
        tuned = [p for group in optimizer.param_groups for p in group["params"]]
        if tuned and not bool(torch.stack([torch.isfinite(p).all() for p in tuned]).all()):
            raise MedTuningError("TRAINING_DIVERGED", "the tuned weights became NaN or infinite after an optimiser "
                                 f"step (learning rate {optimizer.param_groups[0]['lr']:g})",
                                 "lower --lr (e.g. 5e-4), or use --precision fp32; no model was written")
        return total


    def _metric(self, phase: str, epoch: int, name: str, value: float) -> None:
        self.events.metric(phase, name, value, epoch=epoch)
        if self.curves is not None and self.dist.main:
            self.curves.add(epoch, name, value, phase)


class _Epochs:
    """The run's side of the epoch loop (engine/loop.py ``EpochHooks``): steps, metrics, validation, files."""

    def __init__(self, run: TrainingRun, setup: ModelSetup, data: TrainingData, train_model, optimizer,
                 sampler: CropSampler, best: dict) -> None:
        self.run, self.setup, self.data = run, setup, data
        self.train_model, self.optimizer, self.sampler = train_model, optimizer, sampler
        self.loss_fn = make_loss(run.opts.loss)
        self.best = best
        self.loop: TrainingLoop | None = None

    def state(self, epoch: int) -> dict:
        """The resume state after ``epoch`` (engine/resume.py)."""
        loop = self.loop
        return {"epoch": epoch, "total_epochs": loop.total_epochs, "elapsed_s": loop.elapsed(), "best": self.best,
                "fingerprint": self.run.opts.fingerprint(), "crop": list(self.setup.crop), "saved": now_iso()}

    def start_epoch(self, epoch: int, seed: int, crops_per_rank: int) -> None:
        run = self.run
        self.sampler.reseed(seed)
        self.sampler.start_epoch(run.opts.seed, epoch, run.dist.rank, run.dist.world, crops=crops_per_rank)
        self.train_model.train()

    def train_step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return self.run._train_step(self.train_model, self.optimizer, self.sampler, self.loss_fn, self.setup.device,
                                    self.setup.dtype)

    def metric(self, phase: str, epoch: int, name: str, value: float) -> None:
        self.run._metric(phase, epoch, name, value)

    def validate(self, epoch: int) -> None:
        run, setup = self.run, self.setup
        metrics = validate_cases(setup.model, self.data.val, self.data.scheme, setup.crop, setup.device, setup.dtype,
                                 run.cancel, run.events)
        score = metrics.get("dice/mean", 0.0)
        for name, value in metrics.items():
            run._metric("validate", epoch, name, value)
        if score > self.best["score"]:
            self.best = {"score": score, "epoch": epoch, "metrics": metrics}
            save_safetensors(run.work / BEST_WEIGHTS, run.stored_tensors(setup.model))
        run.events.checkpoint(str(run.work / BEST_WEIGHTS), epoch, best=self.best["epoch"] == epoch, dice=score)

    def end_epoch(self, epoch: int) -> None:
        self.run.curves.write()
        self.run._save_state(self.setup.model, self.optimizer, self.state(epoch))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
