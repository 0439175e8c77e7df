"""Messy real folders: every kind of bad file in one dataset; training lists and skips, prediction gives rows."""

from __future__ import annotations

import builtins
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animal_lightning.data.folders import index_dataset
from animal_lightning.data.images import load_rgb
from tests.conftest import FAST, PROJECT, read_rows, write_image

# file name -> the reason it must be refused with (the rest of the messy folder must train)
BAD = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "OSError",
    "text.jpg": "cannot identify image file",
    "bomb.png": "DecompressionBomb",
    "locked.jpg": "PermissionError",
}
USABLE = ["alpha.png", "palette.png", "grey16.png", "cmyk.jpg", "exif.jpg", "one_pixel.png", "with space.jpg",
          "ünïcödé.jpg", "-leading-dash.jpg", "sub/nested.jpg"] + [f"{i:03d}.jpg" for i in range(8)]


def png_bomb(path: Path, side: int = 10_000) -> Path:
    """A 100-megapixel PNG in under 100 bytes: a header that asks for the pixels, and almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def messy_dataset(root: Path) -> Path:
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    for i in range(8):
        write_image(cat / f"{i:03d}.jpg", colour=(200, 40, 40), seed=i)
        write_image(dog / f"{i:03d}.jpg", colour=(40, 40, 200), seed=100 + i)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    rgb.convert("RGBA").save(cat / "alpha.png")
    rgb.convert("P").save(cat / "palette.png")
    Image.fromarray((np.arange(768).reshape(24, 32) * 80).astype(np.uint16)).save(cat / "grey16.png")
    rgb.convert("CMYK").save(cat / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(cat / "exif.jpg", exif=exif)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(cat / "one_pixel.png")
    for name in ("with space.jpg", "ünïcödé.jpg", "-leading-dash.jpg", "sub/nested.jpg"):
        write_image(cat / name, colour=(210, 50, 50))
    good = (cat / "000.jpg").read_bytes()
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cat / "text.jpg").write_text("this is not a photo")
    png_bomb(cat / "bomb.png")
    write_image(cat / "locked.jpg").chmod(0)
    (cat / ".hidden.jpg").write_text("hidden files are not data")
    (cat / ".DS_Store").write_bytes(b"\0Bud1")
    (cat / "loop").symlink_to(cat, target_is_directory=True)  # a symlink loop must not hang the scan
    (root / "train" / "README.txt").write_text("a file where a class folder would be")
    return root


@pytest.fixture
def messy(tmp_path, monkeypatch) -> Path:
    root = messy_dataset(tmp_path / "messy")
    locked = str(root / "train" / "cat" / "locked.jpg")
    real_open = builtins.open

    def unreadable_as_root(file, *args, **kwargs):  # chmod 0 stops everyone but root: act it out for root
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(builtins, "open", unreadable_as_root)
    return root


def test_the_scan_lists_every_unusable_file_with_its_reason_and_keeps_the_rest(messy):
    index = index_dataset(messy)
    assert index.class_names == ["cat", "dog"]
    cat = messy / "train" / "cat"
    assert {Path(p).name: r for p, r in index.bad_images.items()}.keys() == BAD.keys()
    for path, reason in index.bad_images.items():
        assert BAD[Path(path).name] in reason and "\n" not in reason
    kept = {str(Path(p).relative_to(cat)) for p, label in index.train + index.val if label == 0}
    assert kept == set(USABLE)  # hidden files, .DS_Store, the loop and README.txt are not images of a class
    for name in USABLE:
        image = load_rgb(cat / name)
        assert image.mode == "RGB" and min(image.size) >= 1
    assert load_rgb(cat / "exif.jpg").size == (24, 32)  # turned upright


def test_training_on_the_messy_folder_runs_and_records_what_it_left_out(messy, compose_cfg):
    from animal_lightning.training import train

    cfg = compose_cfg(f"data.root={messy}", *FAST, "debug=fdr", "data.batch_size=4")
    metrics = train(cfg)
    assert metrics["val/acc"] is not None
    left_out = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["unusable_images"]
    assert {Path(p).name for p in left_out} == BAD.keys()


def test_prediction_gives_every_bad_file_an_error_row(messy, trained, tmp_path):
    from animal_lightning.prediction import predict
    from tests.conftest import compose_config

    output = tmp_path / "out" / "predictions.csv"
    cfg = compose_config("predict", tmp_path, f"ckpt_path={trained['ckpt']}", f"input={messy / 'train' / 'cat'}",
                         f"output={output}", "num_workers=0", "progress=false", "recursive=true")
    predict(cfg)
    rows = {row["image_id"].lstrip("'"): row for row in read_rows(output)}
    assert set(rows) == set(USABLE) | BAD.keys()
    for name in BAD:
        assert rows[name]["class"] == "" and rows[name]["error"], rows[name]
    for name in USABLE:
        assert rows[name]["class"] and not rows[name]["error"], rows[name]


@pytest.mark.parametrize("override, message", [
    ("model=resnet5", "Could not find 'model/resnet5'"),
    # each case starts train.py (about 5 s of imports): the fast lane keeps one, make test-all runs all
    pytest.param("data.root={file}", "is a file, not a folder: set data.root to the dataset folder",
                 marks=pytest.mark.slow),
    pytest.param("paths.log_dir={file}/logs", "cannot write the run folder {file}/logs/train/runs/",
                 marks=pytest.mark.slow),
])
def test_bad_settings_stop_before_training_with_one_clear_message(tmp_path, override, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    fast = [f for f in FAST if not (override.startswith("model=") and f.startswith("model"))]
    result = subprocess.run([sys.executable, str(PROJECT / "train.py"), override.format(file=afile), *fast,
                             f"paths.root_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0
    assert message.format(file=afile) in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Epoch" not in result.stdout  # nothing trained
    if override.startswith("model="):  # Hydra lists the options of the group
        assert "Available options in 'model'" in result.stderr and "resnet50" in result.stderr
