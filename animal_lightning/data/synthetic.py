"""Procedural "animal" images written in the Animals-with-Attributes-2 folder layout.

The real AwA2 download is ~13 GB and takes hours to learn, so the demo and the test-suite use this
generator instead: it is deterministic, takes seconds, is learnable by a small CNN on a CPU in minutes,
and still carries what later stages need -- per-class attribute files (zero-shot learning) and object
boxes (Grad-CAM checks).

Each class is one combination of three visual attributes: body shape, coat pattern and body colour.
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bump whenever the pictures or files change, so that datasets cached under the old key are regenerated.
GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("round", "long", "angular", "boxy")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "spots", "patches")
# Colour name -> (body RGB, pattern RGB). Saturated bodies stand out from the muted backgrounds, and the
# pattern colour is dark on light bodies and light on dark ones so stripes and spots stay visible at 64 px.
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((205, 35, 35), (40, 15, 15)),
    "orange": ((240, 135, 20), (45, 25, 10)),
    "yellow": ((240, 215, 40), (50, 40, 10)),
    "green": ((35, 165, 60), (10, 45, 15)),
    "blue": ((35, 75, 215), (235, 240, 250)),
    "purple": ((135, 45, 175), (245, 235, 250)),
}
# Adjectives read better than nouns in class names ("red_striped_round", not "red_stripes_round").
_PATTERN_WORDS = {"solid": "plain", "stripes": "striped", "spots": "spotted", "patches": "patched"}

MARKER = ".complete"  # written last: a folder without it is a half-written leftover and is never used
_JPEG_QUALITY = 90
_OUTLINE = (30, 30, 30)
_MIN_BACKGROUND_DISTANCE = 110.0  # RGB distance kept between background and body so the animal never vanishes

# Separate random streams, so that changing one part (e.g. the test order) never shifts another.
_STREAM_CLASSES, _STREAM_TRAIN, _STREAM_TEST, _STREAM_TEST_ORDER = 1, 2, 3, 4

Combo = tuple[int, int, int]  # indices into (SHAPES, PATTERNS, COLOURS)
RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0 inclusive; x1, y1 exclusive; in pixels of the saved image


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset; two equal specs always give identical files."""

    num_classes: int = 10  # seen classes (have train folders)
    train_per_class: int = 100
    test_per_class: int = 20
    image_size: int = 64
    unseen_classes: int = 0  # extra combinations that appear only in test/, for zero-shot experiments
    seed: int = 0

    def key(self) -> str:
        """Folder name for this spec: readable, and changed by any field or by GENERATOR_VERSION."""
        payload = json.dumps(asdict(self), sort_keys=True) + f"|v{GENERATOR_VERSION}"
        digest = hashlib.sha1(payload.encode()).hexdigest()[:8]
        return (
            f"c{self.num_classes}-n{self.train_per_class}-t{self.test_per_class}-s{self.image_size}"
            f"-u{self.unseen_classes}-seed{self.seed}-{digest}"
        )


def _validate(spec: SyntheticSpec) -> None:
    """Reject specs that could not give a usable dataset, naming the field so a Hydra override is easy to fix.

    This runs in ensure_synthetic_dataset/generate rather than at construction, so that callers can build
    a spec (and its key) first and report the error in their own terms.
    """
    available = len(SHAPES) * len(PATTERNS) * len(COLOURS)
    checks = [
        ("num_classes", spec.num_classes >= 2, ">= 2"),
        ("train_per_class", spec.train_per_class >= 2, ">= 2"),
        ("test_per_class", spec.test_per_class >= 1, ">= 1"),
        ("image_size", spec.image_size >= 16, ">= 16"),
        ("unseen_classes", spec.unseen_classes >= 0, ">= 0"),
        ("seed", spec.seed >= 0, ">= 0"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"SyntheticSpec.{name} must be {rule}, got {getattr(spec, name)}")
    if spec.num_classes + spec.unseen_classes > available:
        raise ValueError(
            f"SyntheticSpec.num_classes + unseen_classes = {spec.num_classes + spec.unseen_classes} exceeds "
            f"the {available} attribute combinations available"
        )


def ensure_synthetic_dataset(parent: str | os.PathLike[str], spec: SyntheticSpec) -> Path:
    """Return parent/<spec.key()>, generating it first if it is not there yet.

    Generation happens in a private temporary sibling that is renamed into place only once complete, so that a
    killed run or a concurrent process can never expose a half-written dataset.
    """
    _validate(spec)
    parent = Path(parent)
    final = parent / spec.key()
    if (final / MARKER).is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{spec.key()}.tmp-{os.getpid()}"
    # Only ever our own pid's leftover is removed: other pids' folders may still be being written.
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp, spec)
        (tmp / MARKER).write_text(f"{spec.key()}\ngenerator_version={GENERATOR_VERSION}\n")
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def generate(root: Path, spec: SyntheticSpec) -> None:
    """Write the whole dataset under root (which must be missing or empty); see README.txt for the layout."""
    _validate(spec)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"refusing to generate into non-empty folder {root}")
    seen, unseen = _choose_classes(spec)
    classes = seen + unseen
    _write_attributes(root / "attributes", classes, unseen)
    _write_train(root / "train", seen, spec)
    _write_test(root, classes, spec)
    _write_readme(root, spec, len(seen), len(unseen))


# --------------------------------------------------------------------------------------------------- classes


def _class_name(combo: Combo) -> str:
    shape, pattern, colour = combo
    return f"{list(COLOURS)[colour]}_{_PATTERN_WORDS[PATTERNS[pattern]]}_{SHAPES[shape]}"


def _choose_classes(spec: SyntheticSpec) -> tuple[list[Combo], list[Combo]]:
    """Pick seen and unseen combinations that differ from each other in as many attributes as possible.

    Classes differing in one attribute only (e.g. just the pattern) are much harder to learn at 64 px, so
    combos are picked greedily by their minimum Hamming distance to those already picked; ties go to the
    combo using the least-used attribute values (so every value gets examples, which zero-shot learning
    needs) and then to the seeded shuffle order. Each list is sorted by class name because the project
    orders classes that way.
    """
    combos = list(itertools.product(range(len(SHAPES)), range(len(PATTERNS)), range(len(COLOURS))))
    order = np.random.default_rng([spec.seed, _STREAM_CLASSES]).permutation(len(combos))
    pool = np.array([combos[i] for i in order])
    picked = [0]
    for _ in range(spec.num_classes + spec.unseen_classes - 1):
        distances = (pool[:, None, :] != pool[picked][None, :, :]).sum(axis=2)
        score = distances.min(axis=1) * 10_000 + distances.sum(axis=1)
        score[picked] = -1
        picked.append(int(np.argmax(score)))  # the first best, i.e. the earliest in the shuffle
    chosen: list[Combo] = [tuple(int(v) for v in pool[i]) for i in picked]  # type: ignore[misc]
    # Unseen classes are the last picks, so they are still well separated from every seen class.
    seen, unseen = chosen[: spec.num_classes], chosen[spec.num_classes :]
    return sorted(seen, key=_class_name), sorted(unseen, key=_class_name)


def _predicates() -> list[str]:
    return (
        [f"shape_{s}" for s in SHAPES] + [f"pattern_{p}" for p in PATTERNS] + [f"colour_{c}" for c in COLOURS]
    )


def _one_hot(combo: Combo) -> list[int]:
    shape, pattern, colour = combo
    row = [0] * (len(SHAPES) + len(PATTERNS) + len(COLOURS))
    for index in (shape, len(SHAPES) + pattern, len(SHAPES) + len(PATTERNS) + colour):
        row[index] = 1
    return row


# ---------------------------------------------------------------------------------------------------- files


def _write_attributes(folder: Path, classes: list[Combo], unseen: list[Combo]) -> None:
    """Write the AwA2-format attribute files, so zero-shot code written for AwA2 reads them unchanged."""
    folder.mkdir(parents=True)
    lines = [f"{i}\t{_class_name(c)}" for i, c in enumerate(classes, start=1)]
    (folder / "classes.txt").write_text("\n".join(lines) + "\n")
    lines = [f"{i}\t{p}" for i, p in enumerate(_predicates(), start=1)]
    (folder / "predicates.txt").write_text("\n".join(lines) + "\n")
    rows = [_one_hot(c) for c in classes]
    (folder / "predicate-matrix-binary.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    continuous = "".join(" ".join(f"{100.0 * v:.2f}" for v in r) + "\n" for r in rows)
    (folder / "predicate-matrix-continuous.txt").write_text(continuous)
    (folder / "unseen.txt").write_text("".join(_class_name(c) + "\n" for c in unseen))


def _write_train(folder: Path, seen: list[Combo], spec: SyntheticSpec) -> None:
    digits = max(4, len(str(spec.train_per_class - 1)))
    for combo in seen:
        name = _class_name(combo)
        (folder / name).mkdir(parents=True)
        for i in range(spec.train_per_class):
            # Seeded by the combo, not the class position, so adding classes keeps existing images.
            rng = np.random.default_rng([spec.seed, _STREAM_TRAIN, *combo, i])
            image, _ = _render(rng, combo, spec.image_size)
            _save_jpeg(image, folder / name / f"{name}_{i:0{digits}d}.jpg")


def _write_test(root: Path, classes: list[Combo], spec: SyntheticSpec) -> None:
    """Write a flat, shuffled, unlabelled test folder plus labels and boxes, like a competition test set."""
    folder = root / "test"
    folder.mkdir(parents=True)
    items = [(combo, i) for combo in classes for i in range(spec.test_per_class)]
    order = np.random.default_rng([spec.seed, _STREAM_TEST_ORDER]).permutation(len(items))
    digits = max(4, len(str(len(items) - 1)))
    with open(root / "test_labels.csv", "w", newline="") as labels:
        writer = csv.writer(labels, lineterminator="\n")
        writer.writerow(["image_id", "class", "x0", "y0", "x1", "y1"])
        for position, item_index in enumerate(order):
            combo, i = items[item_index]
            rng = np.random.default_rng([spec.seed, _STREAM_TEST, *combo, i])
            image, box = _render(rng, combo, spec.image_size)
            image_id = f"{position:0{digits}d}.jpg"
            _save_jpeg(image, folder / image_id)
            writer.writerow([image_id, _class_name(combo), *box])


def _write_readme(root: Path, spec: SyntheticSpec, n_seen: int, n_unseen: int) -> None:
    text = f"""Synthetic "animals with attributes" dataset, generated by animal_lightning.data.synthetic.
It stands in for AwA2 in demos and tests: small, deterministic and quick to learn.

spec: {json.dumps(asdict(spec), sort_keys=True)}
key: {spec.key()}
generator_version: {GENERATOR_VERSION}

Each class is a combination of body shape ({", ".join(SHAPES)}), coat pattern ({", ".join(PATTERNS)})
and body colour ({", ".join(COLOURS)}); its name is colour_pattern_shape.

train/<class>/<class>_NNNN.jpg   {spec.train_per_class} images for each of the {n_seen} seen classes
test/NNNN.jpg                    {spec.test_per_class} images for each of the {n_seen + n_unseen} classes
                                 ({n_unseen} of them unseen), shuffled and unlabelled
test_labels.csv                  image_id,class,x0,y0,x1,y1 -- box in pixels of the saved image,
                                 x0,y0 inclusive and x1,y1 exclusive (PIL getbbox convention)
attributes/                      AwA2-format classes.txt, predicates.txt, predicate-matrix-*.txt, and
                                 unseen.txt (unseen classes have no train folder: for zero-shot work)
{MARKER}                        written last; a folder without it is incomplete
"""
    (root / "README.txt").write_text(text)


def _save_jpeg(image: Image.Image, path: Path) -> None:
    # 4:4:4 chroma keeps the colour of thin stripes and small spots at 64 px.
    image.save(path, "JPEG", quality=_JPEG_QUALITY, subsampling=0)


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists() and not (final / MARKER).is_file():
        # An incomplete folder (from a killed run or an older version) is never trusted. Renaming it away
        # first frees the slot at once, even if deleting it takes a while.
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            pass  # another process cleared it first
        else:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MARKER).is_file():
            raise
        # Another process finished the same dataset first; its files are identical, so ours are discarded.


# -------------------------------------------------------------------------------------------------- drawing


def _render(rng: np.random.Generator, combo: Combo, size: int) -> tuple[Image.Image, Box]:
    """Draw one animal of the given combo on a random background; return the image and the animal's box.

    Drawing happens at twice the size and is then averaged down, which anti-aliases edges almost for free.
    """
    big = 2 * size
    shape, pattern, colour = combo
    body_rgb, pattern_rgb = (_jitter(rng, c) for c in COLOURS[list(COLOURS)[colour]])
    canvas = Image.fromarray(_background(rng, big, COLOURS[list(COLOURS)[colour]][0]))

    length = rng.uniform(0.30, 0.60) * big  # head-to-tail extent: 30-60% of the image width before rotation
    rgb, mask = _draw_animal(rng, SHAPES[shape], PATTERNS[pattern], body_rgb, pattern_rgb, length)
    if rng.random() < 0.5:  # face left or right
        rgb, mask = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in (rgb, mask))
    angle = rng.uniform(-35.0, 35.0)  # animals stay roughly upright, as in photos
    rgb = rgb.rotate(angle, Image.Resampling.BILINEAR, expand=True, fillcolor=_OUTLINE)
    mask = mask.rotate(angle, Image.Resampling.BILINEAR, expand=True)
    if max(mask.size) > big:  # cannot happen with the proportions above, but never crop an animal
        rgb, mask = (im.resize((min(im.width, big), min(im.height, big))) for im in (rgb, mask))
    x = int(rng.integers(0, big - mask.width + 1))
    y = int(rng.integers(0, big - mask.height + 1))
    canvas.paste(rgb, (x, y), mask)

    x0, y0, x1, y1 = mask.getbbox() or (0, 0, mask.width, mask.height)
    # Floor the start and ceil the end, so that the box in saved pixels still holds the whole animal.
    box = ((x + x0) // 2, (y + y0) // 2, -(-(x + x1) // 2), -(-(y + y1) // 2))

    small = np.asarray(canvas.reduce(2), dtype=np.float32)
    # Sensor-like noise after downsampling, so that it is not averaged away.
    small += rng.normal(0.0, rng.uniform(2.0, 5.0), small.shape).astype(np.float32)
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8)), box


def _jitter(rng: np.random.Generator, rgb: RGB, amount: int = 12) -> RGB:
    """Vary a class colour a little per image, so that the model learns a colour range, not a value."""
    r, g, b = (int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)
    return r, g, b


def _background(rng: np.random.Generator, size: int, avoid: RGB) -> np.ndarray:
    """A smooth gradient or a soft two-tone split (horizon-like) in muted colours far from the body colour."""
    start, end = _background_colours(rng, np.array(avoid, dtype=np.float32))
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    theta = rng.uniform(0.0, 2.0 * np.pi)
    along = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
    along = (along - along.min()) / (along.max() - along.min())
    # Half the images get a soft two-tone step rather than a hard one: a hard edge could pass for an animal.
    two_tone = rng.random() < 0.5
    mix = 1.0 / (1.0 + np.exp(-(along - rng.uniform(0.3, 0.7)) / 0.03)) if two_tone else along
    image = start[None, None, :] * (1.0 - mix[..., None]) + end[None, None, :] * mix[..., None]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _background_colours(rng: np.random.Generator, avoid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two muted colours whose whole blend stays far from the body colour (checked on the segment between)."""
    for _ in range(100):
        start, end = _muted_colour(rng), _muted_colour(rng)
        if _segment_distance(avoid, start, end) >= _MIN_BACKGROUND_DISTANCE:
            return start, end
    grey = np.array([128.0, 128.0, 128.0], dtype=np.float32)  # far from every saturated palette colour
    return grey, grey


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.35), rng.uniform(0.40, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255.0


def _segment_distance(point: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(point - a, ab) / max(float(np.dot(ab, ab)), 1e-6), 0.0, 1.0))
    return float(np.linalg.norm(point - (a + t * ab)))


class _Layer:
    """An RGB picture plus its coverage mask, drawn together so the mask is exact (it gives the box)."""

    def __init__(self, size: int) -> None:
        self.rgb = Image.new("RGB", (size, size), _OUTLINE)  # dark fill: rotation fringes read as an outline
        self.mask = Image.new("L", (size, size), 0)
        self._rgb_draw, self._mask_draw = ImageDraw.Draw(self.rgb), ImageDraw.Draw(self.mask)

    def ellipse(self, centre: tuple[float, float], rx: float, ry: float, fill: RGB) -> None:
        xy = (centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry)
        self._rgb_draw.ellipse(xy, fill=fill)
        self._mask_draw.ellipse(xy, fill=255)

    def polygon(self, points: list[tuple[float, float]], fill: RGB) -> None:
        self._rgb_draw.polygon(points, fill=fill)
        self._mask_draw.polygon(points, fill=255)

    def line(self, points: list[tuple[float, float]], width: int, fill: RGB) -> None:
        self._rgb_draw.line(points, fill=fill, width=width, joint="curve")
        self._mask_draw.line(points, fill=255, width=width, joint="curve")


# Body width and height as fractions of the animal's length; chosen so the shapes stay distinct when rotated.
_BODY_SIZE = {"round": (0.46, 0.40), "long": (0.68, 0.21), "angular": (0.56, 0.44), "boxy": (0.54, 0.32)}


def _body_outline(shape: str, cx: float, cy: float, bw: float, bh: float) -> list[tuple[float, float]] | None:
    """Polygon for the angular and boxy bodies; None means an ellipse."""
    if shape == "angular":  # a humped triangle: flat belly, pointed back
        return [(cx - bw / 2, cy + bh / 2), (cx + bw / 2, cy + bh / 2), (cx + 0.15 * bw, cy - bh / 2)]
    if shape == "boxy":
        return [
            (cx - bw / 2, cy - bh / 2),
            (cx + bw / 2, cy - bh / 2),
            (cx + bw / 2, cy + bh / 2),
            (cx - bw / 2, cy + bh / 2),
        ]
    return None


def _draw_animal(
    rng: np.random.Generator, shape: str, pattern: str, body_rgb: RGB, pattern_rgb: RGB, length: float
) -> tuple[Image.Image, Image.Image]:
    """Draw one animal facing right and return (rgb, mask), cropped to the animal."""
    size = int(1.5 * length) + 8
    layer = _Layer(size)
    limb_rgb: RGB = tuple(int(v * 0.65) for v in body_rgb)  # type: ignore[assignment]
    bw, bh = (f * length * rng.uniform(0.9, 1.1) for f in _BODY_SIZE[shape])
    cx, cy = size / 2 - 0.08 * length, size / 2 - 0.05 * length
    head_r = 0.12 * length * rng.uniform(0.9, 1.1)
    hx, hy = cx + bw / 2 + 0.2 * head_r, cy - 0.35 * bh

    # Limbs and neck first, so the body covers where they join it.
    leg_len, leg_w = 0.17 * length * rng.uniform(0.85, 1.15), max(2, round(0.055 * length))
    for f in (-0.34, -0.2, 0.2, 0.34):
        foot_x = cx + f * bw + rng.uniform(-0.02, 0.02) * length
        layer.line([(cx + f * bw, cy), (foot_x, cy + bh / 2 + leg_len)], leg_w, limb_rgb)
    tail_root = (cx - 0.45 * bw, cy - 0.1 * bh)
    tail_tip = (cx - bw / 2 - 0.16 * length, tail_root[1] - 0.12 * length * rng.uniform(-0.5, 1.0))
    layer.line([tail_root, tail_tip], max(2, round(0.035 * length)), limb_rgb)
    layer.line([(cx + 0.3 * bw, cy - 0.1 * bh), (hx, hy)], max(2, round(1.1 * head_r)), body_rgb)

    _draw_body(layer, rng, shape, pattern, (cx, cy, bw, bh), body_rgb, pattern_rgb, length)

    # Head on top: ear, skull, eye.
    layer.polygon(
        [
            (hx - 0.7 * head_r, hy - 0.4 * head_r),
            (hx - 0.05 * head_r, hy - 0.6 * head_r),
            (hx - 0.5 * head_r, hy - 1.5 * head_r),
        ],
        limb_rgb,
    )
    layer.ellipse((hx, hy), head_r, head_r, body_rgb)
    eye_r, ex, ey = max(1.0, 0.18 * head_r), hx + 0.35 * head_r, hy - 0.2 * head_r
    ImageDraw.Draw(layer.rgb).ellipse((ex - eye_r, ey - eye_r, ex + eye_r, ey + eye_r), fill=(10, 10, 10))

    bbox = layer.mask.getbbox()
    return layer.rgb.crop(bbox), layer.mask.crop(bbox)


def _draw_body(
    layer: _Layer,
    rng: np.random.Generator,
    shape: str,
    pattern: str,
    geometry: tuple[float, float, float, float],
    body_rgb: RGB,
    pattern_rgb: RGB,
    length: float,
) -> None:
    """Fill the body with its coat pattern, clipped to the body's outline, then draw a thin outline."""
    cx, cy, bw, bh = geometry
    polygon = _body_outline(shape, cx, cy, bw, bh)
    ellipse_xy = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    body_mask = Image.new("L", layer.mask.size, 0)
    body_draw = ImageDraw.Draw(body_mask)
    if polygon is None:
        body_draw.ellipse(ellipse_xy, fill=255)
    else:
        body_draw.polygon(polygon, fill=255)

    coat = Image.new("RGB", layer.mask.size, body_rgb)
    # Drawing is at 2x: a repeat of at least 8 px keeps stripes and spots >= 2 px wide in the saved image,
    # where JPEG and downsampling would otherwise erase them.
    scale = max(0.14 * length, 8.0)
    _draw_pattern(ImageDraw.Draw(coat), rng, pattern, ellipse_xy, scale, pattern_rgb)
    layer.rgb.paste(coat, (0, 0), body_mask)
    layer.mask.paste(255, (0, 0), body_mask)

    outline_w = max(1, round(length / 40))
    draw = ImageDraw.Draw(layer.rgb)
    if polygon is None:
        draw.ellipse(ellipse_xy, outline=_OUTLINE, width=outline_w)
    else:
        draw.polygon(polygon, outline=_OUTLINE, width=outline_w)


def _draw_pattern(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    pattern: str,
    box: tuple[float, float, float, float],
    scale: float,
    colour: RGB,
) -> None:
    """Draw the coat pattern over the body's bounding box; the caller clips it to the body."""
    x0, y0, x1, y1 = box
    if pattern == "stripes":  # bands across the body, slightly slanted, like a tiger or zebra
        slant = rng.uniform(-0.3, 0.3) * (y1 - y0)
        x = x0 - abs(slant) - rng.uniform(0.0, scale)
        while x < x1 + abs(slant):
            draw.line([(x, y0), (x + slant, y1)], fill=colour, width=max(2, round(0.5 * scale)))
            x += scale
    elif pattern == "spots":  # a jittered grid gives even coverage without clumps or bare bodies
        radius, step = 0.3 * scale, 1.15 * scale
        for gx in np.arange(x0 - rng.uniform(0, step), x1 + step, step):
            for gy in np.arange(y0 - rng.uniform(0, step), y1 + step, step):
                sx, sy = gx + rng.uniform(-0.2, 0.2) * step, gy + rng.uniform(-0.2, 0.2) * step
                draw.ellipse((sx - radius, sy - radius, sx + radius, sy + radius), fill=colour)
    elif pattern == "patches":  # a few large irregular blobs, like a cow or a giraffe
        w, h = x1 - x0, y1 - y0
        for _ in range(int(rng.integers(2, 4))):
            px, py = x0 + rng.uniform(0.15, 0.85) * w, y0 + rng.uniform(0.2, 0.8) * h
            for _ in range(3):  # overlapping ellipses make an irregular outline
                ox, oy = rng.uniform(-0.1, 0.1) * w, rng.uniform(-0.15, 0.15) * h
                rx, ry = rng.uniform(0.12, 0.2) * w, rng.uniform(0.2, 0.35) * h
                draw.ellipse((px + ox - rx, py + oy - ry, px + ox + rx, py + oy + ry), fill=colour)
