"""Prediction under load: peak memory and rate of `python predict.py` on 2,000 to 20,000 small images.

Generates `--images` small JPEGs once (64 px by default), saves an untrained checkpoint, then runs the
real `python predict.py` on the first 2,000, 5,000, 10,000 and all of them (as .txt lists), one
run after another. For each run it reports the peak resident memory (the kernel's figure for the
finished process: the largest of predict.py and its DataLoader workers) and the images per
second, start-up included, and between consecutive runs the rate beyond start-up (the extra
images over the extra seconds). Flat memory means the peak does not grow with the number of images; a steady rate
means images/s does not fall. With --engines, every size runs with each engine (compiled and int8 are built
once, calibrated on the generated images, before the timed runs; the untrained model's agreement with fp32
is not the point here, so min_agreement=0). Prints JSON, then a one-line summary.

    python bench/predict_memory.py [--images 20000] [--sizes 2000,5000,10000,20000] [--backbone resnet18]
        [--image-size 64] [--batch-size 64] [--engines eager,compiled,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from animal_lightning.hardware import cpu_description
from animal_lightning.models import AnimalClassifier

PROJECT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        colour = rng.integers(0, 255, 3)
        noise = rng.integers(-30, 30, (size, size, 3))
        Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path, quality=85)
        paths.append(path)
    return paths


def save_checkpoint(path: Path, backbone: str, size: int, classes: int) -> None:
    """An untrained model saved the way train.py saves one (what predict.py loads)."""
    model = AnimalClassifier([f"class_{i}" for i in range(classes)], backbone=backbone, pretrained=False,
                             image_size=size)
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(payload)
    torch.save(payload, path)


def run_predict(checkpoint: Path, listing: Path, output: Path, batch_size: int, workdir: Path,
                *overrides: str) -> dict:
    """One predict.py run: its rate, and the peak RSS of the process and its DataLoader workers (the kernel's
    figure for a finished child: the largest of the process and its waited-for children)."""
    command = [sys.executable, str(PROJECT / "predict.py"), f"ckpt_path={checkpoint}", f"input={listing}",
               f"output={output}", f"batch_size={batch_size}", "progress=false", f"paths.root_dir={workdir}",
               *overrides]
    log = workdir / f"{output.parent.name}.log"
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=workdir, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"predict.py failed:\n{log.read_text()[-3000:]}")
    with output.open() as handle:
        rows = sum(1 for _ in handle) - 1
    return {"images": rows, "seconds": round(seconds, 2), "images_per_s": round(rows / seconds, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--sizes", default="2000,5000,10000,20000")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--engines", default="eager", help="comma-separated predict.py engines (eager, compiled, int8)")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    sizes = sorted({min(int(s), args.images) for s in args.sizes.split(",") if s.strip()})

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        start = time.perf_counter()
        paths = make_images(scratch / "images", args.images, args.image_size)
        made = time.perf_counter() - start
        (scratch / "first_build.txt").write_text("\n".join(str(p) for p in paths[:8]) + "\n")
        checkpoint = scratch / "model.ckpt"
        save_checkpoint(checkpoint, args.backbone, args.image_size, 10)
        by_engine = {}
        for engine in engines:
            settings = [f"engine={engine}", f"calibration={scratch / 'images'}", "min_agreement=0"]
            if engine != "eager":  # the one-off build (and a first prediction of 8 images), outside the measured runs
                run_predict(checkpoint, scratch / "first_build.txt", scratch / f"build_{engine}" / "predictions.csv",
                            args.batch_size, scratch, *settings)
            runs = []
            for size in sizes:
                listing = scratch / f"first_{size}.txt"
                listing.write_text("\n".join(str(p) for p in paths[:size]) + "\n")
                run = run_predict(checkpoint, listing, scratch / f"out_{engine}_{size}" / "predictions.csv",
                                  args.batch_size, scratch, *settings)
                runs.append(run)
                print(f"engine={engine}, {size} images: {run['images_per_s']} img/s, peak RSS {run['peak_rss_mb']} MB",
                      flush=True)
            for before, run in zip(runs, runs[1:], strict=False):  # beyond start-up: extra images over extra seconds
                extra = run["seconds"] - before["seconds"]  # tiny runs can differ by less than start-up's own noise
                run["marginal_images_per_s"] = round((run["images"] - before["images"]) / extra, 1) if extra > 0 \
                    else None
            by_engine[engine] = {"runs": runs,
                                 "peak_rss_growth_mb": round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1)}

    summary = {"benchmark": "predict_memory", "backbone": args.backbone, "input_size": args.image_size,
               "batch_size": args.batch_size, "generated_images": args.images, "generation_seconds": round(made, 1),
               "cpu": cpu_description(), "engines": by_engine}
    print(json.dumps(summary, indent=2))
    for engine, result in by_engine.items():
        runs = result["runs"]
        marginal = ", ".join(str(r["marginal_images_per_s"]) for r in runs[1:])
        print(f"predict_memory (engine={engine}): {', '.join(str(r['images']) for r in runs)} images -> peak RSS "
              f"{', '.join(str(r['peak_rss_mb']) for r in runs)} MB; rate beyond start-up between runs {marginal} "
              "img/s")


if __name__ == "__main__":
    main()
