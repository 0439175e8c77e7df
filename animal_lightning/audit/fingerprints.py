"""One decode per file: its content digest, whether it decodes, and the numbers every pixel check reads.

A fingerprint holds the sha256 of the file's bytes (the key of every cache: a renamed or moved photo
keeps its fingerprint and features), the sha256 of its decoded pixels (two files that differ only in
metadata or container are the same photo), 256-bit perceptual hashes (ImageHash's pHash at hash size
16: the signs of the 16 x 16 lowest frequencies of the 64 x 64 greyscale image's DCT, robust to resizing
and re-encoding) of the photo, of its mirror image and of nine 95% crops anchored at the corners,
edges and centre (a pHash alone moves as far for a 5% crop as for an unrelated photo; a copy cropped by
up to 5% is within half a step of one of the nine), its size and mode, and the statistics the quality
checks threshold (brightness, contrast, sharpness, colour). Fingerprints are plain JSON, cached by
content digest, so a second audit of the same folder decodes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from animal_lightning.atomic import write_text_atomic
from animal_lightning.data.images import image_problem, load_rgb

FINGERPRINT_VERSION = 3  # bump when a statistic's definition changes: older cached fingerprints are recomputed
HASH_SIZE = 16  # pHash bits = HASH_SIZE ** 2
CROP = 0.95  # the crops hashed besides the whole photo: a copy cropped by up to 1 - CROP still matches one
HASH_SIDE = 512  # hashes are taken on a copy at most this large: pHash looks at 64 x 64 px anyway, and nine crops
# and a mirror of an 80-megapixel photo at full size would take gigabytes
STATS_SIDE = 256  # quality statistics are taken on a copy whose longer side is at most this (like a viewer would)
_CHUNK = 1 << 20


@dataclass
class Fingerprint:
    digest: str  # sha256 of the file's bytes
    problem: str | None = None  # why it cannot be used as an image (None: it decodes)
    pixels: str = ""  # sha256 of the upright RGB pixels and their size
    hashes: tuple[str, ...] = ()  # pHashes as 64 hex digits: the photo, its mirror, then the nine 95% crops
    width: int = 0
    height: int = 0
    mode: str = ""  # PIL mode as stored (RGBA, LA, P with transparency: alpha)
    alpha: bool = False
    brightness: float = 0.0  # mean luminance, 0-255
    dark: float = 0.0  # 99th percentile of luminance: low means nothing in the photo is bright
    light: float = 0.0  # 1st percentile of luminance: high means nothing is dark (overexposed)
    contrast: float = 0.0  # standard deviation of luminance: near 0 for a blank photo
    sharpness: float = 0.0  # standard deviation of the Laplacian (edge strength), on the STATS_SIDE copy
    colourfulness: float = 0.0  # mean absolute difference between channels: 0 for greyscale stored as RGB


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (image.mode == "P" and "transparency" in image.info)


def _phash(image: Image.Image) -> str:
    import imagehash  # the audit extra (pipeline.require_extra says how to install it)

    return str(imagehash.phash(image, hash_size=HASH_SIZE))


def crops(image: Image.Image, fraction: float = CROP) -> list[Image.Image]:
    """Nine crops of `fraction` of each side, anchored at the corners, the edge middles and the centre."""
    width, height = image.size
    w, h = max(1, round(width * fraction)), max(1, round(height * fraction))
    return [image.crop((x, y, x + w, y + h)) for x in (0, (width - w) // 2, width - w)
            for y in (0, (height - h) // 2, height - h)]


def perceptual_hashes(rgb: Image.Image) -> tuple[str, ...]:
    return tuple(_phash(view) for view in (rgb, ImageOps.mirror(rgb), *crops(rgb)))


def fingerprint(path: str | os.PathLike, digest: str) -> Fingerprint:
    """Decode `path` once and measure it; an unusable file gets its reason (never an exception)."""
    problem = image_problem(path)
    if problem is not None:
        return Fingerprint(digest, problem=problem)
    try:
        return _measure(path, digest)
    except Exception as error:  # a file that passed the check but fails a full decode, or too large to hold
        return Fingerprint(digest, problem=f"{type(error).__name__}: {error}".strip().replace("\n", " "))


def _measure(path: str | os.PathLike, digest: str) -> Fingerprint:
    with Image.open(path) as raw:
        mode, alpha = raw.mode, _has_alpha(raw)
    rgb = load_rgb(path)  # refuses decompression bombs before decoding, applies EXIF orientation
    pixels = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    pixels.update(rgb.tobytes())
    width, height = rgb.size
    rgb.thumbnail((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    hashes = perceptual_hashes(rgb)
    rgb.thumbnail((STATS_SIDE, STATS_SIDE), Image.Resampling.BILINEAR)
    grey = rgb.convert("L")
    luminance = np.asarray(grey, dtype=np.float32)
    channels = np.asarray(rgb, dtype=np.float32)
    edges = np.asarray(grey.filter(ImageFilter.Kernel((3, 3), (0, 1, 0, 1, -4, 1, 0, 1, 0), 1, 128)),
                       dtype=np.float32)
    colour = np.abs(channels - channels.mean(axis=2, keepdims=True)).mean()
    return Fingerprint(
        digest, pixels=pixels.hexdigest(), hashes=hashes, width=width, height=height, mode=mode,
        alpha=alpha, brightness=float(luminance.mean()), dark=float(np.percentile(luminance, 99)),
        light=float(np.percentile(luminance, 1)), contrast=float(luminance.std()),
        sharpness=float(edges[1:-1, 1:-1].std()) if min(edges.shape) > 2 else 0.0, colourfulness=float(colour))


class FingerprintCache:
    """Fingerprints by content digest in one JSON file (`fingerprints.json` in the cache folder).

    Read whole, extended, written back atomically: a killed audit leaves the previous cache."""

    def __init__(self, folder: Path):
        self.path = folder / "fingerprints.json"
        self.entries: dict[str, dict] = {}
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("version") == FINGERPRINT_VERSION and isinstance(stored["fingerprints"], dict):
                self.entries = stored["fingerprints"]
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass  # missing or damaged: start again (it is only a cache)

    def get(self, digest: str) -> Fingerprint | None:
        entry = self.entries.get(digest)
        if entry is None:
            return None
        try:
            item = Fingerprint(**{**entry, "hashes": tuple(entry.get("hashes", ()))})
            for value in item.hashes:
                bytes.fromhex(value)
            return item
        except (TypeError, AttributeError, ValueError):  # a damaged entry: computed again
            return None

    def put(self, found: Sequence[Fingerprint]) -> None:
        for item in found:
            self.entries[item.digest] = asdict(item)

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps({"version": FINGERPRINT_VERSION, "fingerprints": self.entries}))


def fingerprint_files(paths: Sequence[str], cache: FingerprintCache | None, workers: int = 2,
                      progress: Callable[[int, int], None] | None = None) -> tuple[list[Fingerprint], int]:
    """Every file's fingerprint, in order, and how many photos were decoded (not found in the cache; files that
    cannot even be read are not counted).

    Threads: hashing and PIL's decoders release the GIL."""
    def digest_or_none(path: str) -> str:
        try:
            return file_digest(path)
        except OSError as error:  # a dangling link, a link loop, no permission: still one finding, by path
            return "unreadable:" + hashlib.sha256(f"{path}\0{error.strerror}".encode("utf-8", "surrogateescape")
                                                  ).hexdigest()

    def one(path: str) -> tuple[Fingerprint, bool]:
        with contextlib.suppress(OSError):  # a FIFO or a device named *.jpg would block or never end
            if not stat.S_ISREG(os.stat(path).st_mode):
                return Fingerprint("unreadable:" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest(),
                                   problem="not a regular file (a pipe, device or socket)"), False
        digest = digest_or_none(path)
        if digest.startswith("unreadable:"):
            return Fingerprint(digest, problem=image_problem(path) or "cannot read the file"), False
        cached = cache.get(digest) if cache else None
        return (cached, False) if cached is not None else (fingerprint(path, digest), True)

    results: list[Fingerprint] = []
    computed = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (item, fresh) in enumerate(pool.map(one, paths), start=1):
            results.append(item)
            computed += fresh
            if progress and (done % 500 == 0 or done == len(paths)):
                progress(done, len(paths))
    if cache is not None:
        cache.put([item for item in results if not item.digest.startswith("unreadable:")])
    return results, computed
