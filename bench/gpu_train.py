"""GPU training throughput and where the time goes: resnet50, bf16, channels_last, batch 256.

One prepared run, in stages, each after its own warm-up:

1. synthetic: random tensors already on the GPU. The model's own rate (forward, backward, AdamW):
   the ceiling for everything below.
2. loader: a real JPEG folder through the project's DataModule train loader (PIL decode and
   augmentation in CPU worker processes, pinned memory, non-blocking copies), in a plain loop.
   Reports the share of the time the GPU waited for data.
3. gpu_decode: the same files read as bytes by the workers, decoded on the GPU by nvJPEG
   (torchvision.io.decode_jpeg on CUDA, a batch at a time), then random-resized-crop, flip and
   normalisation on the GPU. Takes the CPU out of the way where it is the bottleneck.
4. project: `animal_lightning.training.train(cfg)` with `trainer=gpu`, as train.py runs it (stage
   2's pipeline plus Lightning, callbacks and logging).

Prints JSON, then a one-line summary per stage. The folder (`--data`, a folder with train/<class>/)
defaults to ../shared/data/caltech101 when present, else a generated set of 256 px JPEGs.

    python bench/gpu_train.py [--data DIR] [--batch-size 256] [--steps 30] [--workers N] [--stages ...]
    python bench/gpu_train.py --device cpu --smoke     # the code path on a CPU, tiny sizes (tests use it)

Reference: NVIDIA's ResNet-50 v1.5 reaches about 2,470 images/s on one A100 with AMP and DALI.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (  # noqa: E402
    bench_parser,
    build_project_parts,
    compose,
    pick_data,
    project_path,
    timed_steps,
)

STAGES = ("synthetic", "loader", "gpu_decode", "project")


def endless(loader):
    while True:
        yield from loader


class JpegBytes(Dataset):
    """The raw file bytes and the label: workers only read files; decoding happens on the GPU."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as handle:
            return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8), label


def keep_lists(batch):
    return [data for data, _ in batch], torch.tensor([label for _, label in batch])


class GpuAugment:
    """Decode a batch of JPEG byte tensors on `device`, then crop/flip/normalise each on the device."""

    def __init__(self, size: int, device: torch.device, mean, std):
        self.device, self.size = device, size
        self.crop = v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                                v2.RandomHorizontalFlip()])
        self.gpu_batches = self.cpu_batches = 0  # how each batch was decoded (reported)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def decode(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            try:
                images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
                self.gpu_batches += 1
                return images
            except RuntimeError as error:  # a PNG or odd JPEG in the batch: that batch is decoded on the CPU
                if self.gpu_batches == 0 and self.cpu_batches == 0:
                    print(f"gpu_decode: nvJPEG failed on the first batch ({error}); decoding on the CPU",
                          flush=True)
        self.cpu_batches += 1
        return [decode_image(blob, mode=ImageReadMode.RGB).to(self.device, non_blocking=True) for blob in blobs]

    def __call__(self, batch):
        blobs, targets = batch
        images = torch.stack([self.crop(image) for image in self.decode(blobs)])
        images = (images.float() / 255.0 - self.mean) / self.std
        return images, targets


def stage_synthetic(model, args, device) -> dict:
    net, optimizer = fresh(model, device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(0, len(model.class_names), (args.batch_size,), device=device)

    def repeat():
        while True:
            yield images, targets

    return timed_steps(net, optimizer, repeat(), device=device, steps=args.steps, warmup=args.warmup, bf16=True)


def stage_loader(datamodule, model, args, device) -> dict:
    net, optimizer = fresh(model, device)
    datamodule.pin_memory = device.type == "cuda"
    return timed_steps(net, optimizer, endless(datamodule.train_dataloader()), device=device, steps=args.steps,
                       warmup=args.warmup, bf16=True)


def stage_gpu_decode(datamodule, model, args, device) -> dict:
    net, optimizer = fresh(model, device)
    loader = DataLoader(JpegBytes(datamodule.index.train), batch_size=args.batch_size, shuffle=True,
                        num_workers=datamodule.num_workers, collate_fn=keep_lists, drop_last=True,
                        persistent_workers=datamodule.num_workers > 0)
    spec = model.preprocess
    augment = GpuAugment(args.image_size, device, spec.mean, spec.std)
    batches = (augment(batch) for batch in endless(loader))
    result = timed_steps(net, optimizer, batches, device=device, steps=args.steps, warmup=args.warmup, bf16=True)
    return {**result, "batches_decoded_on_gpu": augment.gpu_batches, "batches_decoded_on_cpu": augment.cpu_batches}


def stage_project(cfg, args) -> dict:
    return {**project_path(cfg, args), "data_wait_share": None}


def fresh(model, device):
    """The project's network and optimizer on `device` (a copy per stage, so stages do not share state)."""
    import copy

    heads = {name for name, p in model.named_parameters() if id(p) in model._head_ids}
    clone = copy.deepcopy(model).to(device)
    clone._head_ids = {id(p) for name, p in clone.named_parameters() if name in heads}  # the copy's own
    clone.scheduler_factory = None
    return clone.net.train(), clone.configure_optimizers()


def main() -> None:
    parser = bench_parser(__doc__, batch_size=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, max 8)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the code path, not the speed")
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.image_size, args.batch_size, args.steps, args.warmup = "resnet18", 64, 4, 2, 1
    args.seed, args.override = 0, []
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: this benchmark is for a GPU machine (--device cpu --smoke checks it)")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    random.seed(0)
    torch.manual_seed(0)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        data = pick_data(args.data, scratch)
        cfg = compose(data, scratch, args)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.trainer.accelerator = accelerator
            cfg.trainer.devices = 1
            cfg.trainer.precision = "bf16-mixed"
            cfg.callbacks.evaluation_report = None
            cfg.callbacks.augmentation_samples = None
            if args.workers is not None:
                cfg.data.num_workers = args.workers
        datamodule, model = build_project_parts(cfg)
        runners = {"synthetic": lambda: stage_synthetic(model, args, device),
                   "loader": lambda: stage_loader(datamodule, model, args, device),
                   "gpu_decode": lambda: stage_gpu_decode(datamodule, model, args, device),
                   "project": lambda: stage_project(cfg, args)}
        for name in stages:
            results[name] = runners[name]()
            print(f"{name}: {results[name]['images_per_s']} images/s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    summary = {
        "benchmark": "gpu_train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "data": str(data), "images": len(datamodule.index.train), "backbone": args.backbone,
        "input_size": args.image_size, "batch_size": args.batch_size, "precision": "bf16 autocast",
        "memory_format": "channels_last", "loader_workers": datamodule.num_workers, "cpu_cores": os.cpu_count(),
        "torch": torch.__version__, "stages": results,
    }
    if "synthetic" in results:
        ceiling = results["synthetic"]["images_per_s"]
        summary["share_of_synthetic"] = {name: round(r["images_per_s"] / ceiling, 3) for name, r in results.items()}
    print(json.dumps(summary, indent=2))
    for name, result in results.items():
        wait = result.get("data_wait_share")
        print(f"gpu_train {name}: {result['images_per_s']} img/s" +
              (f", waiting for data {wait:.0%} of the time" if wait is not None else ""))


if __name__ == "__main__":
    main()
