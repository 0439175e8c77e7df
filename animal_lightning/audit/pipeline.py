"""The audit job: scan the folder, fingerprint and embed every photo once, run each check, write the report."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from animal_lightning.atomic import atomic_file
from animal_lightning.audit import report
from animal_lightning.audit.checks import QualitySettings, balance_findings, class_counts, quality_findings
from animal_lightning.audit.duplicates import Copy, DuplicateSettings, find_copies
from animal_lightning.audit.features import FeatureNetwork, image_features
from animal_lightning.audit.findings import KINDS, Finding
from animal_lightning.audit.fingerprints import Fingerprint, FingerprintCache, fingerprint_files
from animal_lightning.audit.inventory import Inventory, take_inventory
from animal_lightning.audit.labels import FILTERS, LabelCheck, check_labels, unknown_scores
from animal_lightning.errors import DataError, ModelConfigError
from animal_lightning.hardware import cpu_description

log = logging.getLogger(__name__)


def say(message: str) -> None:
    print(message, flush=True)


def require_extra() -> None:
    """The audit's libraries (ImageHash, cleanlab) come with the `audit` extra: one line when they are missing."""
    missing = [name for name in ("imagehash", "cleanlab") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelConfigError(f"audit.py needs {' and '.join(missing)}: pip install 'animal-lightning[audit]' "
                               "(make install installs it)")


def dataset_root(data_cfg) -> Path:
    """The data config's root, as train.py would read it (the demo set generates itself first)."""
    datamodule = instantiate(data_cfg)
    datamodule.prepare_dataset()
    return Path(datamodule.root)


def file_findings(inventory: Inventory, prints: Sequence[Fingerprint]) -> list[Finding]:
    found = [Finding("unreadable", e.rel, action="exclude", detail=p.problem or "", excludes=(e.rel,))
             for e, p in zip(inventory.entries, prints, strict=True) if p.problem]
    found += [Finding("not_an_image", e.rel, detail=f"{Path(e.rel).suffix or 'no extension'}: not a type the loader "
                      "reads (jpg, jpeg, png, bmp, webp); convert it to use it")
              for e in inventory.other_files]
    found += [Finding("unreadable", e.rel, action="fix", detail=f"folder cannot be listed ({why}): its photos are "
                      "missing from training; give read access (chmod -R u+rX)")
              for e, why in inventory.unreadable_folders]
    return found


def copy_findings(copies: Sequence[Copy]) -> list[Finding]:
    found = []
    for c in copies:
        how = "exact copy (same bytes or pixels)" if c.exact else (
            f"near copy: pHash {c.distance} bits apart" + ("" if np.isnan(c.similarity)
                                                          else f", features {c.similarity:.2f} alike"))
        a, b = c.entry, c.kept
        where = lambda e: f"{e.split}/{e.label}" if e.label else f"{e.split}/ (unlabelled)"  # noqa: E731
        if c.kind == "leak":
            found.append(Finding("leak", a.rel, b.rel, c.distance, "exclude",
                                 f"{how}; the {where(b)} copy stays, this {a.split}/ copy goes", (a.rel,)))
        elif c.kind == "conflicting_labels":
            found.append(Finding("conflicting_labels", a.rel, b.rel, c.distance, "exclude",
                                 f"{how}, filed as {a.label} and as {b.label}: keep it under the right class only",
                                 (a.rel, b.rel)))
        elif c.kind == "exact_duplicate":
            found.append(Finding("exact_duplicate", a.rel, b.rel, c.distance, "exclude",
                                 f"{how} in {where(a)}", (a.rel,)))
        else:
            found.append(Finding("near_duplicate", a.rel, b.rel, c.distance, "review", f"{how} in {where(a)}"))
    return found


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def label_findings(cfg, cache_root: Path | None, network: FeatureNetwork, inventory: Inventory,
                   usable: list[int], prints: Sequence[Fingerprint], features: np.ndarray
                   ) -> tuple[list[Finding], dict]:
    """Likely wrong labels among the labelled photos, and the unlabelled test photos like no training class."""
    entries = inventory.entries
    class_names = inventory.class_names
    index = {name: i for i, name in enumerate(class_names)}
    labelled = [k for k, i in enumerate(usable) if entries[i].label in index]
    flat = [k for k, i in enumerate(usable) if entries[i].label is None]
    labels = np.array([index[entries[usable[k]].label] for k in labelled], dtype=np.int64)
    settings = {"folds": int(cfg.labels.folds), "seed": int(cfg.labels.seed), "max_iter": int(cfg.labels.max_iter),
                "keep": float(cfg.labels.open_set_keep), "filter_by": str(cfg.labels.filter_by)}
    # the filter is applied after the cache: changing labels.filter_by does not cross-validate again
    key = _digest({"network": network.key, "classes": class_names, "version": 4,
                   **{k: v for k, v in settings.items() if k != "filter_by"},
                   "labelled": [(prints[usable[k]].digest, int(v)) for k, v in zip(labelled, labels, strict=True)],
                   "flat": [prints[usable[k]].digest for k in flat]})
    stored = cache_root / f"labels-{key}.npz" if cache_root is not None else None
    facts: dict = {}
    check: LabelCheck | None = None
    typical = threshold = None
    cached = False
    if stored is not None and stored.is_file():
        try:
            with np.load(stored, allow_pickle=False) as saved:
                if "probabilities" in saved:
                    check = LabelCheck.from_arrays(saved)
                if "typical" in saved:
                    typical, threshold = saved["typical"], float(saved["threshold"])
            facts["label check"] = "cached"
            cached = True
        except Exception:  # a damaged cache file (zip, arrays, keys): computed again
            check, typical, threshold = None, None, None
    if not cached:
        started = time.perf_counter()
        check = check_labels(features[labelled], labels, class_names, folds=settings["folds"], seed=settings["seed"],
                             max_iter=settings["max_iter"])
        if flat and len(labelled) > 1:
            typical, threshold = unknown_scores(features[labelled], features[flat], keep=settings["keep"])
        facts["label check"] = f"computed in {time.perf_counter() - started:.1f} s"
        if stored is not None:
            arrays = {}
            if check is not None:
                arrays.update(check.arrays())
            if typical is not None:
                arrays.update(typical=typical, threshold=np.array(threshold))
            with atomic_file(stored) as handle:
                np.savez(handle, **arrays)
    found = []
    if check is None:
        facts["label check"] = "skipped: fewer than two classes with two photos"
    else:
        found += _issue_findings(check, settings["filter_by"], entries, usable, labelled, class_names)
        facts["cross-validated accuracy of the probe"] = f"{check.cv_accuracy:.1%} ({check.folds} folds)"
        if check.skipped_classes:
            facts["classes too small to check"] = ", ".join(check.skipped_classes)
    if typical is not None:
        unknown = [(k, float(m)) for k, m in zip(flat, typical, strict=True) if m < threshold]
        facts["unlabelled test photos like no training class"] = (
            f"{len(unknown)} of {len(flat)} ({len(unknown) / max(1, len(flat)):.0%}; nearest-neighbour score under "
            f"{threshold:.3f}, which keeps {settings['keep']:.0%} of labelled photos)")
        found += [Finding("unknown_test", entries[usable[k]].rel, score=m,
                          detail=f"typicality {m:.3f} (threshold {threshold:.3f}): far from every labelled photo")
                  for k, m in sorted(unknown, key=lambda x: x[1])]
    return found, facts


def _issue_findings(check: LabelCheck, filter_by: str, entries, usable: list[int], labelled: list[int],
                    class_names: list[str]) -> list[Finding]:
    found = []
    for n, suggested, probability, quality in check.issues(filter_by):
        entry = entries[usable[labelled[int(check.checked[n])]]]
        found.append(Finding("label_issue", entry.rel, class_names[suggested], quality, "exclude",
                             f"filed as {entry.label}; {class_names[suggested]} ({probability:.0%}) by a classifier "
                             "that never saw it", (entry.rel,)))
    return found


def feature_network(cfg) -> FeatureNetwork:
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise DataError(f"checkpoint {path} not found: set ckpt_path=<run>/checkpoints/best.ckpt or null "
                            "(then features.backbone's ImageNet weights are used)")
        network = FeatureNetwork.from_checkpoint(path)
    else:
        network = FeatureNetwork.from_backbone(str(cfg.features.backbone), bool(cfg.features.pretrained),
                                               cfg.features.get("image_size"),
                                               str(cfg.features.get("resize_mode", "crop")))
    return network.with_precision(str(cfg.features.get("precision", "auto")))


def _settings(name: str, block, kind):
    """A config block as `kind`'s arguments: an unknown key or a value of the wrong type is one line."""
    values = OmegaConf.to_container(block) if block is not None else {}
    accepted = {f.name: f.type for f in fields(kind)}
    for key, value in values.items():
        if key not in accepted:
            raise ModelConfigError(f"{name}.{key} is not a setting of {name}: use {', '.join(accepted)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ModelConfigError(f"{name}.{key}={value!r} must be a number of at least 0")
    return kind(**values)


def check_settings(cfg) -> None:
    """The audit's own settings, checked before anything runs (one line each)."""
    _settings("duplicates", cfg.get("duplicates"), DuplicateSettings)
    _settings("quality", cfg.get("quality"), QualitySettings)
    for key in ("batch_size",):
        if int(cfg.features[key]) < 1:
            raise ModelConfigError(f"features.{key}={cfg.features[key]} must be at least 1")
    if int(cfg.report.rows_per_section) < 0 or int(cfg.workers) < 1:
        raise ModelConfigError(f"report.rows_per_section={cfg.report.rows_per_section} must be at least 0 and "
                               f"workers={cfg.workers} at least 1")
    if str(cfg.labels.filter_by) not in FILTERS:
        raise ModelConfigError(f"labels.filter_by={cfg.labels.filter_by!r} is not one of: {', '.join(FILTERS)}")
    if int(cfg.labels.folds) < 2:
        raise ModelConfigError(f"labels.folds={cfg.labels.folds} must be at least 2 (e.g. 5)")
    if not 0.0 < float(cfg.labels.open_set_keep) < 1.0:
        raise ModelConfigError(f"labels.open_set_keep={cfg.labels.open_set_keep} must be between 0 and 1 (e.g. 0.95)")


def run_audit(cfg) -> dict:
    """Audit the data config's folder into cfg.paths.output_dir; returns the summary (also summary.json)."""
    started = time.perf_counter()
    require_extra()
    check_settings(cfg)
    root = dataset_root(cfg.data)
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cache_root = Path(str(cfg.cache_dir)).expanduser() if cfg.get("cache_dir") else None
    inventory = take_inventory(root)
    entries = inventory.entries
    splits = {s: sum(1 for e in entries if e.split == s) for s in ("train", "val", "test")}
    say(f"Auditing {root}: {len(entries)} photos ({', '.join(f'{n} in {s}/' for s, n in splits.items() if n)}), "
        f"{len(inventory.class_names)} classes")
    network = feature_network(cfg) if cfg.features.enabled else None  # fail early on weights, before the long part

    cache = FingerprintCache(cache_root) if cache_root is not None else None
    prints, decoded = fingerprint_files([e.path for e in entries], cache, workers=int(cfg.workers),
                                        progress=lambda done, total: say(f"  fingerprints {done}/{total}"))
    if cache is not None and decoded:
        cache.save()
    usable = [i for i, p in enumerate(prints) if not p.problem]
    findings = file_findings(inventory, prints)
    facts: dict = {"root": str(root), "photos": len(entries), "classes": len(inventory.class_names),
                   "fingerprints": f"{decoded} computed, {len(entries) - decoded} cached"}

    features = None
    if network is not None and usable:
        features, computed = image_features(network, [entries[i].path for i in usable],
                                            [prints[i].digest for i in usable], cache_root,
                                            batch_size=int(cfg.features.batch_size),
                                            num_workers=cfg.features.num_workers)
        facts["features"] = f"{network.description}: {computed} computed, {len(usable) - computed} cached"
    duplicates = _settings("duplicates", cfg.duplicates, DuplicateSettings)
    copies = find_copies([entries[i] for i in usable], [prints[i] for i in usable], features, duplicates)
    findings += copy_findings(copies)
    findings += quality_findings([entries[i] for i in usable], [prints[i] for i in usable],
                                 _settings("quality", cfg.quality, QualitySettings))
    usable_paths = {entries[i].path for i in usable}
    counts = class_counts(inventory, usable_paths)
    findings += balance_findings(inventory, usable_paths, int(cfg.balance.min_images), float(cfg.balance.max_ratio))
    if features is not None:
        found, label_facts = label_findings(cfg, cache_root, network, inventory, usable, prints, features)
        findings += found
        facts.update(label_facts)
    else:
        facts["label check"] = ("skipped (features.enabled=false)" if network is None
                                else "skipped: no usable photo")

    order = {kind: n for n, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: order[f.kind])  # stable: each check's own order within a kind
    facts["machine"] = cpu_description()
    facts["seconds"] = round(time.perf_counter() - started, 1)
    report.write_findings_csv(findings, output / "findings.csv")
    excluded = report.write_exclude(findings, output / "exclude.txt")
    report.write_markdown(findings, facts, output / "report.md")
    paths = {e.rel: e.path for e in entries}
    figures = report.charts(counts, [(prints[i].width, prints[i].height) for i in usable])
    thumbnails = report.write_html(findings, facts, paths, figures, output / "report.html",
                                   rows_per_section=int(cfg.report.rows_per_section))
    counts_by_kind = {kind: sum(1 for f in findings if f.kind == kind) for kind in KINDS}
    summary = {"root": str(root), "output": str(output), "counts": counts_by_kind, "excluded": len(excluded),
               "facts": facts, "thumbnails": thumbnails, "class_counts": counts}
    report.write_text(output / "summary.json", json.dumps(summary, indent=1) + "\n")
    say("\n".join(report.summary_lines(findings)))
    say(f"{len(excluded)} files suggested for exclusion: {output / 'exclude.txt'} "
        f"(python train.py data.exclude={output / 'exclude.txt'})")
    say(f"Report: {output / 'report.html'} (and report.md, findings.csv), {facts['seconds']} s")
    return summary



