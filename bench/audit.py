"""The dataset audit on real photos with planted defects: recall and precision per kind, and wall time.

Links a copy of a labelled photo folder (default ../shared/data/caltech101: train/ and test/ class
folders), audits it untouched twice (a first audit with an empty cache, then a second one that reuses
it), then plants known defects in a second copy and audits that:
- `--exact` exact copies of random photos into the other split (the same class): leaks;
- `--near` near copies into the other split: resized to 60%, re-encoded at JPEG quality 40, and
  in turn cropped by 5% (a random offset), mirrored, or both: leaks;
- `--swap` of the training photos moved to another, random class folder: wrong labels.
Recall: the planted copies found as a copy of their source (a duplicate finding pairing the two, or
the source's own copies in the untouched audit), and the swapped photos found as label issues.
Precision: of the duplicate findings that the untouched audit did not have, those that are planted
pairs; of the label issues, those that are swapped photos (all of them, and those new since the
untouched audit, which holds the folder's own suspects). The untouched audit's findings are also
reported: what the audit finds in the real folder. Prints JSON, then a one-line summary.

    python bench/audit.py [--data ../shared/data/caltech101] [--exact 50] [--near 50] [--swap 0.03]
        [--limit-per-class N] [--audit-args "features.batch_size=64 ..."] [--filters all]

--held-out N (10 by default) audits one more copy shaped like the real task: N classes removed from
train/ and every test/ photo in one flat, unlabelled folder; it reports how many photos of the removed
classes the unknown estimate flags, and how many of the others.
--filters audits the planted copy again with each of cleanlab's label filters (the cross-validated
probabilities are cached, so each costs seconds) and reports each one's recall and precision.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps

from animal_lightning.hardware import cpu_description

PROJECT = Path(__file__).resolve().parents[1]
DUPLICATE_KINDS = ("leak", "conflicting_labels", "exact_duplicate", "near_duplicate")


def link_copy(source: Path, target: Path, limit: int | None) -> None:
    """train/ and test/ class folders of `source` as hard links (a copy that costs no disk; never written)."""
    for split in ("train", "val", "test"):
        if not (source / split).is_dir():
            continue
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.is_file())[:limit]
            (target / split / folder.name).mkdir(parents=True, exist_ok=True)
            for file in files:
                try:
                    os.link(file, target / split / folder.name / file.name)
                except OSError:  # another file system (or no hard links there): a real copy
                    shutil.copy2(file, target / split / folder.name / file.name)


def run_audit(root: Path, cache: Path, out: Path, extra: list[str]) -> tuple[dict, list[dict], float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(PROJECT / "audit.py"), f"data.root={root}", f"cache_dir={cache}",
                             f"hydra.run.dir={out}", *extra], cwd=out.parent, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"audit.py failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    with (out / "findings.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return summary, rows, seconds


def near_copy(image: Image.Image, variant: int, rng: random.Random) -> Image.Image:
    image = image.resize((max(8, round(image.width * 0.6)), max(8, round(image.height * 0.6))),
                         Image.Resampling.BILINEAR)
    if variant in (0, 2):  # a 5% crop at a random offset
        dx, dy = round(image.width * 0.05), round(image.height * 0.05)
        x, y = rng.randint(0, dx), rng.randint(0, dy)
        image = image.crop((x, y, image.width - dx + x, image.height - dy + y))
    if variant in (1, 2):
        image = ImageOps.mirror(image)
    return image


def plant(root: Path, exact: int, near: int, swap: float, seed: int) -> dict:
    """Plant the defects in the linked copy at `root` (links are replaced, never written through)."""
    rng = random.Random(seed)
    other = {"train": "test", "val": "train", "test": "train"}
    photos = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*") if p.is_file()
                    and p.parts[-3] in other)
    sources = rng.sample(photos, exact + near)
    planted: dict = {"exact": {}, "near": {}, "swapped": {}}
    for n, rel in enumerate(sources):
        split, label, name = rel.split("/")
        kind = "exact" if n < exact else "near"
        target = f"{other[split]}/{label}/planted_{kind}_{n:03d}_{Path(name).stem}.jpg"
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        if kind == "exact":
            shutil.copyfile(root / rel, root / target)
        else:
            with Image.open(root / rel) as image:
                copy = near_copy(ImageOps.exif_transpose(image).convert("RGB"), n % 3, rng)
            buffer = io.BytesIO()
            copy.save(buffer, format="JPEG", quality=40)
            (root / target).write_bytes(buffer.getvalue())
        planted[kind][target] = rel
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    train = [p for p in photos if p.startswith("train/") and p not in sources]
    for rel in rng.sample(train, round(swap * len(train))):
        _, label, name = rel.split("/")
        new_label = rng.choice([c for c in classes if c != label])
        target = f"train/{new_label}/swapped_{name}"
        os.rename(root / rel, root / target)
        planted["swapped"][target] = rel
    return planted


def hold_out(root: Path, count: int, seed: int) -> dict[str, bool]:
    """Turn the linked copy at `root` into the real task's shape: `count` classes lose their train/ folder,
    and every test/ photo goes into one flat, unlabelled test/ folder. Returns {flat name: held-out class?}."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    held = set(rng.sample(classes, count))
    truth = {}
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for photo in sorted(folder.iterdir()):
            name = f"test/{folder.name}__{photo.name}"
            os.rename(photo, root / name)
            truth[name] = folder.name in held
        folder.rmdir()
    for name in held:
        shutil.rmtree(root / "train" / name)  # links only: the originals stay
    return truth


def unknown_scores(truth: dict[str, bool], rows: list[dict]) -> dict:
    flagged = {r["file"] for r in rows if r["finding"] == "unknown_test"}
    unseen = [name for name, held in truth.items() if held]
    seen = [name for name, held in truth.items() if not held]
    return {"test_photos": len(truth), "of_held_out_classes": len(unseen),
            "flagged": len(flagged), "true_share": len(unseen) / max(1, len(truth)),
            "estimated_share": len(flagged) / max(1, len(truth)),
            "recall": sum(name in flagged for name in unseen) / max(1, len(unseen)),
            "precision": sum(name in flagged for name in unseen) / max(1, len(flagged)),
            "known_flagged": sum(name in flagged for name in seen) / max(1, len(seen))}


def pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def score(planted: dict, clean_rows: list[dict], rows: list[dict]) -> dict:
    moved = planted["swapped"]  # a swapped photo's findings compare under its original name
    original = lambda name: moved.get(name, name)  # noqa: E731
    clean_pairs = {pair(r["file"], r["other"]) for r in clean_rows if r["finding"] in DUPLICATE_KINDS}
    linked: dict[str, set[str]] = {}
    for a, b in clean_pairs:
        linked.setdefault(a, set()).add(b)
        linked.setdefault(b, set()).add(a)
    duplicates = [r for r in rows if r["finding"] in DUPLICATE_KINDS]
    new = [r for r in duplicates if pair(original(r["file"]), original(r["other"])) not in clean_pairs]
    copies = {**planted["exact"], **planted["near"]}

    def is_planted_pair(row: dict) -> bool:
        for copy_name, other in ((row["file"], row["other"]), (row["other"], row["file"])):
            if copy_name in copies:
                source = copies[copy_name]
                return original(other) == source or original(other) in linked.get(source, set())
        return False

    found = {name for r in duplicates if is_planted_pair(r) for name in (r["file"], r["other"]) if name in copies}
    result = {}
    for kind in ("exact", "near"):
        names = planted[kind]
        hits = sum(1 for name in names if name in found)
        kinds = Counter(r["finding"] for r in duplicates if is_planted_pair(r)
                        and (r["file"] in names or r["other"] in names))
        result[kind] = {"planted": len(names), "found": hits, "recall": hits / max(1, len(names)),
                        "as": dict(kinds)}
    correct = sum(1 for r in new if is_planted_pair(r))
    result["duplicates_precision"] = {"new_findings": len(new), "planted_pairs": correct,
                                      "precision": correct / max(1, len(new))}
    issues = [r for r in rows if r["finding"] == "label_issue"]
    clean_issues = {r["file"] for r in clean_rows if r["finding"] == "label_issue"}
    swapped = planted["swapped"]
    hits = [r for r in issues if r["file"] in swapped]
    new_issues = [r for r in issues if original(r["file"]) not in clean_issues]
    restored = sum(1 for r in hits if r["other"] == swapped[r["file"]].split("/")[1])
    result["swapped"] = {"planted": len(swapped), "found": len(hits), "recall": len(hits) / max(1, len(swapped)),
                         "label_issues": len(issues), "precision": len(hits) / max(1, len(issues)),
                         "new_label_issues": len(new_issues),
                         "precision_new": len(hits) / max(1, len(new_issues)),
                         "suggests_the_true_class": restored / max(1, len(hits))}
    return result


def examples(rows: list[dict], kinds: tuple[str, ...], count: int = 5) -> list[dict]:
    return [{k: r[k] for k in ("finding", "file", "other", "score", "detail")} for r in rows
            if r["finding"] in kinds][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data" / "caltech101")
    parser.add_argument("--exact", type=int, default=50)
    parser.add_argument("--near", type=int, default=50)
    parser.add_argument("--swap", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-per-class", type=int, default=None, help="link at most this many photos a class")
    parser.add_argument("--audit-args", default="", help="more audit.py overrides, e.g. features.batch_size=64")
    parser.add_argument("--keep", type=Path, default=None, help="keep the audits' folders here")
    parser.add_argument("--held-out", type=int, default=10, help="also audit a copy whose test/ is flat and "
                        "unlabelled with this many classes left out of train/ (0: skip): the unknown estimate")
    parser.add_argument("--filters", default="", help="also audit the planted copy with each of these cleanlab "
                        "filters (comma-separated, or all) and compare their label-issue recall and precision")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"no train/ folder in {args.data}: pass --data /path/to/a/labelled/folder")
    extra = shlex.split(args.audit_args)
    work = Path(tempfile.mkdtemp(prefix="bench_audit_"))
    try:
        clean, dirty, cache = work / "clean", work / "planted", work / "cache"
        link_copy(args.data, clean, args.limit_per_class)
        first, clean_rows, first_s = run_audit(clean, cache, work / "audit_first", extra)
        _, _, second_s = run_audit(clean, cache, work / "audit_second", extra)
        link_copy(args.data, dirty, args.limit_per_class)
        planted = plant(dirty, args.exact, args.near, args.swap, args.seed)
        report, rows, planted_s = run_audit(dirty, cache, work / "audit_planted", extra)
        scores = score(planted, clean_rows, rows)
        unknown = None
        if args.held_out:
            flat = work / "held_out"
            link_copy(args.data, flat, args.limit_per_class)
            truth = hold_out(flat, args.held_out, args.seed)
            _, held_rows, _ = run_audit(flat, cache, work / "audit_held_out", extra)
            unknown = unknown_scores(truth, held_rows)
        filters = {}
        if args.filters:
            from animal_lightning.audit.labels import FILTERS

            for name in FILTERS if args.filters == "all" else args.filters.split(","):
                _, filtered, _ = run_audit(dirty, cache, work / f"audit_{name}", [*extra, f"labels.filter_by={name}"])
                filters[name] = score(planted, clean_rows, filtered)["swapped"]
        summary = {
            "benchmark": "audit", "machine": cpu_description(), "data": str(args.data),
            "photos": first["facts"]["photos"], "classes": first["facts"]["classes"],
            "features": first["facts"].get("features"),
            "probe_cv_accuracy": first["facts"].get("cross-validated accuracy of the probe"),
            "first_audit_s": round(first_s, 1), "second_audit_s": round(second_s, 1),
            "planted_audit_s": round(planted_s, 1), "planted_audit_facts": report["facts"],
            **scores,
            **({"filters": filters} if filters else {}),
            **({"unknown": unknown} if unknown else {}),
            "untouched": {"counts": {k: v for k, v in first["counts"].items() if v}, "excluded": first["excluded"],
                          "duplicate_examples": examples(clean_rows, DUPLICATE_KINDS),
                          "label_issue_examples": examples(clean_rows, ("label_issue",))},
        }
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(work, args.keep, symlinks=True, ignore=shutil.ignore_patterns("clean", "planted",
                                                                                             "held_out", "cache"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    print(f"audit ({summary['machine']}): {summary['photos']} photos; first {summary['first_audit_s']} s, "
          f"cached {summary['second_audit_s']} s; recall exact {scores['exact']['recall']:.0%}, near "
          f"{scores['near']['recall']:.0%} (duplicate precision {scores['duplicates_precision']['precision']:.0%}); "
          f"swapped labels recall {scores['swapped']['recall']:.0%} at precision {scores['swapped']['precision']:.0%}")


if __name__ == "__main__":
    main()
