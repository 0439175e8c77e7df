"""Predict a folder, one image or a list of images from a checkpoint alone, into a submission file.

The checkpoint carries the class names, the backbone and its preprocessing, so no training config
or training folder is needed. Images are decoded in DataLoader workers and run in batches through
Lightning's Trainer.predict (bf16 and channels_last where the hardware supports them); a file that
cannot be decoded gets a row with an empty class and an `error` column, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from animal_lightning import reports
from animal_lightning.atomic import write_text_atomic
from animal_lightning.checkpoints import resolve_checkpoint
from animal_lightning.data.datasets import ImageFiles
from animal_lightning.data.folders import read_labels_csv
from animal_lightning.data.images import is_image_name, list_images
from animal_lightning.data.workers import loader_workers, worker_context
from animal_lightning.distributed import gather_objects
from animal_lightning.engines import Engine, EngineSettings, prepare_engine
from animal_lightning.errors import CheckpointError, DataError, ModelConfigError
from animal_lightning.explain import CamRequest, explain_images
from animal_lightning.export import export_model
from animal_lightning.hardware import auto_precision, uses_gpu
from animal_lightning.models import AnimalClassifier, openset
from animal_lightning.models.metrics import eval_metrics
from animal_lightning.quiet import quiet_lightning
from animal_lightning.reports import rows_csv

log = logging.getLogger(__name__)

LIST_SUFFIXES = {".txt", ".lst"}
ENGINE_EXPORTS = ("compiled", "int8")  # export=<engine>: build its cache beside the checkpoint


# -- which images -------------------------------------------------------------------------------------
@dataclass
class Inputs:
    paths: list[Path]
    image_ids: list[str]
    labels: list[str | None]  # the true class where known (class folder or labels CSV)
    description: str
    unknown_labels: dict[str, int] = field(default_factory=dict)  # label names not among the classes

    @property
    def labelled(self) -> bool:
        return any(label is not None for label in self.labels)


def collect_inputs(source: str | os.PathLike, class_names: Sequence[str], *, recursive: bool = False,
                   labels_csv: str | os.PathLike | None = None) -> Inputs:
    """A folder (flat, recursive, or with class subfolders that label it), one image, or a list file."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"input {source} does not exist: pass input=/path/to/folder, an image, or a .txt list")
    if source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        paths = _read_list(source)
        ids, labels, what = [str(p) for p in paths], [None] * len(paths), f"list {source}"
        paths = [p if p.is_absolute() else source.parent / p for p in paths]
    elif source.is_file():
        paths, ids, labels, what = [source], [source.name], [None], f"image {source}"
    else:
        paths, ids, labels, what = _scan_folder(source, set(class_names), recursive)
    if not paths:
        raise DataError(f"no images (jpg, jpeg, png, bmp, webp) in {source}"
                        + ("" if recursive or not source.is_dir() else "; set recursive=true to search sub-folders"))
    if labels_csv:
        table = read_labels_csv(Path(labels_csv).expanduser())
        labels = [table.get(image_id, table.get(Path(image_id).name)) for image_id in ids]
        what += f", labels from {labels_csv}"
    known = set(class_names)
    unknown: dict[str, int] = {}
    for label in labels:
        if label is not None and label not in known:
            unknown[label] = unknown.get(label, 0) + 1
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return Inputs([paths[i] for i in order], [ids[i] for i in order], [labels[i] for i in order], what, unknown)


def _read_list(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _scan_folder(folder: Path, class_names: set[str], recursive: bool):
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if any(p.name in class_names for p in subfolders):
        # Class subfolders: a labelled set. Every subfolder counts, so unknown names get reported.
        paths, ids, labels = [], [], []
        for sub in subfolders:
            for path in list_images(sub):
                paths.append(path)
                ids.append(path.relative_to(folder).as_posix())
                labels.append(sub.name)
        return paths, ids, labels, f"labelled folder {folder}"
    if recursive:
        paths = list_images(folder)
        ids = [p.relative_to(folder).as_posix() for p in paths]
        return paths, ids, [None] * len(paths), f"folder {folder} (recursive)"
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name))
    return paths, [p.name for p in paths], [None] * len(paths), f"folder {folder}"


# -- running the model ----------------------------------------------------------------------------------
class _Collect(BasePredictionWriter):
    """Keeps each batch's outputs, decoding errors (which Trainer.predict would drop) and dataset indices.

    Under DDP each process predicts its own share (Lightning's unrepeated sampler: every image once);
    at the end every process receives all of them, put back in dataset order.
    """

    def __init__(self, total: int):
        super().__init__(write_interval="batch")
        self.total = total
        self.parts: list[tuple[list[int], dict[str, torch.Tensor], list[str]]] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.errors: list[str] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        outputs = {key: value.float().cpu() for key, value in prediction.items()}
        self.parts.append((list(batch_indices), outputs, list(batch[1])))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        parts = [part for rank_parts in gather_objects(self.parts) for part in rank_parts]
        indices = [index for batch_indices, _, _ in parts for index in batch_indices]
        if sorted(indices) != list(range(self.total)):
            raise RuntimeError(f"prediction covered {len(indices)} images ({len(set(indices))} distinct) "
                               f"instead of each of the {self.total} exactly once")
        order = torch.tensor(indices).argsort()
        self.outputs = {key: torch.cat([out[key] for _, out, _ in parts])[order] for key in parts[0][1]}
        errors = [error for _, _, batch_errors in parts for error in batch_errors]
        self.errors = [errors[i] for i in order.tolist()]
        self.parts = []


class _Predictor(L.LightningModule):
    """What Trainer.predict runs: the classifier's outputs() for each batch, with this run's test-time
    augmentation (the classifier itself carries no prediction setting)."""

    def __init__(self, model: AnimalClassifier, tta: str | None, engine: Engine | None = None):
        super().__init__()
        self.model = model
        self.tta = tta
        self.engine = engine

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.model.outputs(batch[0], tta=self.tta, engine=self.engine)


def predict_probabilities(model: AnimalClassifier, paths: Sequence[Path], **kwargs) -> tuple[torch.Tensor, list[str]]:
    """(N x classes probabilities in fp32, N error strings, empty when fine) in the order of `paths`."""
    outputs, errors = predict_outputs(model, paths, **kwargs)
    return outputs["probabilities"], errors


def predict_outputs(model: AnimalClassifier, paths: Sequence[Path], *, batch_size: int = 64,
                    num_workers: int | str = "auto", accelerator: str = "auto", precision: str = "auto",
                    tta: str | None = None, progress: bool = True, devices: int | str = 1,
                    num_nodes: int = 1, engine: Engine | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """model.outputs() for every image, concatenated in the order of `paths`: probabilities
    (N x classes), open-set scores (N x 3) and, with unseen classes, compat and imagenet (AnimalClassifier.outputs);
    and the errors.

    devices > 1 (or num_nodes > 1) predicts with DDP: Lightning starts the other processes by running the
    same command again (or SLURM/torchrun already did); each process gets every result, in order.
    `engine` (engines.prepare_engine) runs the networks on the CPU in its own precision."""
    if tta not in (None, "hflip"):
        raise DataError(f"tta={tta!r} is not one of: null, hflip")
    if not paths:
        return {"probabilities": torch.zeros(0, len(model.class_names)), "scores": torch.zeros(0, 3)}, []
    workers = loader_workers(num_workers, len(paths), batch_size)
    loader = DataLoader(ImageFiles(paths, model.preprocess), batch_size=batch_size,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        multiprocessing_context=worker_context(workers))
    collect = _Collect(len(paths))
    quiet_lightning()
    if engine is not None:  # a CPU graph with its own precision: no autocast around it
        accelerator, precision = "cpu", "32-true"
    distributed = devices not in (1, "1") or int(num_nodes) > 1
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=int(num_nodes),
                        strategy="ddp" if distributed else "auto", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, callbacks=[collect],
                        precision=auto_precision(accelerator) if precision == "auto" else precision)
    processes = trainer.num_devices * trainer.num_nodes
    if distributed and len(paths) < processes:  # a process without images would wait for the others forever
        raise DataError(f"{len(paths)} images cannot be shared by {processes} processes: predict them with "
                        "devices=1")
    trainer.predict(_Predictor(model, tta, engine), dataloaders=loader, return_predictions=False)
    return collect.outputs, collect.errors


@dataclass
class Decisions:
    """The answer for each image: a class among seen (+ unseen) classes, and whether it looks unknown."""

    names: list[str]  # seen classes, then unseen ones (zero-shot candidates)
    predicted: torch.Tensor  # index into names
    confidence: torch.Tensor
    known_score: torch.Tensor  # higher: more like a training class
    unknown: torch.Tensor | None  # known_score below the calibrated threshold; None without a calibration
    score: str
    keep: float
    threshold: float | None
    penalty: float | None  # calibrated stacking's penalty on seen classes (with unseen classes only)
    unseen_choice: torch.Tensor | None = None  # the best unseen class of each image (with unseen classes only)
    sources: str | None = None  # which sources named unseen classes (openset.SOURCE_MODES)
    source: torch.Tensor | None = None  # N x unseen: each unseen class's source (index into openset.SOURCES)

    def answer_source(self, n: int) -> str:
        """What named image n: `classifier` (a seen class) or the zero-shot source of its unseen class."""
        seen = len(self.names) - (self.source.shape[1] if self.source is not None else 0)
        chosen = int(self.predicted[n])
        if self.source is None or chosen < seen:
            return "classifier"
        index = int(self.source[n, chosen - seen])
        return openset.SOURCES[index] if index >= 0 else "none"


def decide(model: AnimalClassifier, outputs: dict[str, torch.Tensor], *, score: str | None = None,
           keep: float | None = None, penalty: float | None = None, sources: str | None = None,
           zero_shot_keep: float | None = None) -> Decisions:
    """Open-set flags from the known-class score, and generalized zero-shot naming of unseen classes.

    score, keep, penalty, sources and zero_shot_keep default to the checkpoint's (model.open_set_*,
    model.zero_shot_* and its validation calibration).
    """
    score = score or model.hparams.open_set_score
    keep = float(keep if keep is not None else model.hparams.open_set_keep)
    if score not in openset.SCORES:
        raise DataError(f"open_set_score={score!r} is not one of: {', '.join(openset.SCORES)}")
    if not 0.0 < keep < 1.0:
        raise DataError(f"open_set_keep={keep} must be between 0 and 1 (e.g. 0.95)")
    zero_shot_keep = float(zero_shot_keep if zero_shot_keep is not None else model.hparams.zero_shot_keep)
    if not 0.0 < zero_shot_keep < 1.0:
        raise DataError(f"zero_shot_keep={zero_shot_keep} must be between 0 and 1 (e.g. 0.98)")
    probabilities = outputs["probabilities"]
    known = outputs["scores"][:, openset.SCORES.index(score)]
    calibration = model.calibration
    threshold = openset.known_threshold(calibration, score, keep) if calibration else None
    confidence, predicted = probabilities.max(dim=1) if len(probabilities) else (torch.zeros(0), torch.zeros(0))
    predicted = predicted.long()
    sources = sources or model.hparams.zero_shot_sources
    modes = model.zero_shot_modes
    unseen_choice = source = None
    if model.unseen_class_names and modes:
        if sources not in modes:
            raise DataError(f"zero_shot_sources={sources!r} is not one this model has: {', '.join(modes)} "
                            "(or null for the checkpoint's)")
        if penalty is None:
            if sources not in ((calibration or {}).get("stacking_quantiles") or {}):
                older = bool((calibration or {}).get("margin_quantiles"))  # stacking on attribute scores
                why = "was calibrated by an older version, on another scale: train it again" if older else \
                    "has no zero-shot calibration (it was saved before any validation): use a later checkpoint"
                raise CheckpointError(f"the checkpoint {why}, or pass seen_penalty=<number> (a log-probability "
                                      "margin, e.g. 2)")
            penalty = openset.seen_penalty(calibration, zero_shot_keep, sources)
        num_seen = len(model.class_names)
        stacked, source = model.zero_shot_scores(outputs, sources)
        predicted = openset.gzsl_predict(predicted, stacked, num_seen, float(penalty))
        unseen_probability = openset.gzsl_probabilities(stacked, num_seen, float(penalty)).gather(
            1, predicted[:, None]).squeeze(1)
        confidence = torch.where(predicted >= num_seen, unseen_probability, confidence)
        unseen_choice = openset.best_unseen(stacked, num_seen)
    else:
        penalty = sources = None
    return Decisions(model.all_class_names, predicted, confidence, known,
                     None if threshold is None else known < threshold, score, keep, threshold, penalty,
                     unseen_choice, sources, source)


# -- writing and scoring --------------------------------------------------------------------------------
def prediction_rows(inputs: Inputs, class_names: Sequence[str], probabilities: torch.Tensor, errors: Sequence[str],
                    topk: int = 0, decisions: Decisions | None = None) -> list[dict]:
    """One row per image: image_id, class, confidence, [known_score, open_set], [class_1, prob_1, ...],
    [label], error. With decisions, class may be an unseen (zero-shot) class; top-k lists seen classes."""
    k = max(0, min(int(topk), len(class_names)))
    top_p, top_i = probabilities.topk(max(k, 1), dim=1)
    rows = []
    for n, image_id in enumerate(inputs.image_ids):
        failed = bool(errors[n])
        row = {"image_id": image_id, "class": "" if failed else class_names[int(top_i[n, 0])],
               "confidence": "" if failed else round(float(top_p[n, 0]), 6)}
        if decisions is not None:
            row["class"] = "" if failed else decisions.names[int(decisions.predicted[n])]
            row["confidence"] = "" if failed else round(float(decisions.confidence[n]), 6)
            row["known_score"] = "" if failed else round(float(decisions.known_score[n]), 6)
            flagged = decisions.unknown is not None and bool(decisions.unknown[n])
            row["open_set"] = "" if failed or decisions.unknown is None else ("unknown" if flagged else "known")
            if decisions.source is not None:  # zero-shot: what named the image
                row["source"] = "" if failed else decisions.answer_source(n)
        for j in range(k):
            row[f"class_{j + 1}"] = "" if failed else class_names[int(top_i[n, j])]
            row[f"prob_{j + 1}"] = "" if failed else round(float(top_p[n, j]), 6)
        if inputs.labelled:
            row["label"] = inputs.labels[n] or ""
        row["error"] = errors[n]
        rows.append(row)
    return rows


def scored_images(inputs: Inputs, class_names: Sequence[str], errors: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """The images that score() counts (a label among class_names, and decoded) and their class indices."""
    index = {name: i for i, name in enumerate(class_names)}
    keep = [n for n, label in enumerate(inputs.labels) if label in index and not errors[n]]
    return keep, torch.tensor([index[inputs.labels[n]] for n in keep], dtype=torch.long)


def score(inputs: Inputs, class_names: Sequence[str], probabilities: torch.Tensor, errors: Sequence[str]) -> dict:
    """Accuracy, top-5, macro accuracy, macro F1 and a per-class table over images with a known label that
    decoded: the test phase's metrics (eval_metrics) and its confusion matrix, on these images."""
    keep, targets = scored_images(inputs, class_names, errors)
    values: dict[str, float | None] = {"acc": None, "acc_top5": None, "acc_macro": None, "f1_macro": None}
    confusion = torch.zeros(len(class_names), len(class_names), dtype=torch.long)
    if keep:
        metrics = eval_metrics(len(class_names), prefix="")
        metrics.update(probabilities[keep], targets)
        values = {name: float(value) for name, value in metrics.compute().items()}
        confusion = reports.confusion_matrix(targets, probabilities[keep].argmax(1), len(class_names))
    per_class = [{"class": row["class"], "support": row["support"], "correct": row["correct"],
                  "accuracy": row["recall"], "precision": row["precision"]}
                 for row in reports.per_class_table(confusion, class_names) if row["support"] or row["predicted"]]
    return {
        "images_scored": len(keep),
        "accuracy": values["acc"],
        "top5_accuracy": values["acc_top5"],
        "macro_accuracy": values["acc_macro"],
        "f1_macro": values["f1_macro"],
        "unknown_labels": dict(sorted(inputs.unknown_labels.items())),
        "unlabelled": sum(1 for label in inputs.labels if label is None),
        "unreadable": sum(1 for e in errors if e),
        "per_class": per_class,
    }


def open_set_scores(inputs: Inputs, decisions: Decisions, errors: Sequence[str], num_seen: int) -> dict:
    """With labels outside the training classes: AUROC of seen vs novel images, the share of each flagged
    unknown, and generalized zero-shot accuracy (seen, unseen, H; per-class averaged) with attributes."""
    position = {name: i for i, name in enumerate(decisions.names)}
    novel_unnamed = len(decisions.names)  # a label no class (seen or unseen) has: novel, never right
    keep = [n for n, label in enumerate(inputs.labels) if label is not None and not errors[n]]
    if not keep:
        return {}
    targets = torch.tensor([position.get(inputs.labels[n], novel_unnamed) for n in keep], dtype=torch.long)
    report = openset.open_set_report(decisions.known_score[keep], targets, num_seen, decisions.threshold)
    result = {"open_set": {"score": decisions.score, "keep": decisions.keep, "threshold": decisions.threshold,
                           **report}}
    if decisions.penalty is not None:
        zero_shot = openset.zero_shot_report(decisions.predicted[keep], targets, num_seen, len(decisions.names),
                                             decisions.unseen_choice[keep])
        per_class = openset.named_by(decisions.predicted[keep], decisions.source[keep], targets, num_seen,
                                     decisions.names[num_seen:])
        result["zero_shot"] = {"sources": decisions.sources, "seen_penalty": decisions.penalty, **zero_shot,
                               "per_class": per_class}
    return result


def write_scores(inputs: Inputs, prediction: Prediction, class_names: Sequence[str], output: Path,
                 summary: dict | None = None) -> dict:
    """score() and open_set_scores() of labelled inputs, written beside `output`: metrics.json (after `summary`)
    and per_class.csv. Returns the scores."""
    scores = score(inputs, class_names, prediction.probabilities, prediction.errors)
    scores.update(open_set_scores(inputs, prediction.decisions, prediction.errors, len(class_names)))
    write_text_atomic(output.with_name("metrics.json"), json.dumps({**(summary or {}), **scores}, indent=1) + "\n")
    write_text_atomic(output.with_name("per_class.csv"), rows_csv(scores["per_class"]))
    return scores


def write_predictions(rows: Sequence[dict], output: Path, fmt: str = "csv") -> list[Path]:
    """The full table (csv or json) plus submission.csv (image_id,class: the challenge's format) beside it."""
    if fmt == "csv":
        write_text_atomic(output, rows_csv(rows))
    elif fmt == "json":
        write_text_atomic(output, json.dumps(list(rows), indent=1) + "\n")
    else:
        raise DataError(f"format={fmt!r} is not one of: csv, json")
    submission = output.with_name("submission.csv")  # for graders, not spreadsheets: ids exactly as the files are
    write_text_atomic(submission, rows_csv(rows, ["image_id", "class"], safe=False))
    return [output, submission]


@dataclass
class PredictOptions:
    """How images are run and answered: conf/predict.yaml's keys of the same names (app.py shares them)."""

    batch_size: int = 32
    num_workers: int | str = "auto"
    accelerator: str = "auto"
    precision: str = "auto"
    tta: str | None = None
    progress: bool = True
    devices: int | str = 1
    num_nodes: int = 1
    topk: int = 0
    open_set_score: str | None = None
    open_set_keep: float | None = None
    seen_penalty: float | None = None
    zero_shot_sources: str | None = None
    zero_shot_keep: float | None = None

    @classmethod
    def from_config(cls, cfg) -> PredictOptions:
        """The options a predict (or app) config sets; the others keep their defaults."""
        names = [name for name in cls.__dataclass_fields__ if cfg.get(name) is not None]
        values = {name: cfg.get(name) for name in names}
        for name in ("batch_size", "num_nodes", "topk"):
            if name in values:
                values[name] = int(values[name])
        for name in ("accelerator", "precision"):
            if name in values:
                values[name] = str(values[name])
        return cls(**values)


@dataclass
class Prediction:
    """What the model answered for a list of inputs: its outputs, each file's error, the decisions and the rows
    of predictions.csv (all in the order of the inputs)."""

    outputs: dict[str, torch.Tensor]
    errors: list[str]
    decisions: Decisions
    rows: list[dict]

    @property
    def probabilities(self) -> torch.Tensor:
        return self.outputs["probabilities"]


def predict_inputs(model: AnimalClassifier, inputs: Inputs, options: PredictOptions, *, engine: Engine | None = None,
                   chunk: int | None = None, on_chunk=None) -> Prediction:
    """Run the model over `inputs` (predict_outputs), then decide (open set, zero-shot) and build the rows:
    predict.py's path, which the page of app.py takes too. chunk: run that many images at a time and call
    on_chunk(done, total) after each (a progress bar); the answers are the same either way."""
    total = len(inputs.paths)
    run = dict(batch_size=options.batch_size, num_workers=options.num_workers, accelerator=options.accelerator,
               precision=options.precision, tta=options.tta, progress=options.progress, devices=options.devices,
               num_nodes=options.num_nodes, engine=engine)
    step = chunk if chunk and chunk < total else max(total, 1)
    parts, errors = [], []
    for start in range(0, max(total, 1), step):
        outputs, part_errors = predict_outputs(model, inputs.paths[start: start + step], **run)
        parts.append(outputs)
        errors.extend(part_errors)
        if on_chunk is not None:
            on_chunk(min(start + step, total), total)
    outputs = parts[0] if len(parts) == 1 else {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    decisions = decide(model, outputs, score=options.open_set_score, keep=options.open_set_keep,
                       penalty=options.seen_penalty, sources=options.zero_shot_sources,
                       zero_shot_keep=options.zero_shot_keep)
    rows = prediction_rows(inputs, model.class_names, outputs["probabilities"], errors, topk=options.topk,
                           decisions=decisions)
    return Prediction(outputs, errors, decisions, rows)


# -- the job behind predict.py --------------------------------------------------------------------------
@rank_zero_only
def say(message: str) -> None:
    """Print on the first process only (under DDP every process runs predict.py)."""
    print(message, flush=True)


def predict(cfg) -> dict:
    """Resolve the checkpoint, then export it, or predict the input and write (and score) the results."""
    checkpoint = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir)
    say(f"Checkpoint: {checkpoint}")
    model, meta = AnimalClassifier.from_checkpoint(checkpoint)
    settings = engine_settings(cfg)
    if cfg.get("export") in ENGINE_EXPORTS:  # build (or check) the engine's cache once, for later runs
        settings.name = str(cfg.export)
        engine = prepare_engine(model, checkpoint, meta, settings)
        if engine is None:
            raise ModelConfigError(f"export={settings.name}: {model.hparams.backbone} cannot be converted (see the "
                                   "warning above); predict with engine=eager")
        say(engine.describe())
        return {"exported": [str(engine.folder)], "engine": engine.report}
    if cfg.get("export"):
        written = export_model(model, checkpoint, str(cfg.export))
        print("Exported: " + ", ".join(str(p) for p in written), flush=True)
        return {"exported": [str(p) for p in written]}

    source, labels_csv = cfg.get("input"), cfg.get("labels")
    if source is None:
        if not meta.get("data_root"):
            raise DataError("the checkpoint does not say where its training data was: pass input=/path/to/images")
        source = Path(meta["data_root"]) / "test"
        labels_csv = labels_csv or meta.get("test_labels")  # the demo's labels for its own test folder
    inputs = collect_inputs(source, model.all_class_names, recursive=bool(cfg.get("recursive", False)),
                            labels_csv=labels_csv)
    engine = None
    if settings.name != "eager" and uses_gpu(str(cfg.accelerator)):
        log.warning("engine=%s is a CPU engine: on the GPU, predicting with engine=eager", settings.name)
    else:
        engine = prepare_engine(model, checkpoint, meta, settings)
    if engine is not None:
        say(engine.describe())
        if engine.calibration:  # the open-set threshold and zero-shot penalty, moved to the engine's scores
            model.calibration = engine.calibration
    say(f"Predicting {len(inputs.paths)} images from {inputs.description}")
    result = predict_inputs(model, inputs, PredictOptions.from_config(cfg), engine=engine)
    if rank_zero_only.rank != 0:  # DDP: every process has all the results; the first one writes them
        return {"images": len(inputs.paths), "rank": rank_zero_only.rank}
    probabilities, errors, decisions, rows = result.probabilities, result.errors, result.decisions, result.rows
    output = Path(cfg.output)
    written = write_predictions(rows, output, str(cfg.get("format", "csv")))
    summary = {"checkpoint": str(checkpoint), "input": inputs.description, "images": len(rows),
               "unreadable": sum(1 for e in errors if e), "output": [str(p) for p in written]}
    if decisions.unknown is not None:
        flagged = sum(1 for row in rows if row.get("open_set") == "unknown")
        print(f"Open set: {flagged} of {len(rows)} images flagged unknown ({decisions.score} below "
              f"{decisions.threshold:.4g}, the threshold that keeps {decisions.keep:.0%} of validation images)",
              flush=True)
    if decisions.penalty is not None:
        named = sum(1 for row in rows if row["class"] in set(model.unseen_class_names))
        print(f"Zero-shot: {named} images named as one of {len(model.unseen_class_names)} unseen classes "
              f"(sources: {decisions.sources}, seen-class penalty {decisions.penalty:.4g})", flush=True)
        readable = torch.tensor([not e for e in errors], dtype=torch.bool)
        if not inputs.labelled:  # with labels, the scores below show the table with each class's right answers
            print(openset.format_named_by(openset.named_by(decisions.predicted[readable], decisions.source[readable],
                                                           None, len(model.class_names),
                                                           model.unseen_class_names)), flush=True)
    if inputs.labelled:
        scores = write_scores(inputs, result, model.class_names, output, summary)
        summary.update({k: v for k, v in scores.items() if k != "per_class"})
        print(format_scores(scores), flush=True)
    if cfg.get("gradcam"):
        summary["gradcam"] = write_gradcam(cfg, model, inputs, probabilities, errors, decisions)
    for row in rows:
        if row["error"]:
            log.warning("could not read %s: %s", row["image_id"], row["error"])
    print(f"{summary['images']} predictions, {summary['unreadable']} unreadable image(s): "
          + ", ".join(summary["output"]), flush=True)
    return summary


def engine_settings(cfg) -> EngineSettings:
    """conf/predict.yaml's engine keys."""
    return EngineSettings(name=str(cfg.get("engine") or "eager"), calibration=cfg.get("calibration"),
                          calibration_images=int(cfg.get("calibration_images") or 300),
                          min_agreement=float(cfg.get("min_agreement", 0.99)), cache_dir=cfg.get("engine_cache"))


def write_gradcam(cfg, model: AnimalClassifier, inputs: Inputs, probabilities: torch.Tensor,
                  errors: Sequence[str], decisions: Decisions) -> str:
    """gradcam=true: an overlay per readable image for its predicted class, and with gradcam_true=true also
    for its true class where labelled and different; index.csv lists them. Grad-CAM explains the classifier
    head, so an image answered with an unseen (zero-shot) class gets its best seen class, kind `top-seen`."""
    index = {name: i for i, name in enumerate(model.class_names)}
    requests = []
    for n, label in enumerate(inputs.labels):
        if errors[n]:
            continue
        predicted = int(probabilities[n].argmax())
        zero_shot = int(decisions.predicted[n]) >= len(model.class_names)
        requests.append(CamRequest(n, predicted, "top-seen" if zero_shot else "predicted"))
        if cfg.get("gradcam_true") and label in index and index[label] != predicted:
            requests.append(CamRequest(n, index[label], "true"))
    folder = Path(cfg.get("gradcam_dir") or Path(cfg.output).parent / "gradcam")
    use_gpu = uses_gpu(str(cfg.accelerator)) and torch.cuda.is_available()
    workers = loader_workers(cfg.num_workers, len({r.image for r in requests}), int(cfg.batch_size))
    rows = explain_images(model, inputs.paths, inputs.image_ids, requests, folder, batch_size=int(cfg.batch_size),
                          num_workers=workers, device="cuda" if use_gpu else "cpu")
    write_text_atomic(folder / "index.csv", rows_csv(rows, ["image_id", "kind", "class", "probability", "file",
                                                            "peak_x", "peak_y", "input_size"]))
    print(f"Grad-CAM: {len(rows)} overlays ({model.cam_layer_name} of {model.hparams.backbone}) in {folder}",
          flush=True)
    return str(folder)


def format_scores(scores: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [f"Scored {scores['images_scored']} labelled images: accuracy {pct(scores['accuracy'])}, "
             f"top-5 {pct(scores['top5_accuracy'])}, macro accuracy {pct(scores['macro_accuracy'])}"]
    if scores["unknown_labels"]:
        names = ", ".join(f"{name} ({count})" for name, count in scores["unknown_labels"].items())
        lines.append(f"Labels not among the model's classes (novel): {names}")
    report = scores.get("open_set")
    if report and report.get("auroc") is not None:
        lines.append(f"Open set ({report['score']}): AUROC seen vs novel {pct(report['auroc'])}, flagged unknown: "
                     f"{pct(report.get('seen_flagged_unknown'))} of seen, {pct(report.get('novel_flagged_unknown'))} "
                     "of novel images")
    zero_shot = scores.get("zero_shot")
    if zero_shot:
        lines.append(f"Zero-shot (per-class): seen {pct(zero_shot['acc_seen'])}, "
                     f"unseen {pct(zero_shot['acc_unseen'])}, H {pct(zero_shot['H'])}; "
                     f"among the unseen classes alone {pct(zero_shot['acc_zsl'])}; sources: {zero_shot['sources']}")
        lines.append(openset.format_named_by(zero_shot["per_class"]))
    width = max((len(row["class"]) for row in scores["per_class"]), default=5)
    lines.append(f"  {'class':<{width}}  support  accuracy  precision")
    for row in scores["per_class"]:
        lines.append(f"  {row['class']:<{width}}  {row['support']:>7}  {pct(row['accuracy']):>8}  "
                     f"{pct(row['precision']):>9}")
    return "\n".join(lines)
