"""The free-form shapes world's held-out set, written apart from the training generator
(`vlmkit.demo.freeform`) so that a model cannot pass it by learning one drawing routine: its own shape
outlines and colours, its own rasteriser (numpy, supersampled edges; strokes anti-aliased by their distance
to each pixel), its own placement (first fit over a shuffled lattice, tested on pixel masks), and its own
hand-drawn visual prompts. It shares nothing with the training side but the question types and their
answers; it imports neither PIL.ImageDraw nor `vlmkit.visual_prompts`.

    python -m vlmkit.demo.heldout OUT_DIR --per-type 200 --family vipllava   # questions as JSONL + PNGs
    python -m vlmkit.demo.heldout --handmade   # redraw the free-form hand-made scenes (examples/)
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = ("zero", "one", "two", "three", "four")
# each shape colour as hue (degrees), saturation and value, and how far a shade strays from it
HSV = {
    "red": (0.0, 0.86, 0.86),
    "green": (133.0, 0.82, 0.67),
    "blue": (230.0, 0.82, 0.86),
    "yellow": (51.0, 0.87, 0.92),
    "purple": (285.0, 0.71, 0.67),
    "orange": (29.0, 0.92, 0.96),
}
HUE_SPREAD, SV_SPREAD = 4.0, 0.06
# the ViP-LLaVA release's prompt colours, by name
PALETTE = {
    "red": (255, 0, 0),
    "lime": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "fuchsia": (255, 0, 255),
    "aqua": (0, 255, 255),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "gold": (255, 215, 0),
}
SHOWS_ON = {  # the palette colours a person would pick to mark a shape of each colour (not its own)
    "red": ("lime", "blue", "yellow", "fuchsia", "aqua", "orange", "purple", "gold"),
    "green": ("red", "blue", "yellow", "fuchsia", "aqua", "orange", "purple", "gold"),
    "blue": ("red", "lime", "yellow", "fuchsia", "aqua", "orange", "purple", "gold"),
    "yellow": ("red", "lime", "blue", "fuchsia", "aqua", "orange", "purple"),
    "purple": ("red", "lime", "blue", "yellow", "fuchsia", "aqua", "orange", "gold"),
    "orange": ("red", "lime", "blue", "yellow", "fuchsia", "aqua", "purple"),
}
QUESTION_TYPES = {
    "vipllava": ("box_shape", "arrow_color", "count", "caption"),
    "idefics": ("count", "caption", "which_image"),
}
QUESTIONS = {
    "rectangle": "What shape is inside the {} rectangle?",
    "ellipse": "What shape is inside the {} ellipse?",
    "scribble": "What shape is the {} scribble on?",
    "point": "What shape is the {} point on?",
    "arrow": "What color is the shape the arrow points to?",
    "count": "How many {}s are there?",
    "caption": "Describe the image.",
    "which_image": "Which image has a {}, the first or the second?",
}
PER_TYPE = 200
SUPERSAMPLE = 3  # samples per pixel side when filling a shape
EXAMPLES = Path(__file__).parent / "examples"
HANDMADE = EXAMPLES / "freeform.json"


@dataclass(frozen=True, eq=False)  # compared by identity: a scene may hold two equal shapes
class Item:
    """A shape on the canvas: its corners (a circle: none, it has a centre and radius), its colour name
    and the shade it is painted in."""

    kind: str
    color: str
    paint: tuple[int, int, int]
    corners: np.ndarray  # (k, 2) picture pixels; empty for a circle
    centre: tuple[float, float]
    radius: float = 0.0  # circles only

    def bounds(self) -> tuple[float, float, float, float]:
        if self.kind == "circle":
            x, y = self.centre
            return x - self.radius, y - self.radius, x + self.radius, y + self.radius
        return (*self.corners.min(0).tolist(), *self.corners.max(0).tolist())  # type: ignore[return-value]

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether each sample point lies inside the shape (xs and ys broadcast together)."""
        xs, ys = np.broadcast_arrays(xs, ys)
        if self.kind == "circle":
            return (xs - self.centre[0]) ** 2 + (ys - self.centre[1]) ** 2 <= self.radius**2
        hits = np.zeros(xs.shape, dtype=bool)
        k = len(self.corners)
        for i in range(k):  # crossing parity of a ray to the right
            (ax, ay), (bx, by) = self.corners[i], self.corners[(i + 1) % k]
            if ay == by:
                continue
            straddles = (ay <= ys) != (by <= ys)
            at = ax + (ys - ay) * (bx - ax) / (by - ay)
            hits ^= straddles & (xs < at)
        return hits

    def edge_distance(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Distance from each point to the shape's boundary."""
        if self.kind == "circle":
            return np.abs(np.hypot(xs - self.centre[0], ys - self.centre[1]) - self.radius)
        best = np.full(xs.shape, np.inf)
        k = len(self.corners)
        for i in range(k):
            best = np.minimum(best, segment_distance(xs, ys, self.corners[i], self.corners[(i + 1) % k]))
        return best

    def distance(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Distance from each point to the shape (0 inside)."""
        return np.where(self.contains(xs, ys), 0.0, self.edge_distance(xs, ys))


@dataclass(frozen=True, eq=False)
class Canvas:
    width: int
    height: int
    items: tuple[Item, ...]
    paper: np.ndarray  # (height, width, 3) float: the background before the shapes


@dataclass(frozen=True)
class HeldOutExample:
    images: list[Image.Image]
    question: str
    answer: str
    kind: str
    canvases: tuple[Canvas, ...]
    marks: tuple[dict[str, Any], ...] = ()  # what was drawn on the first picture, in picture pixels
    target: Item | None = None


def segment_distance(xs: np.ndarray, ys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((xs - a[0]) * dx + (ys - a[1]) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(xs - (a[0] + t * dx), ys - (a[1] + t * dy))


# -- shapes ----------------------------------------------------------------------------------------------


def paint(rng: random.Random, color: str) -> tuple[int, int, int]:
    h, s, v = HSV[color]
    h = (h + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 360
    s = min(1.0, max(0.0, s + rng.uniform(-SV_SPREAD, SV_SPREAD)))
    v = min(1.0, max(0.0, v + rng.uniform(-SV_SPREAD, SV_SPREAD)))
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h / 360, s, v))  # type: ignore[return-value]


def corners_of(rng: random.Random, kind: str, extent: float) -> np.ndarray:
    """Corners of a shape `extent` across (the longest distance between two of its corners), centred on
    its corners' mean, before moving it into place."""
    turn = rng.uniform(0, 2 * math.pi)
    if kind == "square":
        half = extent / (2 * math.sqrt(2))  # the diagonal spans the extent
        points = np.asarray([[-half, -half], [half, -half], [half, half], [-half, half]])
    elif kind == "triangle":
        while True:  # three corners in a unit square, every angle 30 degrees or more
            points = np.asarray([[rng.random(), rng.random()] for _ in range(3)])
            sides = [np.linalg.norm(points[i] - points[(i + 1) % 3]) for i in range(3)]
            if min(sides) < 1e-3:
                continue
            angles = [
                math.acos(
                    np.clip(
                        (sides[i] ** 2 + sides[(i + 2) % 3] ** 2 - sides[(i + 1) % 3] ** 2)
                        / (2 * sides[i] * sides[(i + 2) % 3]),
                        -1,
                        1,
                    )
                )
                for i in range(3)
            ]
            if min(angles) >= math.radians(30):
                break
        points = (points - points.mean(0)) * extent / max(sides)
    elif kind == "star":
        thin = rng.uniform(0.38, 0.6)
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, thin) * extent / (2 * math.sin(2 * math.pi / 5))
        points = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)  # tip to far tip spans the extent
    else:
        raise ValueError(kind)
    c, s = math.cos(turn), math.sin(turn)
    return points @ np.asarray([[c, s], [-s, c]])


def make_item(rng: random.Random, kind: str, color: str, x: float, y: float, extent: float) -> Item:
    if kind == "circle":
        return Item(kind, color, paint(rng, color), np.zeros((0, 2)), (x, y), extent / 2)
    corners = corners_of(rng, kind, extent) + (x, y)
    return Item(kind, color, paint(rng, color), corners, (x, y))


def footprint(item: Item, grow: float, width: int, height: int) -> tuple[slice, slice, np.ndarray]:
    """The pixels within `grow` of the shape, as (rows, columns, mask) of the picture."""
    x0, y0, x1, y1 = item.bounds()
    c0, r0 = max(0, int(x0 - grow) - 1), max(0, int(y0 - grow) - 1)
    c1, r1 = min(width, int(x1 + grow) + 2), min(height, int(y1 + grow) + 2)
    ys, xs = np.mgrid[r0:r1, c0:c1] + 0.5
    return slice(r0, r1), slice(c0, c1), item.distance(xs, ys) <= grow


def place(
    rng: random.Random, width: int, height: int, kinds: list[str], colors: list[str] | None = None
) -> tuple[Item, ...]:
    """Each kind (in order) at the first free spot of a shuffled, jittered lattice: a spot is free when the
    shape, grown by the gap, covers no pixel of a shape already there. Sizes are log-uniform between about 8%
    of the longer side and 35% of the shorter."""
    short, long = min(width, height), max(width, height)
    low, high = max(10.0, 0.08 * long), max(10.0, 0.35 * short)
    gap = max(2.0, 0.02 * short)
    for _ in range(30):
        taken = np.zeros((height, width), dtype=bool)
        items: list[Item] = []
        for i, kind in enumerate(kinds):
            color = colors[i] if colors else rng.choice(list(HSV))
            extent = math.exp(rng.uniform(math.log(low), math.log(high)))
            found = None
            for _shrink in range(4):
                edge = extent / 2 + gap
                step = max(3.0, extent / 5)
                spots = [
                    (x + rng.uniform(0, step), y + rng.uniform(0, step))
                    for y in np.arange(edge, height - edge - step + 1e-9, step)
                    for x in np.arange(edge, width - edge - step + 1e-9, step)
                ]
                rng.shuffle(spots)
                for x, y in spots[:150]:
                    item = make_item(rng, kind, color, float(x), float(y), extent)
                    rows, cols, mask = footprint(item, gap, width, height)
                    if not (taken[rows, cols] & mask).any():
                        found = item
                        break
                if found is not None:
                    break
                extent = max(low, extent * 0.8)
            if found is None:
                break
            rows, cols, mask = footprint(found, 0.0, width, height)
            taken[rows, cols] |= mask
            items.append(found)
        if len(items) == len(kinds):
            return tuple(items)
    raise RuntimeError(f"no room for {len(kinds)} shapes on {width}x{height}")


def canvas_size(rng: random.Random) -> tuple[int, int]:
    """Sides of 96 to 512 px; a third square, the rest up to 2:1 either way."""
    if rng.random() < 1 / 3:
        side = int(math.exp(rng.uniform(math.log(96), math.log(512))))
        return side, side
    long = rng.randint(120, 512)
    short = rng.randint(max(96, math.ceil(long / 2)), max(96, long - 8))
    return (long, short) if rng.random() < 0.5 else (short, long)


def paper(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A light background: white, off-white or a pale tint, sometimes with a soft gradient or grain."""
    h, s, v = rng.random(), rng.choice((0.0, rng.uniform(0.02, 0.1))), rng.uniform(0.92, 1.0)
    base = np.asarray(colorsys.hsv_to_rgb(h, s, v)) * 255
    out = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.3:  # light falling across the page
        ramp = np.linspace(-1, 1, width if rng.random() < 0.5 else height)
        ramp = ramp[None, :, None] if len(ramp) == width else ramp[:, None, None]
        out = out + ramp * rng.uniform(3, 10)
    if rng.random() < 0.35:
        grain = np.random.default_rng(rng.randrange(2**32)).uniform(-1, 1, (height, width, 1))
        out = out + grain * rng.uniform(3, 10)
    return np.clip(out, 0, 255)


def canvas(rng: random.Random, kinds: list[str], size: tuple[int, int] | None = None) -> Canvas:
    width, height = size or canvas_size(rng)
    return Canvas(width, height, place(rng, width, height, kinds), paper(rng, width, height))


# -- drawing -------------------------------------------------------------------------------------------


def fill(pixels: np.ndarray, item: Item, color: tuple[int, ...]) -> None:
    """Paint the shape into pixels (H, W, 3 float) with supersampled edges."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = item.bounds()
    c0, r0, c1, r1 = max(0, int(x0)), max(0, int(y0)), min(width, int(x1) + 1), min(height, int(y1) + 1)
    if c1 <= c0 or r1 <= r0:
        return
    k = SUPERSAMPLE
    offsets = (np.arange(k) + 0.5) / k
    ys = (np.arange(r0, r1)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(c0, c1)[:, None] + offsets[None, :]).reshape(-1)
    inside = item.contains(xs[None, :], ys[:, None])  # (rows * k, cols * k)
    cover = inside.reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))[..., None]
    region = pixels[r0:r1, c0:c1]
    region[:] = region * (1 - cover) + np.asarray(color, dtype=np.float32) * cover


def stroke(pixels: np.ndarray, path: np.ndarray, width: float, color: tuple[int, ...]) -> None:
    """A pen line along path (n, 2): a pixel is covered by how far inside the pen's half-width it is."""
    height, w = pixels.shape[:2]
    reach = width / 2 + 1
    (x0, y0), (x1, y1) = path.min(0) - reach, path.max(0) + reach
    c0, r0, c1, r1 = max(0, int(x0)), max(0, int(y0)), min(w, int(x1) + 1), min(height, int(y1) + 1)
    if c1 <= c0 or r1 <= r0:
        return
    ys, xs = np.mgrid[r0:r1, c0:c1] + 0.5
    near = np.full(xs.shape, np.inf)
    for a, b in zip(path[:-1], path[1:], strict=True):
        near = np.minimum(near, segment_distance(xs, ys, a, b))
    cover = np.clip(width / 2 + 0.5 - near, 0, 1)[..., None]
    region = pixels[r0:r1, c0:c1]
    region[:] = region * (1 - cover) + np.asarray(color, dtype=np.float32) * cover


def pen_width(width: int, height: int) -> int:
    """The default stroke of a visual prompt: about 1% of the shorter side, at least 2 px."""
    return max(2, round(min(width, height) / 100))


def draw_mark(pixels: np.ndarray, mark: dict[str, Any], rng: random.Random) -> None:
    """A visual prompt drawn as a hand would: boxes with uneven sides and overshooting corners, ellipses
    that do not quite close, arrows with a filled head."""
    height, width = pixels.shape[:2]
    pen = pen_width(width, height)
    color = PALETTE[mark["color"]]
    wobble = pen * 0.6
    if mark["type"] == "rectangle":
        x0, y0, x1, y1 = mark["box"]
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        for i in range(4):
            a, b = np.asarray(corners[i], float), np.asarray(corners[(i + 1) % 4], float)
            run = (b - a) / max(np.linalg.norm(b - a), 1e-9)
            a = a - run * rng.uniform(0, pen) + [rng.uniform(-wobble, wobble) for _ in range(2)]
            b = b + run * rng.uniform(0, pen) + [rng.uniform(-wobble, wobble) for _ in range(2)]
            stroke(pixels, np.clip(np.stack([a, b]), 0, [width, height]), pen, color)
    elif mark["type"] == "ellipse":
        x0, y0, x1, y1 = mark["box"]
        start = rng.uniform(0, 2 * math.pi)
        t = start + np.linspace(0, 2 * math.pi + rng.uniform(-0.15, 0.3), 72)
        bend = 1 + 0.03 * np.sin(t * rng.choice((2, 3)) + rng.uniform(0, 6))
        path = np.stack(
            [
                (x0 + x1) / 2 + (x1 - x0) / 2 * bend * np.cos(t),
                (y0 + y1) / 2 + (y1 - y0) / 2 * bend * np.sin(t),
            ],
            axis=1,
        )
        stroke(pixels, np.clip(path, 0, [width, height]), pen, color)
    elif mark["type"] == "arrow":
        tail, tip = (np.asarray(p, float) for p in mark["points"])
        run = (tip - tail) / np.linalg.norm(tip - tail)
        side = np.asarray([-run[1], run[0]])
        length = min(np.linalg.norm(tip - tail) / 2, pen * rng.uniform(3.5, 4.5))
        spread = length * math.tan(math.radians(rng.uniform(22, 32)))
        base = tip - run * length
        stroke(pixels, np.stack([tail, base + run * pen / 2]), pen, color)
        head = Item(
            "triangle", "", (0, 0, 0), np.stack([tip, base + side * spread, base - side * spread]), tuple(tip)
        )
        fill(pixels, head, color)
    elif mark["type"] == "scribble":
        stroke(pixels, np.asarray(mark["points"], float), pen, color)
    elif mark["type"] == "point":
        (x, y), r = mark["point"], 1.5 * pen
        fill(pixels, Item("circle", "", (0, 0, 0), np.zeros((0, 2)), (x, y), r), color)
    else:
        raise ValueError(f"no such mark {mark['type']!r}")


def picture(c: Canvas, marks: tuple[dict[str, Any], ...] = (), seed: int = 0) -> Image.Image:
    pixels = c.paper.copy()
    for item in c.items:
        fill(pixels, item, item.paint)
    rng = random.Random(seed)
    for mark in marks:
        draw_mark(pixels, mark, rng)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


# -- marks -----------------------------------------------------------------------------------------------


def pixels_of(item: Item, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres inside the shape, as (xs, ys)."""
    rows, cols, mask = footprint(item, 0.0, width, height)
    ys, xs = np.mgrid[rows, cols] + 0.5
    return xs[mask], ys[mask]


def enclose(rng: random.Random, c: Canvas, target: Item, kind: str) -> dict[str, Any] | None:
    """A loose rectangle or ellipse around the target: the tightest one (an ellipse fitted to the shape's
    own pixels) grown by 0 to 35% of the shape's extent, that holds no other shape's centre and under an
    eighth of any other shape."""
    xs, ys = pixels_of(target, c.width, c.height)
    if not len(xs):
        return None
    x0, y0, x1, y1 = xs.min() - 0.5, ys.min() - 0.5, xs.max() + 0.5, ys.max() + 0.5
    extent = max(x1 - x0, y1 - y0)
    if kind == "ellipse":
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        ax, ay = (x1 - x0) / 2, (y1 - y0) / 2
        k = math.sqrt(float((((xs - mx) / ax) ** 2 + ((ys - my) / ay) ** 2).max())) * 1.02
        x0, x1, y0, y1 = mx - k * ax, mx + k * ax, my - k * ay, my + k * ay
    for loose in (0.35, 0.2, 0.1, 0.0):
        if kind == "rectangle":
            grow = [rng.uniform(0, loose) * extent for _ in range(4)]
        else:
            gx, gy = rng.uniform(0, loose) * extent, rng.uniform(0, loose) * extent
            grow = [gx, gy, gx, gy]
        box = [x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3]]
        if kind == "rectangle":
            box = [
                max(0.0, box[0]),
                max(0.0, box[1]),
                min(float(c.width), box[2]),
                min(float(c.height), box[3]),
            ]
        elif box[0] < 0 or box[1] < 0 or box[2] > c.width or box[3] > c.height:
            continue
        if all(clear_of(box, kind, other, c) for other in c.items if other is not target):
            return {
                "type": kind,
                "box": [round(float(v), 1) for v in box],
                "color": rng.choice(list(PALETTE)),
            }
    return None


def clear_of(box: list[float], kind: str, other: Item, c: Canvas) -> bool:
    xs, ys = pixels_of(other, c.width, c.height)
    if kind == "rectangle":
        held = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
    else:
        mx, my, ax, ay = (
            (box[0] + box[2]) / 2,
            (box[1] + box[3]) / 2,
            (box[2] - box[0]) / 2,
            (box[3] - box[1]) / 2,
        )
        held = ((xs - mx) / ax) ** 2 + ((ys - my) / ay) ** 2 <= 1
    cx, cy = xs.mean(), ys.mean()
    centre_in = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
    if kind == "ellipse":
        centre_in = ((cx - mx) / ax) ** 2 + ((cy - my) / ay) ** 2 <= 1
    return not centre_in and held.mean() < 0.125


def arrow_at(rng: random.Random, c: Canvas, target: Item) -> dict[str, Any] | None:
    """An arrow from a free spot anywhere on the picture toward the target: its tip stops on or just off
    the target's edge, its shaft passes clear of every other shape, and no other shape is near its tip."""
    pen = pen_width(c.width, c.height)
    others = [o for o in c.items if o is not target]
    tx, ty = (float(v) for v in np.mean(pixels_of(target, c.width, c.height), axis=1))
    for _ in range(60):
        tail = np.asarray([rng.uniform(2, c.width - 2), rng.uniform(2, c.height - 2)])
        aim = np.asarray([tx, ty]) + np.asarray(
            [rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)]
        ) * extent_of(target)
        if np.linalg.norm(aim - tail) < 1:
            continue
        run = (aim - tail) / np.linalg.norm(aim - tail)
        ts = np.arange(0, np.linalg.norm(aim - tail), 0.5)
        line = tail + ts[:, None] * run
        inside = target.contains(line[:, 0], line[:, 1])
        if inside[0] or not inside.any():
            continue
        edge = ts[int(np.argmax(inside))]
        tip = tail + run * (edge + rng.uniform(-0.08, 0.15) * extent_of(target))
        if np.linalg.norm(tip - tail) < max(4 * pen + 2, 0.06 * min(c.width, c.height)):
            continue
        shaft = tail + np.linspace(0, 1, 48)[:, None] * (tip - tail)
        tip_gap = float(target.distance(tip[:1], tip[1:])[0])
        if all(
            other.distance(shaft[:, 0], shaft[:, 1]).min() > pen + 2
            and other.distance(tip[:1], tip[1:])[0] > 2 * tip_gap + pen + 2
            for other in others
        ):
            return {
                "type": "arrow",
                "points": [[round(float(v), 1) for v in tail], [round(float(v), 1) for v in tip]],
            }
    return None


def extent_of(item: Item) -> float:
    x0, y0, x1, y1 = item.bounds()
    return max(x1 - x0, y1 - y0)


def deep_inside(item: Item, xs: np.ndarray, ys: np.ndarray, margin: float) -> np.ndarray:
    return item.contains(xs, ys) & (item.edge_distance(xs, ys) >= margin)


def scribble_over(rng: random.Random, c: Canvas, target: Item) -> dict[str, Any] | None:
    """A wavy line across the target that stays a pen's width inside it."""
    pen = pen_width(c.width, c.height)
    if extent_of(target) < 8 * pen:
        return None
    cx, cy = target.centre if target.kind == "circle" else tuple(target.corners.mean(0))
    size = extent_of(target)
    for _ in range(30):
        a = rng.uniform(0, math.pi)
        t = np.linspace(-1, 1, 40)
        along = t * size * rng.uniform(0.2, 0.35)
        across = (
            np.sin(t * math.pi * rng.uniform(1.5, 3.5) + rng.uniform(0, 6)) * size * rng.uniform(0.08, 0.18)
        )
        xs = cx + along * math.cos(a) - across * math.sin(a)
        ys = cy + along * math.sin(a) + across * math.cos(a)
        if deep_inside(target, xs, ys, pen).all():
            return {
                "type": "scribble",
                "points": [[round(float(x), 1), round(float(y), 1)] for x, y in zip(xs, ys, strict=True)],
            }
    return None


def dot_on(rng: random.Random, c: Canvas, target: Item) -> dict[str, Any] | None:
    """A dot somewhere on the target, two pen widths from its edge."""
    pen = pen_width(c.width, c.height)
    if extent_of(target) < 6 * pen:
        return None
    x0, y0, x1, y1 = target.bounds()
    for _ in range(50):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if deep_inside(target, np.asarray([x]), np.asarray([y]), 2 * pen)[0]:
            return {"type": "point", "point": [round(x, 1), round(y, 1)]}
    return None


# -- questions -----------------------------------------------------------------------------------------


def lines_of(items: tuple[Item, ...] | list[Item]) -> list[Item] | None:
    """Reading order: top line first, each line left to right. Shapes share a line when their heights
    overlap by half the shorter one's or more, and sit on different lines when they overlap by a tenth or
    less; None when some pair falls between, or a line is not shared by all its shapes."""
    spans = [(item.bounds()[1], item.bounds()[3]) for item in items]
    groups: list[set[int]] = []
    for i in range(len(items)):
        mates = set()
        for j in range(len(items)):
            overlap = min(spans[i][1], spans[j][1]) - max(spans[i][0], spans[j][0])
            shorter = min(spans[i][1] - spans[i][0], spans[j][1] - spans[j][0])
            if overlap >= shorter / 2:
                mates.add(j)
            elif overlap > shorter / 10:
                return None
        if mates not in groups:
            if any(mates & g for g in groups):
                return None
            groups.append(mates)
    groups.sort(key=lambda g: min(spans[i][0] for i in g))
    centre_x = [(item.bounds()[0] + item.bounds()[2]) / 2 for item in items]
    return [items[i] for g in groups for i in sorted(g, key=lambda i: centre_x[i])]


def caption(items: tuple[Item, ...] | list[Item]) -> str:
    ordered = lines_of(items)
    if ordered is None:
        raise ValueError("no clear reading order")
    words = [("an " if i.color[0] in "aeiou" else "a ") + f"{i.color} {i.kind}" for i in ordered]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


MARKERS = {"arrow": arrow_at, "scribble": scribble_over, "point": dot_on}


def make_example(rng: random.Random, kind: str) -> HeldOutExample:
    """One held-out question of the given type with its picture(s), drawn by this module alone."""
    if kind in ("box_shape", "arrow_color"):
        while True:
            c = canvas(rng, [rng.choice(SHAPES) for _ in range(rng.randint(2, 6))])
            target = rng.choice(c.items)
            how = (
                rng.choice(("rectangle", "ellipse", "scribble", "point")) if kind == "box_shape" else "arrow"
            )
            if how in ("rectangle", "ellipse"):
                mark = enclose(rng, c, target, how)
            else:  # drawn on or at the shape: in a colour that shows on it
                mark = MARKERS[how](rng, c, target)
                if mark is not None:
                    mark["color"] = rng.choice(SHOWS_ON[target.color])
            if mark is None:
                continue
            image = picture(c, (mark,), rng.randrange(2**31))
            if kind == "arrow_color":
                return HeldOutExample([image], QUESTIONS["arrow"], target.color, kind, (c,), (mark,), target)
            question = QUESTIONS[how].format(mark["color"])
            return HeldOutExample([image], question, target.kind, kind, (c,), (mark,), target)
    if kind == "count":
        asked, n = rng.choice(SHAPES), rng.randint(0, 4)
        rest = [
            rng.choice([s for s in SHAPES if s != asked])
            for _ in range(rng.randint(1 if n == 0 else 0, 6 - n))
        ]
        kinds = [asked] * n + rest
        rng.shuffle(kinds)
        c = canvas(rng, kinds)
        return HeldOutExample([picture(c)], QUESTIONS["count"].format(asked), NUMBERS[n], kind, (c,))
    if kind == "caption":
        while True:
            c = canvas(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 4))])
            if lines_of(c.items) is not None:
                return HeldOutExample([picture(c)], QUESTIONS["caption"], caption(c.items), kind, (c,))
    if kind == "which_image":
        asked = rng.choice(SHAPES)
        has = [asked] + [rng.choice(SHAPES) for _ in range(rng.randint(0, 3))]
        rng.shuffle(has)
        lacks = [rng.choice([s for s in SHAPES if s != asked]) for _ in range(rng.randint(1, 4))]
        first = rng.random() < 0.5
        pair = (canvas(rng, has), canvas(rng, lacks)) if first else (canvas(rng, lacks), canvas(rng, has))
        question = QUESTIONS["which_image"].format(asked)
        answer = "the first" if first else "the second"
        return HeldOutExample([picture(p) for p in pair], question, answer, kind, pair)
    raise ValueError(f"unknown question type {kind!r}")


def examples(family: str, per_type: int = PER_TYPE, seed: int = 2024) -> Iterator[HeldOutExample]:
    """The held-out set of a family, one question at a time: per_type of each of its types, in turn."""
    if family not in QUESTION_TYPES:
        raise ValueError(f"family must be one of {sorted(QUESTION_TYPES)}, got {family!r}")
    rng = random.Random(seed)
    kinds = QUESTION_TYPES[family]
    return (make_example(rng, kinds[i % len(kinds)]) for i in range(per_type * len(kinds)))


def write(folder: str | Path, family: str, per_type: int = PER_TYPE, seed: int = 2024) -> Path:
    """The held-out set as JSONL (LLaVA conversation format, with each row's type) + PNGs."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(examples(family, per_type, seed)):
        names = []
        for j, image in enumerate(ex.images):
            names.append(f"images/heldout-{i:06d}-{j}.png")
            image.save(folder / names[-1])
        rows.append(
            {
                "id": i,
                "type": ex.kind,
                "image": names if len(names) > 1 else names[0],
                "conversations": [
                    {"from": "human", "value": "<image>\n" * len(names) + ex.question},
                    {"from": "gpt", "value": ex.answer},
                ],
            }
        )
    path = folder / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the hand-made scenes ---------------------------------------------------------------------------------


def handmade() -> dict[str, Any]:
    """The free-form hand-made set (examples/freeform.json): scenes placed by hand anywhere, and questions."""
    return json.loads(HANDMADE.read_text())


def handmade_canvas(spec: dict[str, Any]) -> Canvas:
    """A hand-made scene: [colour, kind, x, y, diameter, turn in degrees] per shape, the diameter being
    that of the circle through its corners (a triangle may give its three corners instead of the turn),
    drawn in the colours' own shades."""
    width, height = spec["size"]
    items = []
    for color, kind, x, y, extent, *turn in spec["shapes"]:
        plain = tuple(round(v * 255) for v in colorsys.hsv_to_rgb(HSV[color][0] / 360, *HSV[color][1:]))
        if kind == "circle":
            items.append(Item(kind, color, plain, np.zeros((0, 2)), (x, y), extent / 2))
            continue
        if turn and isinstance(turn[0], list):
            corners = np.asarray(turn[0], float)
        else:
            a = math.radians(turn[0] if turn else 0.0)
            base = {"square": 4, "triangle": 3, "star": 10}[kind]
            angles = a - math.pi / 2 + np.arange(base) * 2 * math.pi / base
            if kind == "square":
                angles = angles + math.pi / 4
            radius = extent / 2
            radii = np.where((np.arange(base) % 2 == 1) & (kind == "star"), 0.45 * radius, radius)
            corners = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], axis=1)
        items.append(Item(kind, color, plain, corners, (x, y)))
    background = np.broadcast_to(
        np.asarray(spec.get("background", [255, 255, 255]), np.float32), (height, width, 3)
    )
    return Canvas(width, height, tuple(items), background.copy())


def write_handmade(folder: str | Path = EXAMPLES) -> list[Path]:
    """Draw the free-form hand-made scenes as PNGs (named after them) into folder."""
    paths = []
    for name, spec in handmade()["scenes"].items():
        paths.append(Path(folder) / f"{name}.png")
        picture(handmade_canvas(spec)).save(paths[-1])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", help="where the held-out set goes")
    ap.add_argument("--handmade", action="store_true", help="redraw the free-form hand-made scenes instead")
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--per-type", type=int, default=PER_TYPE)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    if args.handmade:
        print("\n".join(str(p) for p in write_handmade()))
        return
    if args.out_dir is None:
        ap.error("give out_dir (or --handmade)")
    print(write(args.out_dir, args.family, args.per_type, args.seed))


if __name__ == "__main__":
    main()
