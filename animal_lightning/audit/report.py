"""The audit's files: findings.csv, exclude.txt, report.md and a self-contained report.html.

The HTML page inlines everything it shows (thumbnails as JPEG data URIs, charts as PNG data URIs),
so it can be mailed or archived alone; it never links to the user's files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from animal_lightning.atomic import write_bytes_atomic
from animal_lightning.audit.findings import DESCRIPTIONS, KINDS, SECTIONS, Finding
from animal_lightning.data.images import load_rgb

THUMBNAIL = 96  # px, the longer side
_PHOTO_KINDS = frozenset(KINDS) - {"empty_class", "stray_class", "one_class", "few_images", "imbalance",
                                   "not_an_image", "unreadable"}


def write_text(path: Path, text: str, errors: str = "backslashreplace") -> None:
    """UTF-8. A file name that is not UTF-8 is shown as \\xff escapes (errors="backslashreplace"), or written back
    as its own bytes (errors="surrogateescape": exclude.txt, which training reads back as file names)."""
    write_bytes_atomic(path, text.encode("utf-8", errors))


def write_findings_csv(findings: Sequence[Finding], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["finding", "file", "other", "score", "action", "detail"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(f.row() for f in findings)
    write_text(path, buffer.getvalue())


def exclusions(findings: Sequence[Finding]) -> list[str]:
    """The files the findings suggest leaving out of training, each once, in finding order."""
    return list(dict.fromkeys(path for f in findings if f.action == "exclude" for path in f.excludes))


def write_exclude(findings: Sequence[Finding], path: Path) -> list[str]:
    files = exclusions(findings)
    header = ("# Files the audit suggests leaving out of training, relative to the data root (one a line; globs "
              "work too).\n# Use: python train.py data.exclude=" + str(path) + "\n")
    write_text(path, header + "".join(f"{name}\n" for name in files), errors="surrogateescape")
    return files


def summary_lines(findings: Sequence[Finding]) -> list[str]:
    counts = Counter(f.kind for f in findings)
    return [f"{kind:<19} {counts.get(kind, 0):>6}  {DESCRIPTIONS[kind]}" for kind in KINDS]


def write_markdown(findings: Sequence[Finding], facts: dict, path: Path, rows_per_section: int = 20) -> None:
    counts = Counter(f.kind for f in findings)
    lines = [f"# Dataset audit: {facts['root']}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "root"]
    lines += ["", "| finding | count | what it means |", "|---|---:|---|"]
    lines += [f"| {kind} | {counts.get(kind, 0)} | {DESCRIPTIONS[kind]} |" for kind in KINDS]
    for _, title, kinds, about in SECTIONS:
        rows = [f for f in findings if f.kind in kinds]
        lines += ["", f"## {title} ({len(rows)})", "", about, ""]
        if rows:
            lines += ["| finding | file | other | score | action | detail |", "|---|---|---|---:|---|---|"]
            lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in f.row().values()) + " |"
                      for f in rows[:rows_per_section]]
            if len(rows) > rows_per_section:
                lines.append(f"\n... and {len(rows) - rows_per_section} more in findings.csv")
    write_text(path, "\n".join(lines) + "\n")


def thumbnail_uri(path: str) -> str | None:
    """A small JPEG of the photo as a data URI, or None when it does not decode."""
    try:
        image = load_rgb(path)
    except Exception:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def charts(counts: dict[str, int], sizes: Sequence[tuple[int, int]]) -> dict[str, str]:
    """Images per class (bars), photo sizes and aspect ratios (histograms), as PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    names = sorted(counts, key=lambda n: -counts[n])
    figure, axis = plt.subplots(figsize=(max(6.0, 0.18 * len(names)), 3.2))
    axis.bar(range(len(names)), [counts[n] for n in names], color="#4c72b0")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7 if len(names) > 30 else 9)
    axis.set_ylabel("photos (train + val)")
    made["balance"] = figure_uri(figure)
    plt.close(figure)
    if sizes:
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
        left.hist([min(w, h) for w, h in sizes], bins=40, color="#55a868")
        left.set_xlabel("shorter side (px)")
        left.set_ylabel("photos")
        right.hist([max(w, h) / max(1, min(w, h)) for w, h in sizes], bins=40, color="#c44e52")
        right.set_xlabel("aspect ratio (longer / shorter)")
        made["sizes"] = figure_uri(figure)
        plt.close(figure)
    return made


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;
vertical-align:middle;text-align:left}th{background:#f3f3f3}img.thumb{max-width:96px;max-height:96px;display:block}
.count{font-weight:bold}.none{color:#888}"""


def write_html(findings: Sequence[Finding], facts: dict, paths: dict[str, str], figures: dict[str, str],
               path: Path, rows_per_section: int = 100) -> int:
    """The page; returns how many thumbnails it holds. `paths` maps a relative file name to its path on disk."""
    esc = html.escape
    counts = Counter(f.kind for f in findings)
    cache: dict[str, str | None] = {}
    thumbnails = 0

    def thumb(name: str) -> str:
        nonlocal thumbnails
        if name not in paths:
            return ""
        if name not in cache:
            cache[name] = thumbnail_uri(paths[name])
        if cache[name] is None:
            return ""
        thumbnails += 1
        return f'<img class="thumb" src="{cache[name]}" alt="{esc(name)}" data-file="{esc(name)}">'

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Dataset audit: {esc(str(facts['root']))}"
             f"</title><style>{_STYLE}</style></head><body>", "<h1>Dataset audit</h1><ul>"]
    parts += [f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in facts.items()]
    parts.append("</ul><h2>Summary</h2><table><tr><th>finding</th><th>count</th><th>what it means</th></tr>")
    parts += [f"<tr><td><a href='#{k}'>{k}</a></td><td class='count'>{counts.get(k, 0)}</td>"
              f"<td>{esc(DESCRIPTIONS[k])}</td></tr>" for k in KINDS]
    parts.append("</table>")
    for key, title, kinds, about in SECTIONS:
        rows = [f for f in findings if f.kind in kinds]
        parts.append(f"<h2 id='{key}'>{esc(title)} <span class='count'>({len(rows)})</span></h2><p>{esc(about)}</p>")
        parts += [f"<a id='{k}'></a>" for k in kinds]
        if key == "balance" and "balance" in figures:
            parts.append(f"<img src='{figures['balance']}' alt='photos per class'>")
        if key == "quality" and "sizes" in figures:
            parts.append(f"<img src='{figures['sizes']}' alt='photo sizes and aspect ratios'>")
        if not rows:
            parts.append("<p class='none'>Nothing found.</p>")
            continue
        parts.append("<table><tr><th>finding</th><th>photo</th><th>file</th><th>other</th><th>other photo</th>"
                     "<th>score</th><th>action</th><th>detail</th></tr>")
        for f in rows[:rows_per_section]:
            photo = f.kind in _PHOTO_KINDS
            row = f.row()
            parts.append(f"<tr><td>{f.kind}</td><td>{thumb(f.file) if photo else ''}</td><td>{esc(f.file)}</td>"
                         f"<td>{esc(f.other)}</td><td>{thumb(f.other) if photo else ''}</td><td>{row['score']}</td>"
                         f"<td>{f.action}</td><td>{esc(f.detail)}</td></tr>")
        parts.append("</table>")
        if len(rows) > rows_per_section:
            parts.append(f"<p>... and {len(rows) - rows_per_section} more in findings.csv</p>")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts) + "\n")
    return thumbnails
