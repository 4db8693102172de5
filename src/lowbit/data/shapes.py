"""A generated image-caption set of coloured shapes, for retrieval with hard negatives.

Every caption pins down kind, colour, size and placement of one or two shapes ("a large red circle on
the left", "a small blue square above a large green triangle"), so neighbouring samples differ by one
attribute or by the order of a relation: exactly the distinctions low-bit models lose first.
Nothing is downloaded; the same seed gives byte-identical images and captions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from lowbit.data.base import DATASETS, ImageTextSet, check_limit, check_split
from lowbit.errors import LowbitError

SHAPE_KINDS: list[str] = ["circle", "square", "triangle", "star"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
# Radius of the shape's bounding circle as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}
# Position phrase of a single shape -> centre (x, y) as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the center": (0.5, 0.5),
}
# Relation phrase "first <relation> second" -> (first centre, second centre).
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "above": ((0.5, 0.27), (0.5, 0.73)),
    "below": ((0.5, 0.73), (0.5, 0.27)),
    "to the left of": ((0.27, 0.5), (0.73, 0.5)),
    "to the right of": ((0.73, 0.5), (0.27, 0.5)),
}
# Zero-shot templates for the shape-kind labels.
TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a simple drawing of a {}.",
    "a {} shape.",
    "a coloured {} on a white background.",
]
SPLITS: dict[str, tuple[int, int]] = {"train": (5000, 1), "test": (1000, 2)}  # split -> (size, seed)

_BACKGROUND = (245, 245, 245)
_SUPERSAMPLE = 4  # draw 4x larger and downsample: smooth edges look more like the photos CLIP knows
_SINGLE_FRACTION = 0.25  # share of one-shape scenes; the rest are two shapes in a relation
_JITTER = 0.03  # random shift of each centre (fraction of the side): shapes never overlap or leave the image
_MAX_TRIES = 50  # draws per sample before accepting a caption that is already used


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind (SHAPE_KINDS), colour (COLOURS) and size (SIZES)."""

    kind: str
    colour: str
    size: str

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """One image: ``first`` placed by a POSITIONS phrase, or ``first`` <RELATIONS phrase> ``second``.

    ``offsets`` are the per-shape centre shifts (fractions of the side); they vary the pixels, not the
    caption.
    """

    first: Shape
    where: str
    second: Shape | None = None
    offsets: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 0.0))

    @property
    def caption(self) -> str:
        if self.second is None:
            return f"a {self.first.describe()} {self.where}"
        return f"a {self.first.describe()} {self.where} a {self.second.describe()}"


def _random_shape(rng: random.Random) -> Shape:
    return Shape(rng.choice(SHAPE_KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))


def _random_scene(rng: random.Random) -> Scene:
    first = _random_shape(rng)
    offsets = tuple((rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)) for _ in range(2))
    if rng.random() < _SINGLE_FRACTION:
        return Scene(first, rng.choice(list(POSITIONS)), None, offsets)
    second = _random_shape(rng)
    while second == first:  # two identical shapes would make "above"/"below" ambiguous
        second = _random_shape(rng)
    return Scene(first, rng.choice(list(RELATIONS)), second, offsets)


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` random scenes from ``seed``; captions are unique while the caption space allows.

    Each sample is redrawn up to 50 times until its caption is new in this list. The space holds about
    9,000 captions, so duplicates only appear for very large ``n``. The first ``k`` scenes of
    ``sample_scenes(n, s)`` equal ``sample_scenes(k, s)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LowbitError(f"number of shape samples must be a non-negative integer; got {n!r}")
    rng = random.Random(seed)
    used: set[str] = set()
    scenes: list[Scene] = []
    for _ in range(n):
        scene = _random_scene(rng)
        for _ in range(_MAX_TRIES - 1):
            if scene.caption not in used:
                break
            scene = _random_scene(rng)
        used.add(scene.caption)
        scenes.append(scene)
    return scenes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        h = 0.8 * r  # a bit larger than inscribed (0.71 r) so a square looks as big as a circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape.kind == "triangle":
        # Equilateral triangle in the bounding circle, lowered by r/4 so it sits visually centred.
        dy = 0.25 * r
        draw.polygon(
            [(cx, cy - r + dy), (cx - 0.866 * r, cy + 0.5 * r + dy), (cx + 0.866 * r, cy + 0.5 * r + dy)],
            fill=fill,
        )
    elif shape.kind == "star":
        # Five points: vertices alternate between the bounding circle and an inner circle, point up.
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = math.pi * (k / 5 - 0.5)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise LowbitError(f"unknown shape kind {shape.kind!r}; choose one of: {', '.join(SHAPE_KINDS)}")


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image on a plain light background."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    if scene.second is None:
        centres = [POSITIONS[scene.where]]
        shapes = [scene.first]
    else:
        centres = list(RELATIONS[scene.where])
        shapes = [scene.first, scene.second]
    for shape, (x, y), (dx, dy) in zip(shapes, centres, scene.offsets, strict=False):
        _draw_shape(draw, shape, (x + dx) * big, (y + dy) * big, SIZES[shape.size] * big)
    # BOX averages each 4x4 block: exact area antialiasing, and deterministic.
    return img.resize((size, size), Image.Resampling.BOX)


def generate_shapes(n: int, seed: int = 0, size: int = 64) -> ImageTextSet:
    """``n`` shape images with compositional captions and shape-kind labels.

    - ``captions[i]`` describes image i; captions are unique up to ~9,000 samples (see
      ``sample_scenes``). If duplicates do occur, retrieval should count any image whose caption is
      identical to the query as a hit.
    - ``labels[i]`` is the kind of the first-named shape (index into ``classnames`` = SHAPE_KINDS).
      Two-shape images also show a second kind, so zero-shot accuracy on them is a relative measure.
    - Same ``seed`` -> byte-identical images and identical captions.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise LowbitError(f"shape image size must be an integer of at least 16 pixels; got {size!r}")
    scenes = sample_scenes(n, seed)
    return ImageTextSet(
        name="shapes",
        images=[render_scene(s, size) for s in scenes],
        labels=[SHAPE_KINDS.index(s.first.kind) for s in scenes],
        classnames=list(SHAPE_KINDS),
        captions=[s.caption for s in scenes],
        templates=list(TEMPLATES),
    )


@DATASETS.register("shapes")
def load_shapes(split: str = "test", limit: int | None = None) -> ImageTextSet:
    """The shapes ``split``: "train" (5000 samples, seed 1) or "test" (1000 samples, seed 2).

    ``limit`` keeps the first ``limit`` samples, which are already a random draw. The two splits come
    from different seeds; a caption can occur in both, with a differently jittered image.
    """
    check_split("shapes", split)
    check_limit(limit)
    n, seed = SPLITS[split]
    return generate_shapes(n if limit is None else min(n, limit), seed=seed)
