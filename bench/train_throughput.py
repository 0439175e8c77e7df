"""Training throughput: train.py's path against the report's plain loop and a plain loop with our settings.

Three ways to train the same network on the same images, in this one process, one after the other:

- report: the report's notebook loop. PIL open, Resize((size, size)), ToTensor, Normalize, batch 32,
  fp32, contiguous memory, AdamW, CrossEntropyLoss: what users gain is `project / report`.
- plain: a hand-written PyTorch loop with the project's settings: the same DataModule loader
  (workers, transforms), the same model object (channels_last), the precision `precision: auto`
  picks (bf16 autocast where the CPU or GPU has it), label-smoothed cross-entropy, the project's
  AdamW. What Lightning and our code cost is `project / plain` (1.0 = nothing).
- project: `animal_lightning.training.train(cfg)` with the config train.py composes, Trainer,
  callbacks and TensorBoard logging included; validation and test are switched off.
- plain_compiled (only when asked for in --paths): the plain loop with the network under
  torch.compile; its first step, which compiles, is reported apart (`first_step_seconds`).

Each path runs `--warmup` steps that are not timed (worker start-up, first-call allocations), then
`--steps` timed steps; the rate is images over the time from the end of the last warm-up step to
the end of the last timed step, so data loading is included. The paths run in turn, `--rounds`
times, and each one's median rate is reported. Prints JSON, then a one-line summary.

    python bench/train_throughput.py [--data DIR] [--backbone resnet50] [--image-size 224]
        [--batch-size 32] [--steps 6] [--warmup 2] [--rounds 2] [--paths report,plain,project]
        [--override KEY=VALUE ...]

--data is a folder with train/<class>/ images; by default ../shared/data/caltech101 (real photos)
when it is there, else a generated demo set of 256 px images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import models
from torchvision import transforms as T

from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.data.workers import default_num_workers
from animal_lightning.hardware import auto_precision

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101"
CONF = Path(__file__).resolve().parents[1] / "conf"


class StepClock(Callback):
    """Records the time at the end of every training batch (the project path's clock). On a GPU it waits
    for the device at the ends of the timed window (`sync_at`), so queued work is counted where it runs."""

    ends: list[float] = []
    sync_at: set[int] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(StepClock.ends) in StepClock.sync_at and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        StepClock.ends.append(time.perf_counter())


def rate(ends: list[float], warmup: int, batch_size: int) -> dict:
    """Images/s over the timed steps: from the end of the last warm-up step to the end of the last step."""
    if len(ends) < warmup + 1:
        raise SystemExit(f"only {len(ends)} training steps ran, fewer than warm-up {warmup} + 1 timed: "
                         "use more images or a smaller --batch-size")
    timed = ends[warmup - 1:]
    seconds = timed[-1] - timed[0]
    steps = len(timed) - 1
    return {"steps": steps, "seconds": round(seconds, 2), "images_per_s": round(steps * batch_size / seconds, 2)}


def compose(data_root: Path, scratch: Path, args) -> object:
    """The config `python train.py` would get for this benchmark."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    overrides = [f"data.root={data_root}", f"model={args.backbone}", "model.pretrained=false",
                 f"model.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                 f"paths.root_dir={scratch}", "data.check_images=false", "trainer.max_epochs=-1",
                 f"+trainer.max_steps={args.warmup + args.steps}", "trainer.limit_val_batches=0",
                 "trainer.num_sanity_val_steps=0", "test=false",
                 f"seed={args.seed}", *getattr(args, "override", [])]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(scratch / "run")
        cfg.callbacks.step_clock = {"_target_": f"{__name__}.StepClock"}
    return cfg


def project_path(cfg, args) -> dict:
    """train(cfg) in a new run folder each time (a folder holding last.ckpt would resume, not train)."""
    from omegaconf import open_dict

    from animal_lightning.training import train

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="run-", dir=Path(cfg.paths.root_dir))
    StepClock.ends, StepClock.sync_at = [], {args.warmup - 1, args.warmup + args.steps - 1}
    train(cfg)
    return rate(StepClock.ends, args.warmup, args.batch_size)


def build_project_parts(cfg):
    """The DataModule and the LightningModule exactly as train() builds them."""
    from hydra.utils import instantiate

    from animal_lightning.training import build_model

    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    datamodule.use_preprocess(model.preprocess)
    datamodule.setup("fit")
    return datamodule, model


def timed_steps(net, optimizer, batches, *, device: torch.device, steps: int, warmup: int, bf16: bool,
                label_smoothing: float = 0.0) -> dict:
    """warmup + steps training steps with the project's settings (channels_last, bf16 autocast when asked) on
    `batches` (an iterator of (images, targets) on any device): images/s over the timed steps, the share of
    their wall time spent waiting for the next batch, and how long the first step took. On a GPU the clock
    waits for the device at both ends of the timed window."""
    waited, ends, images_seen = 0.0, [], 0
    start = time.perf_counter()
    for step in range(warmup + steps):
        before = time.perf_counter()
        images, targets = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        if step >= warmup:
            waited += time.perf_counter() - before
            images_seen += len(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(images), targets, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda" and step in (warmup - 1, warmup + steps - 1):
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())
    seconds = ends[-1] - ends[warmup - 1]
    return {"steps": steps, "seconds": round(seconds, 2), "images_per_s": round(images_seen / seconds, 2),
            "data_wait_share": round(waited / seconds, 3), "first_step_seconds": round(ends[0] - start, 1)}


def plain_path(cfg, args, precision: str, compiled: bool = False) -> dict:
    datamodule, model = build_project_parts(cfg)
    model.scheduler_factory = None  # the schedule needs a Trainer; stepping it costs microseconds a batch
    optimizer = model.configure_optimizers()  # the project's AdamW, its parameter groups and weight decay
    net = model.net.train()
    if compiled:
        net.compile()  # torch.compile of forward and backward; the first (warm-up) step compiles
    result = timed_steps(net, optimizer, iter(datamodule.train_dataloader()), device=torch.device("cpu"),
                         steps=args.steps, warmup=args.warmup, bf16=precision.startswith("bf16"),
                         label_smoothing=float(cfg.model.label_smoothing))
    if not compiled:
        result.pop("first_step_seconds")
    return result


class ReportImages(Dataset):
    """The report's pipeline: PIL, a straight resize to size x size, ToTensor, ImageNet normalisation."""

    def __init__(self, samples, size: int):
        self.samples = samples
        self.transform = T.Compose([T.Resize((size, size)), T.ToTensor(),
                                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(Image.open(path).convert("RGB")), label


def report_path(cfg, args) -> dict:
    datamodule, model = build_project_parts(cfg)  # the same training images and class count
    torch.manual_seed(args.seed)
    net = getattr(models, args.backbone)(num_classes=len(datamodule.class_names)) \
        if hasattr(models, args.backbone) else model.net.to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loader = DataLoader(ReportImages(datamodule.index.train, args.image_size), batch_size=args.batch_size,
                        shuffle=True, num_workers=datamodule.num_workers, drop_last=True,
                        persistent_workers=datamodule.num_workers > 0)
    criterion = torch.nn.CrossEntropyLoss()
    net.train()
    ends: list[float] = []
    for step, (images, targets) in enumerate(loader):
        if step == args.warmup + args.steps:
            break
        loss = criterion(net(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    return rate(ends, args.warmup, args.batch_size)


def pick_data(folder: Path | None, scratch: Path) -> Path:
    if folder is not None:
        return folder
    if (SHARED / "train").is_dir():
        return SHARED
    spec = SyntheticSpec(num_classes=10, train_per_class=60, test_per_class=2, image_size=256)
    return ensure_synthetic_dataset(scratch / "synthetic", spec)


def bench_parser(doc: str, batch_size: int) -> argparse.ArgumentParser:
    """The options every training benchmark shares: the image folder, the network, its input, the batch."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a folder with train/<class>/ images")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    return parser


def main() -> None:
    parser = bench_parser(__doc__, batch_size=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="report,plain,project")
    parser.add_argument("--rounds", type=int, default=2, help="repeat the paths this many times; medians reported")
    parser.add_argument("--override", action="append", default=[],
                        help="a train.py override for the project path (repeatable), e.g. callbacks.progress_bar=null")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    chosen = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(chosen) - {"report", "plain", "project", "plain_compiled"}
    if unknown:
        parser.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from report, plain, project, "
                     "plain_compiled")

    precision = auto_precision("cpu")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        data = pick_data(args.data, scratch)
        cfg = compose(data, scratch, args)
        runners = {"report": lambda: report_path(cfg, args), "plain": lambda: plain_path(cfg, args, precision),
                   "project": lambda: project_path(cfg, args),
                   "plain_compiled": lambda: plain_path(cfg, args, precision, compiled=True)}
        runs: dict[str, list[dict]] = {name: [] for name in chosen}
        for round_index in range(args.rounds):  # paths alternate, so drift and order effects hit each alike
            for name in chosen:
                runs[name].append(runners[name]())
                print(f"round {round_index + 1}, {name}: {runs[name][-1]['images_per_s']} images/s", flush=True)
        for name, measured in runs.items():
            rates = sorted(r["images_per_s"] for r in measured)
            results[name] = {"images_per_s": round(statistics.median(rates), 2), "rounds": rates,
                             "steps_per_round": args.steps}
            if "first_step_seconds" in measured[0]:
                results[name]["first_step_seconds"] = [r["first_step_seconds"] for r in measured]

    summary = {
        "benchmark": "train_throughput", "data": str(data), "backbone": args.backbone,
        "input_size": args.image_size, "batch_size": args.batch_size, "warmup_steps": args.warmup,
        "torch_threads": torch.get_num_threads(), "loader_workers": default_num_workers(),
        "project_precision": precision, "paths": results,
    }
    speed = {name: r["images_per_s"] for name, r in results.items()}
    if "report" in speed and "project" in speed:
        summary["project_vs_report"] = round(speed["project"] / speed["report"], 2)
    if "plain" in speed and "project" in speed:
        summary["project_vs_plain"] = round(speed["project"] / speed["plain"], 3)
    print(json.dumps(summary, indent=2))
    line = ", ".join(f"{name} {value} img/s" for name, value in speed.items())
    ratios = ", ".join(f"{key} {summary[key]}x" for key in ("project_vs_report", "project_vs_plain") if key in summary)
    print(f"train_throughput: {line}; {ratios} ({args.backbone} at {args.image_size} px, batch {args.batch_size}, "
          f"{precision})")


if __name__ == "__main__":
    main()
