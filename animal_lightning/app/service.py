"""The model behind the page: loaded once, asked through predict.py's own functions.

Every answer comes from prediction.predict_inputs (the checkpoint's preprocessing, predict_outputs in
batches, decide's open-set flag and zero-shot naming, prediction_rows) and every heatmap from
explain.explain_images, so a photo gets the same class and probability here as from predict.py.
Nothing here knows about Gradio: the page (page.py) shows what these methods return, and tests call
them directly too. One lock serialises the model: concurrent requests wait their turn.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from animal_lightning import reports
from animal_lightning.app.uploads import Unpacked, UploadLimits, check_size, upload_inputs
from animal_lightning.data.images import image_problem, to_rgb
from animal_lightning.errors import DataError
from animal_lightning.explain import CamRequest, explain_images
from animal_lightning.models import AnimalClassifier
from animal_lightning.prediction import (
    Inputs,
    Prediction,
    PredictOptions,
    predict_inputs,
    scored_images,
    write_predictions,
    write_scores,
)

log = logging.getLogger(__name__)

FOLDER_CHUNK = 64  # images between two progress updates of a folder (each chunk still runs in batches)
MATCHED_ATTRIBUTES = 8  # attributes listed with an unseen-class guess
THUMBNAILS = 60  # photos of a folder shown as thumbnails (the table lists them all)
THUMBNAIL_SIZE = 160


@dataclass
class PhotoAnswer:
    """One photo's answer, as the page shows it (row: predictions.csv's row for the photo)."""

    row: dict
    top: list[tuple[str, float]]  # the top classes (seen classes, the classifier's probabilities)
    answer: str  # a seen class, or an unseen one named by zero-shot
    confidence: float
    known_score: float
    score: str  # msp | maxlogit | energy
    threshold: float | None  # None: the checkpoint has no open-set calibration
    unknown: bool | None
    keep: float
    unseen_guess: str | None = None  # with unseen classes: the best of them, whether or not it is the answer
    source: str | None = None  # what named the answer: classifier, attributes, imagenet
    matched: list[tuple[str, float]] = field(default_factory=list)  # the guess's attributes the photo shows
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"answer": self.answer, "confidence": self.confidence, "known_score": self.known_score,
                "open_set_score": self.score, "threshold": self.threshold, "unknown": self.unknown,
                "keep": self.keep, "top": [{"class": c, "probability": p} for c, p in self.top],
                "unseen_guess": self.unseen_guess, "source": self.source,
                "matched_attributes": [{"attribute": a, "probability": p} for a, p in self.matched],
                "seconds": round(self.seconds, 3), "row": self.row}


@dataclass
class FolderAnswer:
    rows: list[dict]
    files: list[Path]  # predictions.csv, submission.csv (and metrics.json, per_class.csv when labelled)
    skipped: list[tuple[str, str]]
    scores: dict | None  # predict.py's scores for a labelled folder
    confusion: Path | None
    description: str
    seconds: float
    thumbnails: list[tuple[str, str]] = field(default_factory=list)  # (small JPEG, caption) of the first photos


class DemoModel:
    """A checkpoint loaded once, answering photos and folders with predict.py's decisions."""

    def __init__(self, checkpoint: Path, options: PredictOptions, workdir: Path, limits: UploadLimits):
        self.checkpoint = Path(checkpoint)
        self.model, self.meta = AnimalClassifier.from_checkpoint(checkpoint)
        self.options = options
        self.workdir = Path(workdir)
        self.limits = limits
        self._lock = threading.Lock()
        self._requests = itertools.count(1)

    # -- one photo ------------------------------------------------------------------------------------------
    def photo(self, path: str | Path) -> PhotoAnswer:
        """The answer for one uploaded photo; a file that is no usable photo is a DataError naming it."""
        start = time.perf_counter()
        path = Path(path)
        name = path.name  # the uploaded file's own name (Gradio keeps it, in a folder of its own)
        check_size(path, name, self.limits)
        problem = image_problem(path)  # before the model: the reason in the same words predict.py's rows use
        if problem:
            raise DataError(f"{name} is not a photo the model can read ({problem.replace(str(path), name)}): "
                            "upload a JPEG, PNG, BMP or WebP image")
        inputs = Inputs([path], [name], [None], f"photo {name}")
        result = self._predict(inputs)
        if result.errors[0]:
            raise DataError(f"{name} could not be read ({result.errors[0].replace(str(path), name)})")
        answer = self._photo_answer(result)
        answer.seconds = time.perf_counter() - start
        return answer

    def _photo_answer(self, result: Prediction) -> PhotoAnswer:
        model, decisions = self.model, result.decisions
        probabilities = result.probabilities[0]
        values, indices = probabilities.topk(min(5, len(model.class_names)))
        top = [(model.class_names[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]
        unknown = None if decisions.unknown is None else bool(decisions.unknown[0])
        answer = PhotoAnswer(result.rows[0], top, decisions.names[int(decisions.predicted[0])],
                             float(decisions.confidence[0]), float(decisions.known_score[0]), decisions.score,
                             decisions.threshold, unknown, decisions.keep)
        if decisions.unseen_choice is not None:
            guess = int(decisions.unseen_choice[0])
            answer.unseen_guess = decisions.names[guess]
            answer.source = decisions.answer_source(0)
            answer.matched = self._matched_attributes(result.outputs.get("attributes"), guess)
        return answer

    def _matched_attributes(self, attributes: torch.Tensor | None, guess: int) -> list[tuple[str, float]]:
        """The attributes the guessed class has (above half its strongest) that the photo shows, most probable
        first: why the attribute head thinks of that class."""
        table = self.model.hparams.attributes
        classes = (table["seen"] + table["unseen"]) if table else []
        guessed = self.model.all_class_names[guess]
        if attributes is None or guessed not in classes:  # no attribute head, or a class named by ImageNet only
            return []
        values = torch.tensor(table["matrix"][classes.index(guessed)], dtype=torch.float32)
        wanted = values >= 0.5 * values.max().clamp(min=1e-12)
        shown = attributes[0].float()
        order = sorted((i for i in range(len(values)) if wanted[i] and shown[i] >= 0.5), key=lambda i: -float(shown[i]))
        return [(table["predicates"][i], round(float(shown[i]), 4)) for i in order[:MATCHED_ATTRIBUTES]]

    def explain(self, path: str | Path, class_name: str) -> Path:
        """The Grad-CAM overlay of one photo for `class_name` (one of the seen classes), as predict.py draws it."""
        path = Path(path)
        if class_name not in self.model.class_names:
            raise DataError(f"Grad-CAM explains the classifier's classes; {class_name!r} is not one of them")
        folder = self._request_folder("gradcam")
        with self._lock:
            rows = explain_images(self.model, [path], [path.name],
                                  [CamRequest(0, self.model.class_names.index(class_name), "class")], folder,
                                  batch_size=1, num_workers=0, device=self._device())
        if not rows:
            raise DataError(f"{path.name} could not be read for Grad-CAM")
        return folder / rows[0]["file"]

    # -- a folder or a zip -------------------------------------------------------------------------------------
    def folder(self, files: list[str | Path], on_chunk=None) -> FolderAnswer:
        """Every photo of the upload (photos, or one zip), into predictions.csv and submission.csv (and scored,
        when a zip's class folders label it) in a folder of this request."""
        start = time.perf_counter()
        folder = self._request_folder("folder")
        unpacked: Unpacked = upload_inputs(files, self.model.all_class_names, folder, self.limits)
        inputs = unpacked.inputs
        try:
            result = self._predict(inputs, chunk=FOLDER_CHUNK, on_chunk=on_chunk)
            for n, path in enumerate(inputs.paths):  # errors name the upload's file, not the temporary copy
                result.rows[n]["error"] = result.errors[n].replace(str(path), inputs.image_ids[n])
            output = folder / "predictions.csv"
            files_written = write_predictions(result.rows, output)
            scores = confusion = None
            if inputs.labelled:
                scores = write_scores(inputs, result, self.model.class_names, output)
                files_written += [folder / "metrics.json", folder / "per_class.csv"]
                confusion = self._confusion_plot(inputs, result, folder / "confusion_matrix.png")
            shown = thumbnails(inputs, result.rows, folder / "thumbnails")
        finally:
            shutil.rmtree(folder / "unpacked", ignore_errors=True)  # a zip's photos: only their thumbnails stay
        return FolderAnswer(result.rows, files_written, unpacked.skipped, scores, confusion, inputs.description,
                            time.perf_counter() - start, shown)

    def _confusion_plot(self, inputs: Inputs, result: Prediction, target: Path) -> Path | None:
        """score()'s confusion matrix as predict.py's figure; None when no image could be scored."""
        keep, targets = scored_images(inputs, self.model.class_names, result.errors)
        if not keep:
            return None
        confusion = reports.confusion_matrix(targets, result.probabilities[keep].argmax(1), len(self.model.class_names))
        return reports.save_figure(reports.confusion_figure(confusion, self.model.class_names), target)

    # -- the model page -------------------------------------------------------------------------------------
    def card(self) -> dict:
        """What the model page shows: backbone, classes, input and preprocessing, the run's metrics, the path."""
        model, spec = self.model, self.model.preprocess
        metrics = _run_metrics(self.checkpoint)
        return {"checkpoint": str(self.checkpoint), "backbone": model.hparams.backbone,
                "classes": list(model.class_names), "unseen_classes": list(model.unseen_class_names),
                "input_size": spec.input_size, "resize_mode": spec.resize_mode, "mean": list(spec.mean),
                "std": list(spec.std), "open_set_score": model.hparams.open_set_score,
                "open_set_keep": model.hparams.open_set_keep, "calibrated": bool(model.calibration),
                "tta": self.options.tta, "precision": self.options.precision, "metrics": metrics}

    # -- shared ---------------------------------------------------------------------------------------------
    def _predict(self, inputs: Inputs, **kwargs) -> Prediction:
        with self._lock:
            return predict_inputs(self.model, inputs, self.options, **kwargs)

    def _request_folder(self, kind: str) -> Path:
        folder = self.workdir / f"{next(self._requests):05d}-{kind}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def _device(self) -> str:
        accelerator = str(self.options.accelerator)
        return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


def thumbnails(inputs: Inputs, rows: list[dict], folder: Path) -> list[tuple[str, str]]:
    """Small JPEG copies of the first readable photos, captioned with their answer (never the originals: a
    100-megapixel upload must not reach the browser)."""
    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    for n, row in enumerate(rows):
        if len(shown) >= THUMBNAILS:
            break
        if row["error"]:
            continue
        try:
            with Image.open(inputs.paths[n]) as image:
                image.draft("RGB", (2 * THUMBNAIL_SIZE, 2 * THUMBNAIL_SIZE))  # a JPEG decodes at a smaller scale
                picture = to_rgb(image)
        except Exception:  # it decoded for the model a moment ago; a file changed since is simply not shown
            continue
        picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        target = folder / f"{n:05d}.jpg"
        picture.save(target, quality=85)
        flag = " · unknown" if row.get("open_set") == "unknown" else ""
        shown.append((str(target), f"{row['image_id']}: {row['class']} {float(row['confidence']):.0%}{flag}"))
    return shown


def _run_metrics(checkpoint: Path) -> dict:
    """The training run's metrics.json (logs/train/runs/<time>/metrics.json beside checkpoints/), if there."""
    for candidate in (checkpoint.parent.parent / "metrics.json", checkpoint.parent / "metrics.json"):
        try:
            values = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(values, dict):  # scalars, and those of the val/test sections ({"test": {"test/acc": ...}})
            flat = {}
            for key, value in values.items():
                section = value if isinstance(value, dict) else {key: value}
                flat.update({k: v for k, v in section.items() if isinstance(v, (int, float)) and not
                             isinstance(v, bool)})
            return flat
    return {}
