"""Prediction throughput: the report's one-image-at-a-time fp32 loop against predict.py's batched path and engines.

Everything runs in this one process, on the same checkpoint and the same images, after a warm-up each:
- the report's notebook loop (PIL, Resize, fp32, one image at a time);
- predict.py's path in fp32 (`precision=32-true`): the reference every engine's answers are compared with;
- predict.py's default (`engine=eager`: bf16 autocast where the CPU has bf16);
- `engine=compiled` and `engine=int8` (animal_lightning/engines.py), each built once (timed: the one-off cost),
  loaded from its cache (timed), then run end to end (DataLoader, decode, transform, model, gathering).

For each: images/s without and with the one-off build, the ratio to the report's loop, top-1 agreement with
fp32 and, where images sit in folders named after the checkpoint's classes, accuracy. Then where the time
goes: decode, transform, model (per engine) and writing the CSV, each timed alone, as shares of their sum.
Prints JSON, then a one-line summary. Images default to ../shared/data/caltech101/test when it is there (real
photos); otherwise a generated demo folder at 256 px. Without --checkpoint, an untrained model of --backbone
(speed only: its agreement says nothing, so its engines are not refused).

    python bench/predict_throughput.py [--images DIR] [--limit 256] [--backbone resnet50] [--image-size 224]
        [--checkpoint best.ckpt --calibration DIR] [--engines eager,compiled,int8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from animal_lightning.data.images import list_images, load_rgb
from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.data.transforms import eval_transform
from animal_lightning.engines import EngineSettings, prepare_engine
from animal_lightning.hardware import cpu_description, cpu_has_fast_bf16
from animal_lightning.models import AnimalClassifier
from animal_lightning.prediction import predict_outputs, write_predictions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101"


def pick_images(folder: Path | None, limit: int, scratch: Path) -> tuple[list[Path], str]:
    if folder is None and (SHARED / "test").is_dir():
        folder = SHARED / "test"
    if folder is None:
        spec = SyntheticSpec(num_classes=10, train_per_class=2, test_per_class=max(1, limit // 10), image_size=256)
        folder = ensure_synthetic_dataset(scratch, spec) / "test"
    paths = list_images(folder)
    step = max(1, len(paths) // limit)  # spread over every class, not the first few
    return paths[::step][:limit], str(folder)


def report_loop(net: torch.nn.Module, paths: list[Path], size: int) -> float:
    """The report's notebook: PIL open, Resize((size, size)), ToTensor, Normalize, model(x[None]) in fp32."""
    preprocess = T.Compose([T.Resize((size, size)), T.ToTensor(),
                            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    net = net.float().to(memory_format=torch.contiguous_format).eval()
    predictions = []
    with torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB")
            predictions.append(int(net(preprocess(image).unsqueeze(0)).argmax(1)))
    return len(predictions)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def untrained_checkpoint(path: Path, backbone: str, size: int) -> Path:
    model = AnimalClassifier([f"class_{i}" for i in range(101)], backbone=backbone, pretrained=False, image_size=size)
    payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(payload)
    torch.save(payload, path)
    return path


def stage_seconds(model: AnimalClassifier, paths: list[Path]) -> tuple[float, float, list[torch.Tensor]]:
    """Decoding alone and the evaluation transform alone, one image after another in this thread."""
    decode, decoded = timed(lambda: [load_rgb(str(p)) for p in paths])
    transform = eval_transform(model.preprocess)
    seconds, tensors = timed(lambda: [transform(image) for image in decoded])
    return decode, seconds, tensors


def model_seconds(model: AnimalClassifier, tensors: list[torch.Tensor], batch_size: int, engine=None) -> float:
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
    autocast = engine is None and cpu_has_fast_bf16()  # eager: what predict.py's precision=auto runs
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.outputs(batches[0][:2], engine=engine)
        seconds, _ = timed(lambda: [model.outputs(b, engine=engine) for b in batches])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint (default: untrained)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="images to calibrate and check engines on (default: the checkpoint's validation "
                             "split; for an untrained model, Caltech-101's train folder or the images)")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--engines", default="eager,compiled,int8")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        paths, source = pick_images(args.images, args.limit, scratch)
        checkpoint = args.checkpoint or untrained_checkpoint(scratch / "bench.ckpt", args.backbone, args.image_size)
        model, meta = AnimalClassifier.from_checkpoint(checkpoint)  # exactly what predict.py loads
        size = model.preprocess.input_size
        calibration = args.calibration
        if calibration is None and args.checkpoint is None:
            calibration = SHARED / "train" if (SHARED / "train").is_dir() else Path(source)
        settings = {"calibration": str(calibration) if calibration else None,
                    "calibration_images": args.calibration_images, "cache_dir": str(scratch / "engines"),
                    "min_agreement": 0.99 if args.checkpoint else 0.0}
        names = {name: i for i, name in enumerate(model.class_names)}
        labels = torch.tensor([names.get(p.parent.name, -1) for p in paths])

        baseline_net = AnimalClassifier.from_checkpoint(checkpoint)[0].net
        warm = paths[: min(8, len(paths))]
        report_loop(baseline_net, warm, size)
        report_s, _ = timed(report_loop, baseline_net, paths, size)
        del baseline_net

        def run(precision="auto", engine=None):
            predict_outputs(model, warm, batch_size=args.batch_size, progress=False, precision=precision,
                            engine=engine)
            seconds, (outputs, _) = timed(predict_outputs, model, paths, batch_size=args.batch_size, progress=False,
                                          precision=precision, engine=engine)
            return seconds, outputs["probabilities"]

        fp32_s, reference = run("32-true")
        decode_s, transform_s, tensors = stage_seconds(model, paths)
        rows = [{"image_id": p.name, "class": model.class_names[int(i)]} for p, i in zip(paths, reference.argmax(1),
                                                                                         strict=True)]
        write_s, _ = timed(write_predictions, rows, scratch / "out" / "predictions.csv")

        def row(seconds, probabilities, extra=None, one_off=0.0, model_s=None):
            entry = {"seconds": round(seconds, 2), "images_per_s": round(len(paths) / seconds, 2),
                     "ratio_to_report_loop": round(report_s / seconds, 2)}
            if one_off:
                entry.update({"one_off_seconds": round(one_off, 1),
                              "images_per_s_with_one_off": round(len(paths) / (seconds + one_off), 2),
                              "ratio_with_one_off": round(report_s / (seconds + one_off), 2)})
            agree = probabilities.argmax(1) == reference.argmax(1)
            entry.update({"top1_agreement_with_fp32": round(float(agree.float().mean()), 4),
                          "max_probability_difference": round(float((probabilities - reference).abs().max()), 4)})
            known = labels >= 0
            if known.any() and not known.all():  # photos of animals the model was not trained on answer less surely
                entry["top1_agreement_on_its_classes"] = round(float(agree[known].float().mean()), 4)
            if known.any():
                entry["accuracy"] = round(float((probabilities.argmax(1)[known] == labels[known]).float().mean()), 4)
            if model_s is not None:
                total = decode_s + transform_s + model_s + write_s
                stages = {"decode": decode_s, "transform": transform_s, "model": model_s, "writing": write_s}
                entry["time_shares"] = {stage: round(s / total, 3) for stage, s in stages.items()}
            entry.update(extra or {})
            return entry

        results = {"predict_py_fp32": row(fp32_s, reference, {"settings": "precision=32-true"})}
        for name in engines:
            if name == "eager":
                seconds, probabilities = run()
                results["eager"] = row(seconds, probabilities, {"settings": "engine=eager, precision=auto"},
                                       model_s=model_seconds(model, tensors, args.batch_size))
                continue
            build_s, engine = timed(prepare_engine, model, checkpoint, meta, EngineSettings(name, **settings))
            load_s, engine = timed(prepare_engine, model, checkpoint, meta, EngineSettings(name, **settings))
            seconds, probabilities = run(engine=engine)
            results[name] = row(seconds, probabilities, {"cache_load_seconds": round(load_s, 2),
                                                          "build_report": engine.report | {"calibration": None}},
                                one_off=build_s, model_s=model_seconds(model, tensors, args.batch_size, engine))

    result = {
        "benchmark": "predict_throughput", "cpu": cpu_description(), "images": len(paths), "source": source,
        "checkpoint": str(args.checkpoint) if args.checkpoint else f"untrained {args.backbone}",
        "backbone": model.hparams.backbone, "input_size": size, "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "report_loop": {"seconds": round(report_s, 2), "images_per_s": round(len(paths) / report_s, 2),
                        "settings": "one image at a time, fp32, contiguous, PIL Resize"},
        **results,
        "ratio": results.get("eager", {}).get("ratio_to_report_loop"),
    }
    print(json.dumps(result, indent=2))
    parts = [f"{name} {r['images_per_s']} img/s ({r['ratio_to_report_loop']}x, agreement "
             f"{r['top1_agreement_with_fp32']:.2%})" for name, r in results.items()]
    print(f"predict_throughput: report loop {result['report_loop']['images_per_s']} img/s; " + "; ".join(parts)
          + f" ({len(paths)} images, {model.hparams.backbone} at {size} px, {result['cpu']})")


if __name__ == "__main__":
    main()
