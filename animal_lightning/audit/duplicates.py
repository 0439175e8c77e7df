"""Exact and near duplicates, and what each copy means: a leak across splits, conflicting labels, or a repeat.

Exact: the same bytes (content digest) or the same decoded pixels. Near: 256-bit perceptual hashes
within `hash_distance` bits, comparing each photo (and its mirror image) with the other and with its
nine 95% crops (fingerprints.py), or within the looser `feature_distance` when the network's features
agree too (similarity at least `feature_similarity`). Features alone would join different photos of
one scene (side views of motorbikes on white); the hash alone misses heavily re-encoded crops. The
defaults were measured on Caltech-101 with planted copies (bench/audit.py).

Within a group one copy is kept: a test/ copy before a val/ copy before a train/ copy (the evaluation
copy stays where it is, the training copy goes), then the largest, then the first by path. Every
other copy is a finding against the kept one:
- leak: the copies are in different splits (a test/ or val/ photo also in train/): every score that
  reads the evaluation copy is inflated;
- conflicting_labels: the same photo under two classes: one of the labels is wrong, both copies go;
- exact_duplicate / near_duplicate: a repeat within one class and split: it counts twice in training
  (and lands on both sides of a random validation split).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from animal_lightning.audit.features import rooted
from animal_lightning.audit.fingerprints import HASH_SIZE, Fingerprint
from animal_lightning.audit.inventory import Entry

_SPLIT_RANK = {"test": 0, "val": 1, "train": 2}
_BLOCK = 1024  # rows compared at once (memory: BLOCK x N)


@dataclass(frozen=True)
class Copy:
    kind: str  # leak | conflicting_labels | exact_duplicate | near_duplicate
    entry: Entry  # the copy that is a finding
    kept: Entry  # the copy it duplicates
    exact: bool
    distance: int  # pHash bits apart (0 for exact copies)
    similarity: float  # feature cosine (nan without features)


class _Groups:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def members(self) -> list[list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            groups[self.find(i)].append(i)
        return [g for g in groups.values() if len(g) > 1]


def hash_array(prints: Sequence[Fingerprint]) -> np.ndarray:
    """N x views x words uint64: each fingerprint's pHashes (whole, mirror, crops) as 64-bit words."""
    return np.array([[np.frombuffer(bytes.fromhex(h), dtype=">u8") for h in p.hashes] for p in prints],
                    dtype=np.uint64).reshape(len(prints), -1, HASH_SIZE * HASH_SIZE // 64)


def _bits_apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """n x words and m x words -> n x m differing bits."""
    total = np.zeros((len(a), len(b)), dtype=np.uint16)
    for word in range(a.shape[1]):
        total += np.bitwise_count(a[:, None, word] ^ b[None, :, word])
    return total


def hash_distances(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Bits apart of each row photo and column photo, the nearest of: whole vs whole, either one (or its
    mirror image) against a crop of the other."""
    whole = (0, 1)
    crops = (0, *range(2, rows.shape[1]))
    best = np.full((len(rows), len(columns)), np.iinfo(np.uint16).max, dtype=np.uint16)
    for x in whole:
        for y in crops:
            np.minimum(best, _bits_apart(rows[:, x], columns[:, y]), out=best)
            if y:
                np.minimum(best, _bits_apart(rows[:, y], columns[:, x]), out=best)
    return best


def unit_features(features: np.ndarray) -> np.ndarray:
    """Square-rooted features at unit length: their dot products are the similarities compared."""
    root = rooted(features)
    return root / np.maximum(np.linalg.norm(root, axis=1, keepdims=True), 1e-12)


def near_pairs(prints: Sequence[Fingerprint], features: np.ndarray | None, hash_distance: int,
               feature_distance: int, feature_similarity: float) -> dict[tuple[int, int], tuple[int, float]]:
    """(i, j) with i < j -> (pHash distance, feature similarity) of every near pair: within `hash_distance` bits,
    or within `feature_distance` bits with feature similarity at least `feature_similarity`."""
    n = len(prints)
    if n < 2:
        return {}
    hashes = hash_array(prints)
    unit = unit_features(features) if features is not None and len(features) == n else None
    pairs: dict[tuple[int, int], tuple[int, float]] = {}
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        distance = hash_distances(hashes[start:stop], hashes[start:])  # columns from `start`: each pair once
        close = distance <= hash_distance
        similarity = None
        if unit is not None:
            similarity = unit[start:stop] @ unit[start:].T
            close |= (distance <= feature_distance) & (similarity >= feature_similarity)
        for r, c in zip(*np.nonzero(close), strict=True):
            i, j = start + int(r), start + int(c)
            if i < j:
                pairs[(i, j)] = (int(distance[r, c]),
                                 float(similarity[r, c]) if similarity is not None else float("nan"))
    return pairs


def _keeper(members: list[int], entries: Sequence[Entry], prints: Sequence[Fingerprint]) -> int:
    return min(members, key=lambda i: (_SPLIT_RANK[entries[i].split], -prints[i].width * prints[i].height,
                                       entries[i].rel))


@dataclass(frozen=True)
class DuplicateSettings:
    hash_distance: int = 32  # near copy: pHashes (256 bits) at most this many bits apart ...
    feature_distance: int = 40  # ... or at most this many, with features at least feature_similarity alike
    feature_similarity: float = 0.9


def find_copies(entries: Sequence[Entry], prints: Sequence[Fingerprint], features: np.ndarray | None = None,
                settings: DuplicateSettings = DuplicateSettings()) -> list[Copy]:
    """Every copy of another photo among `entries` (all decodable; `prints` and `features` row-aligned).

    Each copy is reported against a direct partner (an evaluation copy for a leak; one under another class;
    the closest; the kept one), so a chain of near pairs never pairs two photos that are not alike."""
    groups = _Groups(len(entries))
    partners: dict[int, dict[int, tuple[bool, int, float]]] = defaultdict(dict)
    # identical files (same bytes or same pixels) collapse onto one representative first: k copies of a
    # placeholder photo make k links, not k * k pairs
    representative: dict[str, int] = {}
    for i, item in enumerate(prints):
        keys = (item.digest, "pixels:" + item.pixels)
        found = next((representative[k] for k in keys if k in representative), None)
        if found is None:
            found = i
        else:
            groups.join(found, i)
            partners[i][found] = partners[found][i] = (True, 0, 1.0)
        for k in keys:
            representative.setdefault(k, found)
    heads = sorted({representative[item.digest] for item in prints})
    near = near_pairs([prints[i] for i in heads], None if features is None else features[heads],
                      settings.hash_distance, settings.feature_distance, settings.feature_similarity)
    for (a, b), (distance, similarity) in near.items():
        i, j = heads[a], heads[b]
        groups.join(i, j)
        partners[i][j] = partners[j][i] = (False, distance, similarity)
    copies = []
    for members in groups.members():
        kept = _keeper(members, entries, prints)
        for i in members:
            a = entries[i]

            def nearest(candidates: list[int], a: Entry = a, i: int = i, kept: int = kept) -> int:
                # another class first (a conflict), then the closest copy (exact before near), then the kept one
                return min(candidates, key=lambda other: (entries[other].label == a.label, not partners[i][other][0],
                                                          partners[i][other][1], other != kept, entries[other].rel))

            # a copy of a photo in a split that is evaluated before its own (test before val before train) leaks
            # it: the finding is this copy, the one to leave out
            evaluated = [j for j in partners[i] if _SPLIT_RANK[entries[j].split] < _SPLIT_RANK[a.split]]
            same = [j for j in partners[i] if entries[j].split == a.split]
            if evaluated:
                j, kind = nearest(evaluated), "leak"
            elif i != kept and same:
                j = nearest(same)
                kind = "conflicting_labels" if entries[j].label != a.label else None
            else:
                continue  # the kept copy, or an evaluation copy whose copies are reported from their side
            exact, distance, similarity = partners[i][j]
            kind = kind or ("exact_duplicate" if exact else "near_duplicate")
            copies.append(Copy(kind, a, entries[j], exact, distance, similarity))
    order = {"leak": 0, "conflicting_labels": 1, "exact_duplicate": 2, "near_duplicate": 3}
    return sorted(copies, key=lambda c: (order[c.kind], c.entry.rel))
