"""The benchmarks run end to end at tiny sizes: their code paths stay working (their figures are not checked)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT, make_folder

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, str(PROJECT / "bench" / script), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    start = output.index("{\n")
    end = output.index("\n}\n", start) + 2
    summary = json.loads(output[start:end])
    assert output.rstrip().splitlines()[-1].startswith(summary["benchmark"])  # the one-line summary comes last
    return summary


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_folder(tmp_path / "photos", {"cat": 12, "dog": 12, "fox": 12})


def test_train_throughput_reports_all_three_paths_and_their_ratios(tmp_path, photos):
    summary = run_bench("train_throughput.py", "--data", str(photos), "--backbone", "resnet18", "--image-size", "32",
                        "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1", cwd=tmp_path)
    assert set(summary["paths"]) == {"report", "plain", "project"}
    assert all(p["images_per_s"] > 0 and len(p["rounds"]) == 1 for p in summary["paths"].values())
    assert summary["project_vs_report"] > 0 and summary["project_vs_plain"] > 0


def test_data_throughput_compares_workers_and_decoders(tmp_path, photos):
    summary = run_bench("data_throughput.py", "--data", str(photos), "--backbone", "resnet18", "--image-size", "32",
                        "--batch-size", "4", "--batches", "2", "--model-steps", "1", "--workers", "auto,0",
                        "--decode-images", "5", cwd=tmp_path)
    assert len(summary["pipelines"]) == 2 and summary["train_over_model"] > 0
    assert summary["decode_only"]["pil"] > 0 and summary["decode_only"]["torchvision_io"] > 0


def test_gpu_train_smoke_runs_every_stage_on_the_cpu(tmp_path, photos):
    summary = run_bench("gpu_train.py", "--device", "cpu", "--smoke", "--data", str(photos), "--workers", "0",
                        cwd=tmp_path)
    assert set(summary["stages"]) == {"synthetic", "loader", "gpu_decode", "project"}
    assert all(stage["images_per_s"] > 0 for stage in summary["stages"].values())
    assert summary["share_of_synthetic"]["synthetic"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_train_without_a_gpu_says_so(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT / "bench" / "gpu_train.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device here" in result.stderr


def test_epoch_time_runs_both_recipes_through_train_py(tmp_path, photos):
    summary = run_bench("epoch_time.py", "--data", str(photos), "--backbone", "resnet18",
                        "--override", "model.image_size=32", "--override", "data.batch_size=8", cwd=tmp_path)
    ours, report = summary["recipes"]["ours"], summary["recipes"]["report"]
    assert [e["epoch"] for e in ours["epochs"]] == [0] and report["epochs"][0]["train_images"] == 24  # 3 x 8
    assert ours["epochs"][0]["val_seconds"] > 0 and summary["report_over_ours"] > 0


def test_predict_memory_reports_each_run_of_each_engine(tmp_path):
    summary = run_bench("predict_memory.py", "--images", "40", "--sizes", "20,40", "--image-size", "32",
                        "--batch-size", "8", "--engines", "eager,int8", cwd=tmp_path)
    assert set(summary["engines"]) == {"eager", "int8"} and summary["cpu"]
    for result in summary["engines"].values():
        runs = result["runs"]
        assert [run["images"] for run in runs] == [20, 40]
        assert all(run["peak_rss_mb"] > 0 for run in runs) and "marginal_images_per_s" in runs[1]


def test_finetune_compare_scores_the_probe_and_train_py_rows_on_the_test_folder(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("ANIMAL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    make_folder(photos, {"cat": 4, "dog": 4, "fox": 4}, split="test")
    summary = run_bench("finetune_compare.py", "--data", str(photos), "--image-size", "32", "--epochs", "1",
                        "--batch-size", "8", "--rows", "probe,report,finetune_cpu", "--per-class", "10:3",
                        cwd=tmp_path)
    rows = summary["rows"]
    assert summary["data"] == str(photos) and summary["per_class"] == [10, 3]
    assert set(rows) == {"probe", "report", "finetune_cpu"} and rows["probe"]["test_images"] == 9  # 3 of 4 a class
    assert all(0 <= row["top1"] <= 1 and row["images_per_s"] > 0 for row in rows.values())
    assert rows["finetune_cpu"]["test_source"] == "test class folders" and rows["report"]["epochs"] == 1
    assert "errors_vs_report" in summary and "points_over_probe" in summary


def test_a_pilot_subset_links_the_first_photos_of_each_class(tmp_path, photos, monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "bench"))
    from recipe_compare import photo_counts, pilot_subset

    make_folder(photos, {"cat": 4, "dog": 4}, split="test")
    (photos / "train" / "cat" / "Thumbs.db").write_bytes(b"not a photo")  # found as the project finds images
    make_folder(photos / "train" / "dog", {"nested": 3})  # train/dog/train/nested/*.jpg: searched recursively
    before = sorted(str(p) for p in photos.rglob("*"))
    subset = pilot_subset(photos, photo_counts("5:2"), tmp_path / "scratch")
    assert sorted(str(p) for p in photos.rglob("*")) == before  # the source is only read
    for split, count in (("train", 5), ("test", 2)):
        for name in ("cat", "dog"):
            linked = sorted(p for p in (subset / split / name).rglob("*") if p.is_file())
            images = sorted(p for p in (photos / split / name).rglob("*.jpg"))
            assert [p.resolve() for p in linked] == [p.resolve() for p in images[:count]]
    assert sorted(p.name for p in (subset / "train").iterdir()) == ["cat", "dog", "fox"]
    assert not (subset / "val").exists()  # none in the source


@pytest.mark.parametrize("text", ["16", "0:8", "-1:8", "a:b", "1:2:3"])
def test_bad_pilot_counts_are_one_line(text, monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "bench"))
    from recipe_compare import photo_counts

    with pytest.raises(argparse.ArgumentTypeError, match=r"expected TRAIN:TEST, two positive photo counts, e.g. 16:8"):
        photo_counts(text)


def test_model_zoo_builds_each_models_engines(tmp_path):
    summary = run_bench("model_zoo.py", "--models", "resnet18", "--image-size", "32", "--batch-size", "2",
                        "--steps", "1", "--engines", "compiled,int8", cwd=tmp_path)
    (row,) = summary["models"]
    assert row["model"] == "resnet18" and row["compiled_images_per_s"] > 0 and row["int8_images_per_s"] > 0


def test_audit_bench_plants_defects_and_scores_them(tmp_path, photos):
    (photos / "test" / "cat").mkdir(parents=True)  # the held-out audit needs test photos of two classes at least
    for name in ("cat", "dog"):
        shutil.copytree(photos / "train" / name, photos / "test" / name, dirs_exist_ok=True)
    summary = run_bench("audit.py", "--data", str(photos), "--exact", "2", "--near", "2", "--swap", "0.1",
                        "--held-out", "1", "--filters", "low_self_confidence,prune_by_noise_rate",
                        "--audit-args", "features.image_size=32 features.num_workers=0", cwd=tmp_path)
    assert summary["photos"] == 60 and summary["exact"]["planted"] == 2 and summary["near"]["planted"] == 2
    assert summary["exact"]["found"] >= 1  # (the fixture's test/ copies of train/ photos share the pairs)
    assert summary["swapped"]["planted"] == 3
    assert set(summary["filters"]) == {"low_self_confidence", "prune_by_noise_rate"}
    assert summary["second_audit_s"] > 0 and "counts" in summary["untouched"]
    assert summary["unknown"]["test_photos"] == 24 and summary["unknown"]["of_held_out_classes"] in (0, 12)


def test_app_bench_answers_through_the_page_and_predict_py_alike(tmp_path, trained):
    summary = run_bench("app.py", "--ckpt", str(trained["ckpt"]), "--repeats", "1", cwd=tmp_path)
    images = len(list((trained["root"] / "test").glob("*.jpg")))
    assert summary["folder_images"] == images and summary["folder_classes_agree"] == f"{images}/{images}"
    assert summary["page_photo_s_median"] > 0 and summary["predict_py_photo_s_median"] > 0

