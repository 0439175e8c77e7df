"""Prediction throughput: the report's one-image-at-a-time fp32 loop against predict.py's batched path.

Both run in this one process, on the same checkpoint and the same images, after a warm-up each.
Prints JSON, then a one-line summary. Images default to ../shared/data/caltech101/test when it is
there (real photos); otherwise a generated demo folder at 256 px.

    python bench/predict_throughput.py [--images DIR] [--limit 256] [--backbone resnet50] [--image-size 224]
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

from animal_lightning.data.images import list_images
from animal_lightning.data.synthetic import SyntheticSpec, ensure_synthetic_dataset
from animal_lightning.models import AnimalClassifier
from animal_lightning.prediction import predict_probabilities

SHARED_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101" / "test"


def pick_images(folder: Path | None, limit: int, scratch: Path) -> tuple[list[Path], str]:
    if folder is None and SHARED_TEST.is_dir():
        folder = SHARED_TEST
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


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        paths, source = pick_images(args.images, args.limit, Path(scratch))
        model = AnimalClassifier([f"class_{i}" for i in range(101)], backbone=args.backbone, pretrained=False,
                                 image_size=args.image_size)
        checkpoint = Path(scratch) / "bench.ckpt"
        payload = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
        model.on_save_checkpoint(payload)
        torch.save(payload, checkpoint)
        ours_model, _ = AnimalClassifier.from_checkpoint(checkpoint)  # exactly what predict.py loads
        baseline_net = AnimalClassifier.from_checkpoint(checkpoint)[0].net

        warm = paths[: min(8, len(paths))]
        report_loop(baseline_net, warm, args.image_size)
        predict_probabilities(ours_model, warm, batch_size=args.batch_size, progress=False)

        baseline_s = timed(report_loop, baseline_net, paths, args.image_size)
        ours_s = timed(predict_probabilities, ours_model, paths, batch_size=args.batch_size, progress=False)

    result = {
        "benchmark": "predict_throughput", "images": len(paths), "source": source, "backbone": args.backbone,
        "input_size": args.image_size, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "report_loop": {"seconds": round(baseline_s, 2), "images_per_s": round(len(paths) / baseline_s, 2),
                        "settings": "one image at a time, fp32, contiguous, PIL Resize"},
        "predict_py": {"seconds": round(ours_s, 2), "images_per_s": round(len(paths) / ours_s, 2),
                       "settings": "Trainer.predict, batched, DataLoader workers, precision auto, channels_last"},
        "ratio": round(baseline_s / ours_s, 2),
    }
    print(json.dumps(result, indent=2))
    print(f"predict_throughput: report loop {result['report_loop']['images_per_s']} img/s, predict.py "
          f"{result['predict_py']['images_per_s']} img/s, ratio {result['ratio']}x ({len(paths)} images, "
          f"{args.backbone} at {args.image_size} px)")


if __name__ == "__main__":
    main()
