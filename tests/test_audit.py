"""audit.py: each planted defect found by its finding, a clean folder clean, the report complete, the cache reused,
exclude.txt back into training, and bad folders reported in one line, never modified."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from animal_lightning.audit.pipeline import run_audit
from animal_lightning.data.folders import index_dataset
from animal_lightning.errors import DataError
from tests.conftest import FAST, PROJECT, compose_config, read_rows
from tests.test_bad_input import BAD, messy, png_bomb  # noqa: F401 (messy: a fixture)

# small and quick: the packaged ImageNet EfficientNet-Lite0 at 64 px (the weights extra is installed with dev)
# fp32 features: the same on every CPU (bf16 autocast rounds differently with and without AMX)
QUICK = ["features.image_size=64", "features.num_workers=0", "features.precision=32", "workers=2"]
HUES = {"cat": (200, 50, 40), "dog": (40, 170, 60), "fox": (50, 70, 210)}


def shapes(path: Path, colour, seed: int, size=(96, 80)) -> Path:
    """A photo-like picture: a class colour on a random background with random shapes, different every seed."""
    rng = np.random.default_rng(seed)
    background = tuple(int(0.5 * c + v) for c, v in zip(colour, rng.integers(60, 127, 3), strict=True))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.integers(0, size[0] - 10), rng.integers(0, size[1] - 10)
        w, h = rng.integers(10, 40, 2)
        tint = tuple(int(np.clip(c + rng.integers(-40, 40), 0, 255)) for c in colour)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=tint)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=92)
    return path


def clean_folder(root: Path, per_class: int = 12, test_per_class: int = 4) -> Path:
    for c, (name, colour) in enumerate(HUES.items()):
        for i in range(per_class):
            shapes(root / "train" / name / f"{i:03d}.jpg", colour, seed=c * 100 + i)
        for i in range(test_per_class):
            shapes(root / "test" / name / f"t{i:03d}.jpg", colour, seed=5000 + c * 100 + i)
    return root


def audit(workdir: Path, root: Path, *overrides: str, cache: Path | None = None) -> tuple[dict, list[dict], Path]:
    cfg = compose_config("audit", workdir, f"data.root={root}", f"cache_dir={cache or workdir / 'cache'}", *QUICK,
                         *overrides)
    summary = run_audit(cfg)
    out = Path(cfg.paths.output_dir)
    return summary, read_rows(out / "findings.csv"), out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below root (links not followed): its kind, size, modification time and bytes' hash."""
    found = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current) / name
            stat = path.lstat()
            content = None
            if path.is_file() and not path.is_symlink() and os.access(path, os.R_OK):
                content = hash(path.read_bytes())
            found[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, content)
    return found


def by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for row in rows:
        kinds.setdefault(row["finding"], []).append(row)
    return kinds


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A labelled folder with one or more of every defect kind, audited once (the tests read the result)."""
    work = tmp_path_factory.mktemp("audit")
    root = clean_folder(work / "data")
    train = root / "train"
    (train / "cat" / "empty.jpg").write_bytes(b"")
    good = (train / "cat" / "000.jpg").read_bytes()
    (train / "cat" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (train / "dog" / "notes.jpg").write_text("not a photo")
    (train / "dog" / "drawing.gif").write_bytes(b"GIF89a")
    shutil.copyfile(train / "cat" / "001.jpg", root / "test" / "cat" / "leak_exact.jpg")
    with Image.open(train / "dog" / "002.jpg") as image:
        near = ImageOps.mirror(image.resize((58, 48))).crop((2, 1, 57, 47))
        near.save(root / "test" / "dog" / "leak_near.jpg", quality=40)
        image.save(train / "dog" / "same_pixels.png")  # the same pixels in another container
    shutil.copyfile(train / "fox" / "003.jpg", train / "cat" / "fox_filed_as_cat.jpg")
    with Image.open(train / "fox" / "004.jpg") as image:
        image.resize((72, 60)).save(train / "fox" / "near_copy.jpg", quality=50)
    shapes(train / "cat" / "tiny.jpg", HUES["cat"], seed=901, size=(24, 20))
    shapes(train / "cat" / "banner.jpg", HUES["cat"], seed=902, size=(300, 60))
    Image.new("RGB", (96, 80), (128, 128, 128)).save(train / "dog" / "blank.png")
    Image.new("RGB", (96, 80), (3, 3, 3)).save(train / "dog" / "black.png")
    Image.new("RGB", (96, 80), (252, 252, 252)).save(train / "dog" / "white.png")
    with Image.open(train / "fox" / "005.jpg") as image:
        image.filter(ImageFilter.GaussianBlur(6)).save(train / "fox" / "blurred.jpg")
        image.convert("L").save(train / "fox" / "grey.jpg")
        image.convert("RGBA").save(train / "fox" / "alpha.png")
    for name in ("x/1.jpg", "x-1.jpg", "y.jpg"):  # three identical files: all exact, two of them go
        (train / "cat" / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(train / "cat" / "006.jpg", train / "cat" / name)
    (train / "cat" / "006.jpg").unlink()
    shutil.copyfile(train / "cat" / "007.jpg", train / "cat" / "odd <b>&amp; name.jpg")  # HTML must escape it
    shapes(train / "owl" / "only.jpg", (220, 200, 40), seed=903)  # a class with one photo
    (train / "yak").mkdir()  # and one with none
    shapes(root / "test" / "emu" / "t0.jpg", (90, 90, 90), seed=904)  # a test class without training photos
    os.mkfifo(train / "dog" / "pipe.jpg")  # reading it would block forever
    before = snapshot(root)
    summary, rows, out = audit(work, root)
    return {"root": root, "summary": summary, "rows": rows, "out": out, "kinds": by_kind(rows), "before": before,
            "work": work}


def files_of(planted: dict, kind: str) -> set[str]:
    return {row["file"] for row in planted["kinds"].get(kind, [])}


def test_unreadable_and_skipped_files_are_found_with_their_reason(planted):
    unreadable = {row["file"]: row for row in planted["kinds"]["unreadable"]}
    assert set(unreadable) == {"train/cat/empty.jpg", "train/cat/cut.jpg", "train/dog/notes.jpg", "train/dog/pipe.jpg"}
    assert "not a regular file" in unreadable["train/dog/pipe.jpg"]["detail"]
    assert "0 bytes" in unreadable["train/cat/empty.jpg"]["detail"]
    assert all(row["action"] == "exclude" for row in unreadable.values())
    assert files_of(planted, "not_an_image") == {"train/dog/drawing.gif"}


def test_copies_across_splits_are_leaks_listed_first_and_the_training_copy_goes(planted):
    leaks = {row["file"]: row for row in planted["kinds"]["leak"]}
    assert leaks["train/cat/001.jpg"]["other"] == "test/cat/leak_exact.jpg"
    assert leaks["train/dog/002.jpg"]["other"] == "test/dog/leak_near.jpg"  # resized, cropped, mirrored, JPEG 40
    assert "exact" in leaks["train/cat/001.jpg"]["detail"] and "near" in leaks["train/dog/002.jpg"]["detail"]
    duplicates = [r["finding"] for r in planted["rows"] if r["finding"] in ("leak", "conflicting_labels",
                                                                            "exact_duplicate", "near_duplicate")]
    assert duplicates[0] == "leak"  # the duplicates section lists leaks first
    exclude = (planted["out"] / "exclude.txt").read_text().splitlines()
    assert {"train/cat/001.jpg", "train/dog/002.jpg"} <= set(exclude)
    assert all(name.startswith("train/") for name in leaks)  # the training copy goes, the evaluation copy stays
    assert "test/cat/leak_exact.jpg" not in exclude


def test_duplicates_within_and_across_classes(planted):
    conflicts = planted["kinds"]["conflicting_labels"]
    assert {(r["file"], r["other"]) for r in conflicts} == {("train/fox/003.jpg", "train/cat/fox_filed_as_cat.jpg")} \
        or {(r["other"], r["file"]) for r in conflicts} == {("train/fox/003.jpg", "train/cat/fox_filed_as_cat.jpg")}
    exclude = set((planted["out"] / "exclude.txt").read_text().splitlines())
    assert {"train/fox/003.jpg", "train/cat/fox_filed_as_cat.jpg"} <= exclude  # both: one label is wrong
    exact = {r["file"]: r for r in planted["kinds"]["exact_duplicate"]}
    # the same pixels in a PNG, and three identical files (one kept): exact copies, all in exclude.txt
    assert exact["train/dog/same_pixels.png"]["other"] == "train/dog/002.jpg"  # 002.jpg itself leaks (above)
    copies = {"train/cat/x-1.jpg", "train/cat/x/1.jpg", "train/cat/y.jpg"}
    assert {name for name in exact if name in copies} == copies - {"train/cat/x-1.jpg"}  # the first by name stays
    assert all(exact[name]["other"] in copies - {name} for name in copies - {"train/cat/x-1.jpg"})
    assert all("exact" in r["detail"] and r["score"] == "0" for r in exact.values())
    assert set(exact) <= exclude and "train/cat/x-1.jpg" not in exclude
    near = {frozenset((r["file"], r["other"])) for r in planted["kinds"]["near_duplicate"]}
    assert frozenset(("train/fox/004.jpg", "train/fox/near_copy.jpg")) in near
    assert all(r["action"] == "review" for r in planted["kinds"]["near_duplicate"])


def test_quality_problems_each_have_their_finding(planted):
    assert "train/cat/tiny.jpg" in files_of(planted, "small")
    assert "train/cat/banner.jpg" in files_of(planted, "odd_aspect")
    assert {"train/dog/blank.png", "train/dog/black.png", "train/dog/white.png"} <= files_of(planted, "blank")
    assert files_of(planted, "dark") == {"train/dog/black.png"}
    assert files_of(planted, "overexposed") == {"train/dog/white.png"}
    assert files_of(planted, "blurry") == {"train/fox/blurred.jpg"}
    assert {"train/fox/grey.jpg", "train/dog/blank.png", "train/dog/black.png", "train/dog/white.png"} == \
        files_of(planted, "grayscale")
    assert files_of(planted, "alpha") == {"train/fox/alpha.png"}


def test_class_balance_flags_empty_and_tiny_classes_and_suggests_balancing(planted):
    assert files_of(planted, "empty_class") == {"train/yak/"}
    assert files_of(planted, "stray_class") == {"test/emu/"}
    assert files_of(planted, "few_images") == {"train/owl/"}
    (imbalance,) = planted["kinds"]["imbalance"]
    assert "data.balance=sampler" in imbalance["detail"] and float(imbalance["score"]) > 3
    assert planted["summary"]["class_counts"]["owl"] == 1 and planted["summary"]["class_counts"]["yak"] == 0


def test_photos_filed_under_the_wrong_class_are_likely_label_issues(trained, tmp_path):
    """With a trained checkpoint's backbone (ckpt_path=): moved photos are found, with their true class."""
    root = tmp_path / "data"
    shutil.copytree(trained["root"], root)
    classes = sorted(p.name for p in (root / "train").iterdir())
    moved = {}
    for n, name in enumerate(classes):
        photo = sorted((root / "train" / name).iterdir())[3]
        target = root / "train" / classes[(n + 1) % len(classes)] / f"moved_{photo.name}"
        photo.rename(target)
        moved[target.relative_to(root).as_posix()] = name
    summary, rows, out = audit(tmp_path, root, f"ckpt_path={trained['ckpt']}")
    assert "checkpoint" in summary["facts"]["features"]
    issues = {row["file"]: row["other"] for row in rows if row["finding"] == "label_issue"}
    found = {name: issues[name] for name in moved if name in issues}
    assert len(found) >= len(moved) - 1, issues
    assert all(issues[name] == moved[name] for name in found)  # the class it suggests is the one it came from
    ranked = [row["file"] for row in rows if row["finding"] == "label_issue"]  # most suspect first
    assert len(set(ranked[:len(moved) + 1]) & set(moved)) >= len(moved) - 1
    assert len(issues) <= 0.15 * summary["facts"]["photos"]  # suspects, not every photo
    assert set(found) <= set((out / "exclude.txt").read_text().splitlines())


def test_a_photo_too_small_to_hold_out_skips_its_class_in_the_label_check(planted):
    assert "owl" in planted["summary"]["facts"]["classes too small to check"]
    assert "cross-validated accuracy" in "".join(planted["summary"]["facts"])


def test_the_audit_changes_no_file_of_the_dataset(planted):
    assert snapshot(planted["root"]) == planted["before"]


def test_the_html_page_is_self_contained_and_every_thumbnail_is_a_finding_photo(planted):
    page = (planted["out"] / "report.html").read_text()

    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.links = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs)
            if tag in ("link", "script") or (tag == "a" and not attrs.get("href", "#").startswith("#")):
                self.links.append(attrs)

    parser = Images()
    parser.feed(page)
    parser.close()
    assert not parser.links  # nothing outside the page
    assert "odd <b>&amp; name" not in page and "odd &lt;b&gt;&amp;amp; name.jpg" in page
    thumbnails = [attrs for attrs in parser.images if "data-file" in attrs]
    assert len(thumbnails) == planted["summary"]["thumbnails"] > 10
    named = {row["file"] for row in planted["rows"]} | {row["other"] for row in planted["rows"]}
    for attrs in parser.images:
        kind, _, data = attrs["src"].partition(";base64,")
        assert kind in ("data:image/jpeg", "data:image/png")
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.load()
        if "data-file" in attrs:
            assert attrs["data-file"] in named
            assert max(image.size) <= 96
    assert len(parser.images) - len(thumbnails) == 2  # the class balance chart and the size histograms
    markdown = (planted["out"] / "report.md").read_text()
    for kind, rows in planted["kinds"].items():
        assert f"| {kind} | {len(rows)} |" in markdown


def test_a_second_audit_of_the_same_folder_decodes_and_embeds_nothing(planted, tmp_path):
    again, rows, _ = audit(tmp_path, planted["root"], cache=planted["work"] / "cache")
    facts = again["facts"]
    assert facts["fingerprints"].startswith("0 computed")
    assert ": 0 computed" in facts["features"]
    assert facts["label check"] == "cached"
    assert rows == planted["rows"]


def test_a_clean_folder_has_no_file_or_duplicate_findings(tmp_path):
    root = clean_folder(tmp_path / "data")
    summary, rows, out = audit(tmp_path, root)
    counts = summary["counts"]
    for kind in ("unreadable", "not_an_image", "leak", "conflicting_labels", "exact_duplicate", "near_duplicate",
                 "empty_class", "imbalance"):
        assert counts[kind] == 0, kind
    assert summary["excluded"] == len((out / "exclude.txt").read_text().splitlines()) - 2  # the two header lines


def test_an_unlabelled_test_folder_gets_an_estimate_of_unknown_photos(tmp_path):
    root = clean_folder(tmp_path / "data", test_per_class=0)
    for i in range(6):  # photos of the known classes
        shapes(root / "test" / f"known_{i}.jpg", list(HUES.values())[i % 3], seed=7000 + i)
    for i in range(6):  # a kind of photo no class looks like
        array = np.random.default_rng(i).integers(0, 255, (80, 96, 3), dtype=np.uint8)
        Image.fromarray(array).resize((96, 80), Image.Resampling.NEAREST).save(root / "test" / f"other_{i}.jpg")
    summary, rows, _ = audit(tmp_path, root)
    unknown = {row["file"] for row in rows if row["finding"] == "unknown_test"}
    assert len({f for f in unknown if "other_" in f}) >= 4
    assert len({f for f in unknown if "known_" in f}) <= 2
    assert "of 12" in summary["facts"]["unlabelled test photos like no training class"]


def test_exclude_txt_round_trips_into_training(planted, tmp_path):
    from animal_lightning.training import train

    exclude = tmp_path / "exclude.txt"
    shutil.copyfile(planted["out"] / "exclude.txt", exclude)
    listed = [line for line in exclude.read_text().splitlines() if line and not line.startswith("#")]
    with exclude.open("a") as handle:
        handle.write("train/cat/no_such_photo.jpg\n")
    root = tmp_path / "data"
    shutil.copytree(planted["root"], root, ignore=shutil.ignore_patterns("pipe.jpg"))
    for fix in ("train/yak", "train/owl", "test/emu"):  # class folders that stop training: the audit said to fix them
        shutil.rmtree(root / fix)
    cfg = compose_config("train", tmp_path, f"data.root={root}", f"data.exclude={exclude}", *FAST, "debug=fdr",
                         "data.batch_size=4")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    kept = [line for line in listed if line != "train/dog/pipe.jpg"]
    assert metrics["excluded_images"] == sorted(kept)
    assert metrics["exclude_unmatched"] == ["train/dog/pipe.jpg", "train/cat/no_such_photo.jpg"]  # not in the copy
    index = index_dataset(root, exclude=exclude)
    used = {Path(p).relative_to(root).as_posix() for p, _ in index.train + index.val + index.test}
    assert not used & set(kept)
    assert not index.bad_images  # the unreadable files were excluded before the scan decoded them


def test_exclude_entries_are_paths_or_globs_relative_to_the_root_or_absolute(tmp_path):
    root = clean_folder(tmp_path / "data")
    listing = tmp_path / "leave_out.txt"
    shutil.copyfile(root / "train" / "fox" / "005.jpg", root / "train" / "fox" / "photo[1].jpg")
    listing.write_text(f"# comment\n\ntrain/cat/000.jpg\n./train/dog/00[12].jpg\n{root}/train/fox/003.jpg\n"
                       f"{root}/test/*/t000.jpg\ntrain/*/nothing*.jpg\ntrain/fox/photo[1].jpg\n")
    index = index_dataset(root, exclude=listing)
    assert index.excluded == sorted(["train/cat/000.jpg", "train/dog/001.jpg", "train/dog/002.jpg",
                                     "train/fox/003.jpg", "test/cat/t000.jpg", "test/dog/t000.jpg",
                                     "test/fox/t000.jpg", "train/fox/photo[1].jpg"])  # that file, not photo1.jpg
    assert index.exclude_unmatched == ["train/*/nothing*.jpg"]
    used = {Path(p).relative_to(root).as_posix() for p, _ in index.train + index.val + index.test}
    assert not used & set(index.excluded) and len(used) == 49 - 8
    relative = tmp_path / "data" / "mine.txt"  # a file name relative to the root works too
    relative.write_text("train/cat/000.jpg\n")
    assert index_dataset(root, exclude="mine.txt").excluded == ["train/cat/000.jpg"]
    with pytest.raises(DataError, match=r"cannot read data.exclude file .*missing.txt: .*set data.exclude"):
        index_dataset(root, exclude=tmp_path / "missing.txt")


def test_the_messy_folder_gives_findings_not_tracebacks(messy_audit):
    unreadable = {Path(row["file"]).name: row["detail"] for row in messy_audit["rows"] if row["finding"] ==
                  "unreadable"}
    assert unreadable.keys() == BAD.keys() | {"self.jpg"}
    for name, reason in BAD.items():
        assert reason in unreadable[name]
    assert "too many levels of symbolic links" in unreadable["self.jpg"].lower()


@pytest.fixture
def messy_audit(messy, tmp_path) -> dict:  # noqa: F811 (the imported fixture)
    """test_bad_input's messy folder (its unreadable file made unreadable for root too), plus a file link loop."""
    (messy / "train" / "cat" / "self.jpg").symlink_to(messy / "train" / "cat" / "self.jpg")
    before = snapshot(messy)
    summary, rows, _ = audit(tmp_path, messy, "features.enabled=false")
    assert snapshot(messy) == before
    return {"summary": summary, "rows": rows}


def test_folders_of_unusable_files_and_empty_classes_are_findings(tmp_path):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(3):
            (root / "train" / name / f"{i}.jpg").write_bytes(b"")
    png_bomb(root / "train" / "cat" / "huge.png")
    (root / "train" / "cat" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "dog" / "self.jpg").symlink_to(root / "train" / "dog" / "self.jpg")
    summary, rows, _ = audit(tmp_path, root)
    kinds = by_kind(rows)
    assert len(kinds["unreadable"]) == 8
    reasons = {Path(r["file"]).name: r["detail"] for r in kinds["unreadable"]}
    assert "DecompressionBomb" in reasons["huge.png"] and "links" in reasons["self.jpg"].lower()
    assert {r["file"] for r in kinds["empty_class"]} == {"train/cat/", "train/dog/"}
    assert summary["facts"]["label check"].startswith("skipped")


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root.mkdir(), "no train folder at"),
    (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    (lambda root: root.write_text("a file"), "is not a folder"),
])
def test_a_folder_that_is_no_dataset_stops_audit_py_with_one_line(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    result = subprocess.run([sys.executable, str(PROJECT / "audit.py"), f"data.root={root}",
                             f"paths.root_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and str(root) in lines[0]


def test_audit_py_help_names_its_outputs_and_the_way_back_into_training(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT / "audit.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    for text in ("python audit.py data.root=", "report.html", "exclude.txt", "data.exclude=", "duplicates:"):
        assert text in result.stdout


def test_findings_csv_has_one_row_per_file_and_finding(planted):
    with (planted["out"] / "findings.csv").open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["finding", "file", "other", "score", "action", "detail"]
    pairs = [(row["finding"], row["file"]) for row in planted["rows"]]
    assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize(("override", "message"), [
    ("+duplicates.hash_bits=3", "duplicates.hash_bits is not a setting of duplicates"),
    ("quality.min_side=-1", "quality.min_side=-1 must be a number of at least 0"),
    ("labels.filter_by=magic", "labels.filter_by='magic' is not one of"),
    ("labels.folds=1", "labels.folds=1 must be at least 2"),
    ("features.precision=16", "features.precision='16' is not one of: auto, 32"),
    ("features.batch_size=0", "features.batch_size=0 must be at least 1"),
])
def test_bad_audit_settings_stop_with_one_line(tmp_path, override, message):
    from animal_lightning.errors import ModelConfigError

    root = clean_folder(tmp_path / "data", per_class=2, test_per_class=0)
    with pytest.raises(ModelConfigError) as raised:
        audit(tmp_path, root, override)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_one_class_and_an_empty_val_class_are_findings(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        shapes(root / "train" / "cat" / f"{i}.jpg", HUES["cat"], seed=i)
    (root / "val" / "cat").mkdir(parents=True)
    summary, rows, _ = audit(tmp_path, root, "features.enabled=false")
    kinds = by_kind(rows)
    assert {r["file"] for r in kinds["one_class"]} == {"train/"}
    assert {r["file"] for r in kinds["empty_class"]} == {"val/cat/"}
    assert summary["facts"]["label check"] == "skipped (features.enabled=false)"


def test_a_file_name_that_is_not_utf8_round_trips_through_exclude_txt(tmp_path):
    root = clean_folder(tmp_path / "data", per_class=4, test_per_class=0)
    odd = os.fsencode(root / "train" / "cat") + b"/copy\xff.jpg"  # Latin-1 names from old archives
    with open(odd, "wb") as handle:
        handle.write((root / "train" / "cat" / "000.jpg").read_bytes())
    _, rows, out = audit(tmp_path, root, "features.enabled=false")
    (copy,) = [row for row in rows if row["finding"] == "exact_duplicate"]
    listed = (out / "exclude.txt").read_bytes().splitlines()
    assert b"train/cat/copy\xff.jpg" in listed
    index = index_dataset(root, exclude=out / "exclude.txt")
    assert [os.fsencode(name) for name in index.excluded] == [b"train/cat/copy\xff.jpg"]
    assert copy["other"] == "train/cat/000.jpg"


def test_without_the_audit_extra_the_message_names_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    from animal_lightning.errors import ModelConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cleanlab" else real(name, *a))
    root = clean_folder(tmp_path / "data", per_class=2, test_per_class=0)
    with pytest.raises(ModelConfigError, match=r"audit.py needs cleanlab: pip install 'animal-lightning\[audit\]'"):
        audit(tmp_path, root)
