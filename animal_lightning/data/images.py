"""Decoding photos robustly: any PIL mode to RGB, EXIF orientation applied, bad files reported not raised.

Real folders hold palette PNGs, 16-bit greyscale scans, CMYK JPEGs from print archives, phone photos
that rely on the EXIF orientation tag, and files that were cut short by an interrupted copy. Every
one of them must become a plain 8-bit RGB image or a one-line reason why not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def is_image_name(name: str) -> bool:
    """True for a visible file whose extension (any case) is one we decode."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an upright 8-bit RGB copy of `image`, whatever its mode."""
    with contextlib.suppress(Exception):  # a malformed EXIF block must not cost us the pixels
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
        # High bit-depth greyscale: PIL's convert() would clip to 255; rescale the range instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Transparent pixels carry arbitrary colours; show them on white like an image viewer does.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _refuse_bombs(image: Image.Image) -> Image.Image:
    """PIL refuses images over twice MAX_IMAGE_PIXELS (89 megapixels) when opening them, but only warns
    between that and the limit, and would decode such a file into gigabytes. Refuse from the header,
    before decoding (an explicit check: warning filters are process-wide and the scan uses threads)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise Image.DecompressionBombError(f"image of {image.width} x {image.height} pixels is over the "
                                           f"{limit:,}-pixel limit (a decompression bomb?)")
    return image


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully into RGB; raises OSError/ValueError (from PIL) for unusable files, and
    DecompressionBombError for images of more than 89 megapixels."""
    with Image.open(path) as image:
        _refuse_bombs(image).load()
        return to_rgb(image)


def image_problem(path: str | os.PathLike) -> str | None:
    """Return why `path` cannot be used as an image, or None when it decodes.

    JPEGs are decoded in draft mode (DCT scaling to about 1/8 size), which still reads the whole
    entropy-coded stream and so catches truncation, at a fraction of a full decode's cost.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            _refuse_bombs(image)
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            if image.width < 1 or image.height < 1:
                return "image has no pixels"
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(error).__name__}: {error}".strip()
    return None


def find_bad_images(paths: Iterable[str | os.PathLike], workers: int | None = None) -> dict[str, str]:
    """Check many files in parallel threads (PIL releases the GIL while decoding): path -> reason."""
    paths = [str(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = pool.map(image_problem, paths, chunksize=64)
        return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason is not None}


def list_images(folder: Path) -> list[Path]:
    """All decodable-looking files below `folder`, sorted, skipping hidden files and folders.

    Symlinked folders are not followed, so a link loop cannot hang the scan.
    """
    found: list[Path] = []
    for current, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(current) / name for name in files if is_image_name(name))
    return sorted(found)
