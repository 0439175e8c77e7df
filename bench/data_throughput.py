"""Data throughput: images/s of the DataModule's train and eval pipelines alone, against what the model eats.

The DataModule is built as train.py builds it (same config, same transforms, same loaders). For each
worker count it iterates the train loader and the validation loader without any model, after one
warm-up batch (worker start-up), and reports images/s. Then it times the model's training step on
ready tensors (same network, precision and memory format, batch `--batch-size`): the rate at which
training consumes images. `train_over_model` >= 2 means the loader keeps the model fed with room
to spare. It also times decoding alone, PIL (the project's decoder) against torchvision.io, on the
same files. Prints JSON, then a one-line summary.

    python bench/data_throughput.py [--data DIR] [--backbone resnet50] [--image-size 224]
        [--batch-size 32] [--batches 30] [--workers auto,0,2]

--data is a folder with train/<class>/ images; by default ../shared/data/caltech101 (real photos)
when it is there, else a generated demo set of 256 px images.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import bench_parser, build_project_parts, compose, pick_data, timed_steps  # noqa: E402

from animal_lightning.data.images import load_rgb  # noqa: E402
from animal_lightning.data.workers import default_num_workers  # noqa: E402
from animal_lightning.hardware import auto_precision  # noqa: E402


def loader_rate(loader, batches: int) -> dict:
    """Images/s over `batches` batches after the first (which waits for the workers to start)."""
    images, read, start = 0, 0, None
    for index, (batch, _) in enumerate(loader):
        if index == 0:
            start = time.perf_counter()
            continue
        images, read = images + len(batch), read + 1
        if index == batches:
            break
    if not read:
        raise SystemExit("the loader has a single batch: use more images or a smaller --batch-size")
    seconds = time.perf_counter() - start
    return {"batches": read, "images_per_s": round(images / seconds, 1)}


def model_rate(model, batch_size: int, size: int, steps: int, precision: str) -> dict:
    """Training steps on tensors already in memory: the rate at which the model consumes images."""
    model.scheduler_factory = None
    images = torch.randn(batch_size, 3, size, size)
    targets = torch.randint(0, len(model.class_names), (batch_size,))
    result = timed_steps(model.net.train(), model.configure_optimizers(), itertools.repeat((images, targets)),
                         device=torch.device("cpu"), steps=steps, warmup=1, bf16=precision.startswith("bf16"))
    return {"steps": steps, "images_per_s": result["images_per_s"]}


def decode_rates(paths: list[str]) -> dict:
    """Decode-only images/s in this process: PIL (with the EXIF and mode handling) vs torchvision.io."""
    def pil(path):
        return load_rgb(path)

    def tvio(path):
        with open(path, "rb") as handle:
            data = torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
        return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)

    rates = {}
    for name, decode in (("pil", pil), ("torchvision_io", tvio)):
        decode(paths[0])
        start = time.perf_counter()
        for path in paths:
            decode(path)
        rates[name] = round(len(paths) / (time.perf_counter() - start), 1)
    return rates


def main() -> None:
    parser = bench_parser(__doc__, batch_size=32)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--workers", default="auto,0,2")
    parser.add_argument("--decode-images", type=int, default=200)
    args = parser.parse_args()
    args.steps, args.warmup, args.seed, args.override = 1, 1, 0, []  # what compose() reads; no training here

    precision = auto_precision("cpu")
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        data = pick_data(args.data, scratch)
        cfg = compose(data, scratch, args)
        datamodule, model = build_project_parts(cfg)
        pipelines = {}
        for workers in [w.strip() for w in args.workers.split(",") if w.strip()]:
            count = default_num_workers() if workers == "auto" else int(workers)
            datamodule.num_workers = count
            pipelines[f"workers={workers}" + (f" ({count})" if workers == "auto" else "")] = {
                "train": loader_rate(datamodule.train_dataloader(), args.batches),
                "eval": loader_rate(datamodule.val_dataloader(), args.batches),
            }
        consume = model_rate(model, args.batch_size, args.image_size, args.model_steps, precision)
        step = max(1, len(datamodule.index.train) // args.decode_images)
        decode = decode_rates([path for path, _ in datamodule.index.train[::step][: args.decode_images]])

    default_key = next(iter(pipelines))
    summary = {
        "benchmark": "data_throughput", "data": str(data), "backbone": args.backbone, "input_size": args.image_size,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "precision": precision,
        "pipelines": pipelines, "model_train_step": consume, "decode_only": decode,
        "train_over_model": round(pipelines[default_key]["train"]["images_per_s"] / consume["images_per_s"], 1),
    }
    print(json.dumps(summary, indent=2))
    rates = ", ".join(f"{name}: train {p['train']['images_per_s']} / eval {p['eval']['images_per_s']}"
                      for name, p in pipelines.items())
    print(f"data_throughput: {rates} img/s; model consumes {consume['images_per_s']} img/s; "
          f"{default_key} train pipeline = {summary['train_over_model']}x the model; decode only: "
          f"PIL {decode['pil']}, torchvision.io {decode['torchvision_io']} img/s")


if __name__ == "__main__":
    main()
