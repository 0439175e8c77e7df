"""Fast CPU inference for predict.py: the checkpoint's networks as a compiled OpenVINO graph, in bf16 or int8.

`engine=compiled` converts what AnimalClassifier.network_outputs() computes (class logits, attribute
features, ImageNet logits) into one frozen graph, batch norm folded and weights laid out once, run in bf16
where the CPU computes bf16 natively (else fp32). `engine=int8` also quantises it after training (NNCF's
post-training static quantisation), calibrated on images the checkpoint knows: its validation split
(recorded at train time) or `calibration=<folder>`.

Accuracy is never lost silently: each engine is measured once against the fp32 model on the calibration
images (top-1 agreement, largest probability difference); int8 below `min_agreement` is refused, compiled
(bf16, which rounds as the default eager autocast does) gets a warning. The open-set
threshold and zero-shot penalty are recalibrated for the engine from the same images: each quantile of the
validation scores moves by what the engine moves it on them.

The graph is cached beside the checkpoint (`<checkpoint>.engines/<engine>-<key>/`, keyed by the checkpoint's
hash, the engine, the input size, the calibration and the library versions) as OpenVINO IR: XML and raw
weights, read without running pickled code. engine.json, written last, holds each file's hash: a damaged or
half-written cache is rebuilt, never trusted. A file lock makes concurrent processes (DDP) build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from animal_lightning.atomic import write_text_atomic
from animal_lightning.data.datasets import ImageFiles
from animal_lightning.data.images import list_images
from animal_lightning.errors import AnimalLightningError, CheckpointError, DataError, ModelConfigError
from animal_lightning.hardware import cpu_has_fast_bf16
from animal_lightning.models import AnimalClassifier, openset

log = logging.getLogger(__name__)

ENGINES = ("eager", "compiled", "int8")
CACHE_FORMAT = 1
FILES = ("model.xml", "model.bin")


@dataclass
class EngineSettings:
    """predict.py's engine keys (conf/predict.yaml)."""

    name: str = "eager"
    calibration: str | None = None  # a folder of images; None: the checkpoint's validation images
    calibration_images: int = 300
    min_agreement: float = 0.99
    cache_dir: str | None = None  # None: <checkpoint stem>.engines/ beside the checkpoint
    seed: int = 0

    def check(self) -> None:
        if self.name not in ENGINES:
            raise ModelConfigError(f"engine={self.name!r} is not one of: {', '.join(ENGINES)}")
        if int(self.calibration_images) < 1:
            raise ModelConfigError(f"calibration_images={self.calibration_images} must be at least 1 (e.g. 300)")
        if not 0.0 <= float(self.min_agreement) <= 1.0:
            raise ModelConfigError(f"min_agreement={self.min_agreement} must be between 0 and 1 (e.g. 0.99)")


class NetworkGraph(nn.Module):
    """network_outputs() as a tuple in a fixed order: what the engines convert."""

    def __init__(self, model: AnimalClassifier, keys: Sequence[str]):
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model.network_outputs(images)
        return tuple(outputs[key] for key in self.keys)


class Engine:
    """A compiled graph that computes network_outputs() of a batch; plus how it measured against fp32."""

    def __init__(self, name: str, compiled, keys: Sequence[str], report: dict, folder: Path, loaded: bool = False):
        self.name = name
        self.compiled = compiled
        self.keys = list(keys)
        self.report = report
        self.folder = folder
        self.loaded = loaded  # from the cache (else built by this process)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # copied in and out: OpenVINO's request keeps its own buffers, never pointers to a tensor that is freed later
        result = self.compiled(images.float().contiguous().numpy(), share_inputs=False, share_outputs=False)
        return {key: torch.from_numpy(result[index]) for index, key in enumerate(self.keys)}

    @property
    def calibration(self) -> dict | None:
        """The checkpoint's open-set and zero-shot calibration, moved to this engine's scores."""
        return self.report.get("calibration")

    def describe(self) -> str:
        r = self.report
        return (f"engine={self.name} ({r['precision']}, OpenVINO {r['openvino']}): top-1 agreement with fp32 "
                f"{r['agreement']:.2%} on {r['images']} calibration images, largest probability difference "
                f"{r['max_probability_difference']:.3f}; "
                + (f"loaded from {self.folder}" if self.loaded else
                   f"built in {r['build_seconds']:.0f} s, cached in {self.folder}"))


# -- the entry point ----------------------------------------------------------------------------------------
def prepare_engine(model: AnimalClassifier, checkpoint: Path, meta: dict, settings: EngineSettings) -> Engine | None:
    """The engine for `settings.name`, loaded from the cache or built (and cached) now; None for eager, or
    where the backbone cannot be converted (with a warning: prediction falls back to eager)."""
    settings.check()
    if settings.name == "eager":
        return None
    ov, nncf = _libraries(settings.name)
    _core(ov)  # the process's Core first, so its CPU plugin stays loaded whatever NNCF's own Cores do
    folder, key = cache_folder(model, checkpoint, settings, ov, nncf)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(folder.parent / f".{folder.name}.lock", "a+b")  # noqa: SIM115 (closed below)
    except OSError as error:
        raise ModelConfigError(f"cannot keep the engine cache in {folder.parent} ({error.strerror}): pass "
                               "engine_cache=<a writable folder>") from None
    with lock_file, _locked(lock_file):  # DDP's processes: the first builds, the others wait, then load
        engine = _load(folder, key, model, ov)
        if engine is None:
            for stale in folder.parent.glob(f".{folder.name}.*"):  # a build that was killed half-way
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                engine = _build(folder, key, model, meta, settings, ov, nncf)
            except (AnimalLightningError, OSError):  # the user's to fix (calibration images, disk), not the graph
                raise
            except Exception as error:  # a graph OpenVINO or NNCF cannot take: predict as before, say so
                first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
                log.warning("engine=%s cannot convert %s (%s: %s): predicting with engine=eager instead",
                            settings.name, model.hparams.backbone, type(error).__name__, first)
                return None
    agreement, images = engine.report["agreement"], engine.report["images"]
    if agreement < float(settings.min_agreement):
        if settings.name == "int8":
            raise ModelConfigError(
                f"engine=int8 agrees with the fp32 model on only {agreement:.2%} of {images} calibration images, "
                f"below min_agreement={settings.min_agreement}: predict with engine=compiled, or accept it with "
                f"min_agreement={math.floor(agreement * 1000) / 1000} (cache: {folder})")
        # compiled rounds as engine=eager's bf16 autocast does: warn, as a default run would not even measure it
        log.warning("engine=compiled agrees with the fp32 model on %.2f%% of %d calibration images, below "
                    "min_agreement=%s: bf16 rounding moves this model's close answers (engine=eager "
                    "precision=32-true predicts in fp32)", 100 * agreement, images, settings.min_agreement)
    return engine


def _libraries(name: str):
    try:
        import openvino as ov
    except ImportError:
        raise ModelConfigError(f"engine={name} needs OpenVINO: pip install 'animal-lightning[engines]' "
                               "(or predict with engine=eager)") from None
    if name != "int8":
        return ov, None
    try:
        import nncf
    except ImportError:
        raise ModelConfigError("engine=int8 needs NNCF: pip install 'animal-lightning[engines]' "
                               "(or predict with engine=compiled)") from None
    return ov, nncf


# -- the cache ----------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_folder(model: AnimalClassifier, checkpoint: Path, settings: EngineSettings, ov, nncf) -> tuple[Path, dict]:
    """Where this checkpoint's engine lives, and what it is keyed by (recorded in engine.json)."""
    key = {"format": CACHE_FORMAT, "checkpoint_sha256": file_sha256(checkpoint), "engine": settings.name,
           "input_size": model.preprocess.input_size, "torch": torch.__version__, "openvino": ov.__version__}
    if settings.name == "int8":
        key.update({"nncf": nncf.__version__, "calibration": str(settings.calibration or "validation split"),
                    "calibration_images": int(settings.calibration_images), "seed": int(settings.seed)})
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(settings.cache_dir) if settings.cache_dir else checkpoint.with_name(checkpoint.stem + ".engines")
    return base.expanduser() / f"{settings.name}-{digest}", key


@contextlib.contextmanager
def _locked(handle):
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


def _load(folder: Path, key: dict, model: AnimalClassifier, ov) -> Engine | None:
    """The cached engine, or None where there is none or it does not check out (then it is rebuilt)."""
    record = folder / "engine.json"
    if not record.exists():
        return None
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("key") != key:
            raise ValueError("it was built for another checkpoint or setting")
        for name in FILES:
            if file_sha256(folder / name) != saved["files"][name]:
                raise ValueError(f"{name} does not match its recorded hash")
        graph = _core(ov).read_model(str(folder / FILES[0]))  # IR: XML and raw weights, no code runs
        return Engine(key["engine"], _compile(graph, ov), saved["keys"], saved["report"], folder, loaded=True)
    except Exception as error:
        log.warning("engine cache %s is damaged (%s): building it again", folder, error)
        return None


@functools.cache
def _core(ov):
    """One OpenVINO Core for the process. Its CPU plugin, once loaded, points the thread's alternate signal
    stack into its own memory; a Core per engine would unload the plugin with the last engine, and the next
    signal handled on that stack (a child process's SIGCHLD) would crash the process."""
    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})  # weights read into memory: a cache file changed later cannot hurt
    return core


def _compile(graph, ov):
    precision = "bf16" if cpu_has_fast_bf16() else "f32"
    return _core(ov).compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision})


# -- building -----------------------------------------------------------------------------------------------
def calibration_paths(meta: dict, settings: EngineSettings) -> tuple[list[Path], str]:
    """Up to calibration_images images (a seeded sample): from `calibration=<folder>`, else the validation
    images the checkpoint recorded at train time."""
    if settings.calibration:
        folder = Path(settings.calibration).expanduser()
        if not folder.is_dir():
            raise DataError(f"calibration={folder} is not a folder: pass a folder of images like those you predict")
        paths, source = list_images(folder), f"folder {folder}"
    else:
        recorded = meta.get("val_images")
        if not recorded:
            why = "it was trained without a validation split" if recorded == [] else "it was saved by an older version"
            raise CheckpointError(f"the checkpoint records no validation images to calibrate engine={settings.name} "
                                  f"on ({why}): pass calibration=<folder of images>")
        root = Path(meta.get("data_root") or ".")
        paths = [p for p in (root / r for r in recorded) if p.is_file()]
        source = f"validation split of {root}"
        if not paths:
            raise DataError(f"none of the checkpoint's {len(recorded)} validation images are in {root} any more: "
                            "pass calibration=<folder of images>")
    if not paths:
        raise DataError(f"calibration={settings.calibration}: no images (jpg, jpeg, png, bmp, webp) there")
    count = min(int(settings.calibration_images), len(paths))
    return sorted(random.Random(settings.seed).sample(paths, count)), source


def _batches(model: AnimalClassifier, paths: Sequence[Path], batch_size: int = 32) -> list[torch.Tensor]:
    loader = DataLoader(ImageFiles(paths, model.preprocess), batch_size=batch_size, num_workers=0)
    batches = []
    for images, errors in loader:
        readable = torch.tensor([not error for error in errors], dtype=torch.bool)
        if readable.any():
            batches.append(images[readable])
    if not batches:
        raise DataError(f"none of the {len(paths)} calibration images could be read: pass calibration=<folder>")
    return batches


def _build(folder: Path, key: dict, model: AnimalClassifier, meta: dict, settings: EngineSettings, ov,
           nncf) -> Engine:
    started = time.perf_counter()
    paths, source = calibration_paths(meta, settings)
    batches = _batches(model, paths)
    model = model.float().eval()
    with torch.no_grad():
        reference = [model.outputs(images) for images in batches]
        keys = list(model.network_outputs(batches[0][:1]))
        batch = torch.export.Dim("batch", min=1)
        example = torch.cat([batches[0], batches[0]])[:2]  # 2 images: export would fix a batch of 1 as constant
        program = torch.export.export(NetworkGraph(model, keys).eval(), (example,), dynamic_shapes=({0: batch},))
        graph = ov.convert_model(program)
    if settings.name == "int8":
        dataset = nncf.Dataset([images.numpy() for images in batches])
        # depthwise convolutions (EfficientNet, MobileNet) stay in bf16: in int8 they cost the most agreement with
        # fp32 for the least time (docs/benchmarks.md, prediction speed)
        graph = nncf.quantize(graph, dataset, subset_size=len(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                              ignored_scope=nncf.IgnoredScope(types=["GroupConvolution"], validate=False))
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        ov.save_model(graph, str(scratch / FILES[0]), compress_to_fp16=False)
        engine = Engine(settings.name, _compile(_core(ov).read_model(str(scratch / FILES[0])), ov), keys, {}, folder)
        with torch.no_grad():
            measured = [model.outputs(images, engine=engine) for images in batches]
        report = measure(model, reference, measured)
        report.update({"engine": settings.name, "backbone": model.hparams.backbone, "source": source,
                       "precision": ("int8, " if settings.name == "int8" else "")
                       + ("bf16" if cpu_has_fast_bf16() else "fp32"),
                       "openvino": ov.__version__, "build_seconds": round(time.perf_counter() - started, 1)})
        files = {name: file_sha256(scratch / name) for name in FILES}
        write_text_atomic(scratch / "engine.json", json.dumps({"key": key, "keys": keys, "files": files,
                                                               "report": report}, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(scratch, folder)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    engine.report, engine.folder = report, folder
    return engine


def measure(model: AnimalClassifier, reference: list[dict], measured: list[dict]) -> dict:
    """How the engine's answers compare with fp32's on the same images, and the calibration moved to it."""
    ref = {k: torch.cat([r[k] for r in reference]) for k in reference[0]}
    got = {k: torch.cat([m[k] for m in measured]) for k in measured[0]}
    agreement = (ref["probabilities"].argmax(1) == got["probabilities"].argmax(1)).float().mean()
    difference = (ref["probabilities"] - got["probabilities"]).abs().max()
    return {"images": int(len(ref["probabilities"])), "agreement": round(float(agreement), 6),
            "max_probability_difference": round(float(difference), 6),
            "calibration": recalibrate(model, ref, got)}


def recalibrate(model: AnimalClassifier, reference: dict, measured: dict) -> dict | None:
    """The checkpoint's calibration (quantiles of validation scores), each quantile moved by how far the engine
    moves that quantile on the calibration images: the threshold keeps the same share of images known."""
    calibration = model.calibration
    if not calibration:
        return None
    result = json.loads(json.dumps(calibration))  # a plain copy
    for i, name in enumerate(openset.SCORES):
        if name in (calibration.get("score_quantiles") or {}):
            result["score_quantiles"][name] = _shifted(calibration["score_quantiles"][name],
                                                       reference["scores"][:, i], measured["scores"][:, i])
    num_seen = len(model.class_names)
    for mode, table in (calibration.get("stacking_quantiles") or {}).items():
        before = openset.stacking_margin(model.zero_shot_scores(reference, mode)[0], num_seen)
        after = openset.stacking_margin(model.zero_shot_scores(measured, mode)[0], num_seen)
        result["stacking_quantiles"][mode] = _shifted(table, before, after)
    result["engine_shifted"] = True
    return result


def _shifted(table: Sequence[float], before: torch.Tensor, after: torch.Tensor) -> list[float]:
    shift = torch.tensor(openset.quantile_table(after), dtype=torch.float64) - \
        torch.tensor(openset.quantile_table(before), dtype=torch.float64)
    moved = torch.tensor(table, dtype=torch.float64) + shift
    return [float(v) for v in moved.sort().values]  # a quantile table stays sorted
