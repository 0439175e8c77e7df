"""Every model config: parameters, input size, and training and inference images/s on this machine.

Each model is built as `python train.py model=<name>` builds it (AnimalClassifier, pretrained off,
channels_last), at its own input size unless --image-size is given, and timed on random images in
one process: training = forward, loss (the LightningModule's training_step), backward and an AdamW
step under the project's default precision (bf16 autocast where the CPU has it); inference = the
forward pass under torch.inference_mode. Warm-up steps are excluded. With --engines, each model is also
saved as a checkpoint and built into predict.py's engines (calibrated on 16 generated images; an untrained
model's agreement means nothing, so none is refused): whether it converts (or falls back to eager) and
the engine's inference images/s. Prints JSON, then a Markdown table for docs/benchmarks.md (the model zoo
speed section).

    python bench/model_zoo.py [--models resnet18,resnet50] [--batch-size 16] [--steps 3] [--image-size 128]
        [--engines compiled,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from animal_lightning.engines import EngineSettings, prepare_engine  # noqa: E402
from animal_lightning.hardware import auto_precision  # noqa: E402
from animal_lightning.models import AnimalClassifier, available  # noqa: E402

NUM_CLASSES = 40  # the report's task


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def engine_rates(model: AnimalClassifier, images: torch.Tensor, engines: list[str], warmup: int, steps: int,
                 scratch: Path) -> dict:
    """Each engine built from the model saved as a checkpoint: its inference images/s, or "fallback"."""
    checkpoint = scratch / "model.ckpt"
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(payload)
    torch.save(payload, checkpoint)
    calibration = scratch / "calibration"
    calibration.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (images.shape[-1],) * 2 + (3,), dtype=np.uint8)).save(
            calibration / f"{i}.jpg")
    rates = {}
    for name in engines:
        settings = EngineSettings(name, calibration=str(calibration), min_agreement=0.0,
                                  cache_dir=str(scratch / "engines"))
        engine = prepare_engine(model, checkpoint, {}, settings)
        if engine is None:
            rates[name] = "fallback"
            continue
        seconds = timed(lambda engine=engine: engine(images), warmup, steps)
        rates[name] = round(len(images) / seconds, 1)
    return rates


def measure(name: str, batch_size: int, steps: int, warmup: int, image_size: int | None, precision: str,
            engines: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    backbone = f"timm/{name.split('timm/')[-1]}" if name.startswith("timm/") else name
    model = AnimalClassifier([f"class_{i}" for i in range(NUM_CLASSES)], backbone=backbone, pretrained=False,
                             image_size=image_size)
    size = model.preprocess.input_size
    parameters = sum(p.numel() for p in model.parameters())
    images = torch.randn(batch_size, 3, size, size)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = precision.startswith("bf16")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.training_step((images, targets), 0)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(images)

    model.log = lambda *args, **kwargs: None  # no Trainer here: training_step's self.log is a no-op
    model.train()
    train_seconds = timed(train_step, warmup, steps)
    model.eval()
    infer_seconds = timed(infer_step, warmup, steps)
    rates = {}
    if engines:
        with tempfile.TemporaryDirectory() as scratch:
            rates = engine_rates(model.float(), images, engines, warmup, steps, Path(scratch))
    return {"model": name, "parameters_m": round(parameters / 1e6, 1), "input_size": size,
            "resize": model.preprocess.resize_size, "interpolation": model.preprocess.interpolation,
            "mean": list(model.preprocess.mean), "train_images_per_s": round(batch_size / train_seconds, 1),
            "inference_images_per_s": round(batch_size / infer_seconds, 1),
            **{f"{engine}_images_per_s": rate for engine, rate in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(available()), help="comma-separated; timm/<name> works too")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None, help="default: each model's own")
    parser.add_argument("--engines", default="", help="comma-separated predict.py engines: compiled, int8")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    precision = auto_precision("cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    for name in args.models.split(","):
        result = measure(name, args.batch_size, args.steps, args.warmup, args.image_size, precision, engines)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(json.dumps({"benchmark": "model_zoo", "precision": precision, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "models": results}, indent=1))
    columns = "".join(f" {engine} images/s |" for engine in engines)
    print(f"\n| model | parameters | input (resize) | train images/s | inference images/s |{columns}")
    print("|---|---|---|---|---|" + "---|" * len(engines))
    for r in results:
        extra = "".join(f" {r[f'{engine}_images_per_s']} |" for engine in engines)
        print(f"| `{r['model']}` | {r['parameters_m']}M | {r['input_size']} ({r['resize']}, {r['interpolation']}) | "
              f"{r['train_images_per_s']} | {r['inference_images_per_s']} |{extra}")
    print(f"model_zoo: {len(results)} models, {precision}, batch {args.batch_size}, on {torch.get_num_threads()} "
          "threads")


if __name__ == "__main__":
    main()
