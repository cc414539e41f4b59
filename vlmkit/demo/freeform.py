"""The shapes world without the grid, as a training-data generator: 1 to 6 shapes anywhere (close but never
overlapping) on pictures of 96 to 512 px of any aspect up to 2:1, rotated squares, any triangle, stars of any
thickness, shades of each colour, light backgrounds (plain, tinted or noisy), and visual prompts drawn as a
person draws them with `vlmkit.visual_prompts`: loose boxes and ellipses, arrows from any free direction,
scribbles and points on a shape. The questions and answers are the grid world's (`vlmkit.demo.shapes`).

    python -m vlmkit.demo.freeform OUT_DIR --rows 5000 --family vipllava --seed 0

`vlmkit.demo.heldout` is its held-out twin, written separately with its own drawing.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlmkit.demo.shapes import COLORS, NUMBERS, QUESTION_TYPES, SHAPES, Example
from vlmkit.demo.shapes import write_dataset as write_rows
from vlmkit.visual_prompts import COLORS as PALETTE
from vlmkit.visual_prompts import default_width, draw_visual_prompts

SIDES = (96, 512)  # a picture's sides, in pixels
MAX_ASPECT = 2.0
SIZES = (0.08, 0.35)  # a shape's extent: from 8% of the longer side (and MIN_PIXELS) to 35% of the shorter
MIN_PIXELS = 10
MAX_SHAPES = 6
MAX_COUNT = 4  # count answers run from zero to four, equally often
CAPTION_SHAPES = 4  # a caption names at most this many shapes (an answer fits in 24 tokens)
MAX_MARGIN = 0.35  # a box or ellipse leaves up to this fraction of the shape's extent around it
MARK_QUESTIONS = {
    "rectangle": "What shape is inside the {} rectangle?",
    "ellipse": "What shape is inside the {} ellipse?",
    "scribble": "What shape is the {} scribble on?",
    "point": "What shape is the {} point on?",
}
ARROW_QUESTION = "What color is the shape the arrow points to?"
# marks drawn on a shape (scribbles, points, an arrow's head) avoid the palette colours close to its own, as a
# person picks a colour that shows
CLASHES = {
    "red": {"red"},
    "green": {"lime"},
    "blue": {"blue"},
    "yellow": {"yellow", "gold"},
    "purple": {"purple"},
    "orange": {"orange", "gold"},
}


@dataclass(frozen=True)
class FreeShape:
    """A shape by its circumscribed circle (centre, radius r), rotation and form: `corners` are a triangle's
    three vertex angles on that circle, `inner` a star's inner radius over r."""

    kind: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    r: float
    angle: float = 0.0
    corners: tuple[float, ...] = ()
    inner: float = 0.45

    def outline(self) -> np.ndarray:
        """The outline as a polygon (k, 2) in picture pixels (a circle: 48 corners)."""
        if self.kind == "circle":
            a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
            radii = np.full(48, self.r)
        elif self.kind == "square":
            a = self.angle + np.arange(4) * math.pi / 2
            radii = np.full(4, self.r)
        elif self.kind == "triangle":
            a = self.angle + np.asarray(self.corners)
            radii = np.full(3, self.r)
        elif self.kind == "star":
            a = self.angle + np.arange(10) * math.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, self.r, self.r * self.inner)
        else:
            raise ValueError(f"unknown shape {self.kind!r}; known: {SHAPES}")
        return np.stack([self.cx + radii * np.cos(a), self.cy + radii * np.sin(a)], axis=1)

    @property
    def centre(self) -> tuple[float, float]:
        """The mean of the corners: inside every shape (a triangle's circumcentre need not be)."""
        x, y = self.outline().mean(0)
        return float(x), float(y)

    @property
    def box(self) -> tuple[float, float, float, float]:
        points = self.outline()
        return (*(float(v) for v in points.min(0)), *(float(v) for v in points.max(0)))  # type: ignore[return-value]


@dataclass(frozen=True)
class Scene:
    """A picture before drawing: its size, shapes and background (colour, noise level, noise seed), and
    how finely its shapes are anti-aliased (1: not at all)."""

    width: int
    height: int
    shapes: tuple[FreeShape, ...]
    background: tuple[int, int, int] = (245, 245, 240)
    noise: float = 0.0
    seed: int = 0
    supersample: int = 2


@dataclass(frozen=True)
class FreeExample(Example):
    """An example with what made it: its scenes, the visual prompt drawn on the first and the shape asked
    about (None where the question names none)."""

    scenes: tuple[Scene, ...] = ()
    prompt: dict[str, Any] | None = None
    target: FreeShape | None = None


# -- geometry ------------------------------------------------------------------------------------------


def inside(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which points (n, 2) lie inside the polygon (k, 2) (even-odd rule)."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    spans = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return ((spans & (x < cross_x)).sum(1) % 2) == 1


def segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (n, m) from each point (n, 2) to each segment a[j]-b[j] (m, 2)."""
    ab = b - a  # (m, 2)
    ap = points[:, None, :] - a[None]  # (n, m, 2)
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(ap - t[..., None] * ab, axis=-1)


def _crosses(p: np.ndarray, q: np.ndarray) -> bool:
    """Whether an edge of polygon p crosses an edge of polygon q."""
    a, b = p, np.roll(p, -1, 0)
    c, d = q, np.roll(q, -1, 0)

    def side(o: np.ndarray, e: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (e[..., 0] - o[..., 0]) * (x[..., 1] - o[..., 1]) - (e[..., 1] - o[..., 1]) * (
            x[..., 0] - o[..., 0]
        )

    A, B, C, D = a[:, None], b[:, None], c[None], d[None]
    return bool(
        (
            (np.sign(side(A, B, C)) != np.sign(side(A, B, D)))
            & (np.sign(side(C, D, A)) != np.sign(side(C, D, B)))
        ).any()
    )


def gap(a: FreeShape, b: FreeShape) -> float:
    """The distance between two shapes' outlines (0 where they touch or overlap)."""
    p, q = a.outline(), b.outline()
    if _crosses(p, q) or inside(q, p).any() or inside(p, q).any():
        return 0.0
    return float(
        min(
            segment_distance(p, q, np.roll(q, -1, 0)).min(),
            segment_distance(q, p, np.roll(p, -1, 0)).min(),
        )
    )


def distances(shape: FreeShape, points: np.ndarray) -> np.ndarray:
    """How far each point (n, 2) is from the shape (0 inside it)."""
    outline = shape.outline()
    far = segment_distance(points, outline, np.roll(outline, -1, 0)).min(1)
    return np.where(inside(outline, points), 0.0, far)


def distance_to(shape: FreeShape, point: tuple[float, float] | list[float]) -> float:
    """How far a point is from the shape (0 inside it)."""
    return float(distances(shape, np.asarray([point], dtype=float))[0])


def share_inside(shape: FreeShape, region: str, box: tuple[float, float, float, float]) -> float:
    """About how much of the shape's area lies inside a rectangle or the ellipse inscribed in it."""
    outline = shape.outline()
    (x0, y0), (x1, y1) = outline.min(0), outline.max(0)
    gx, gy = np.meshgrid(np.linspace(x0, x1, 16), np.linspace(y0, y1, 16))
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    points = points[inside(outline, points)]
    if not len(points):
        return 0.0
    return float(in_region(region, box, points).mean())


def in_region(region: str, box: tuple[float, float, float, float], points: np.ndarray) -> np.ndarray:
    bx0, by0, bx1, by1 = box
    if region == "rectangle":
        return (points[:, 0] >= bx0) & (points[:, 0] <= bx1) & (points[:, 1] >= by0) & (points[:, 1] <= by1)
    cx, cy, ax, ay = (bx0 + bx1) / 2, (by0 + by1) / 2, (bx1 - bx0) / 2, (by1 - by0) / 2
    return ((points[:, 0] - cx) / ax) ** 2 + ((points[:, 1] - cy) / ay) ** 2 <= 1


def reading_order(shapes: list[FreeShape] | tuple[FreeShape, ...]) -> list[FreeShape] | None:
    """The shapes as a person reads them: lines from top to bottom, each from left to right; None when that
    is unclear. Two shapes share a line when their heights overlap by at least half the shorter one's;
    they are on different lines when they overlap by at most a tenth of it; anything between is unclear,
    and so is a line whose shapes do not all share it pairwise."""
    n = len(shapes)
    boxes = [s.box for s in shapes]
    same = np.eye(n, dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            overlap = min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1])
            shorter = min(boxes[i][3] - boxes[i][1], boxes[j][3] - boxes[j][1])
            if overlap >= 0.5 * shorter:
                same[i, j] = same[j, i] = True
            elif overlap > 0.1 * shorter:
                return None
    lines: list[list[int]] = []
    for i in range(n):
        if not any(i in line for line in lines):
            lines.append([j for j in range(n) if same[i, j]])
    if any(not same[np.ix_(line, line)].all() for line in lines):
        return None
    lines.sort(key=lambda line: min(boxes[i][1] for i in line))
    return [shapes[i] for line in lines for i in sorted(line, key=lambda i: shapes[i].centre[0])]


def describe(shapes: list[FreeShape] | tuple[FreeShape, ...]) -> str:
    """The shapes in reading order: "a red circle, a blue square and an orange star"."""
    ordered = reading_order(shapes)
    if ordered is None:
        raise ValueError("the shapes have no clear reading order")
    parts = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}" for s in ordered]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# -- scenes --------------------------------------------------------------------------------------------


def picture_size(rng: random.Random) -> tuple[int, int]:
    """Square half the time, else of aspect 1.1 to MAX_ASPECT either way; sides in SIDES."""
    low, high = SIDES
    if rng.random() < 0.5:
        side = rng.randint(low, high)
        return side, side
    aspect = rng.uniform(1.1, MAX_ASPECT)
    long = rng.randint(math.ceil(low * aspect), high)
    short = max(low, round(long / aspect))
    return (long, short) if rng.random() < 0.5 else (short, long)


def shade(rng: random.Random, name: str) -> tuple[int, int, int]:
    """The colour with a small change of brightness and tint."""
    lift = rng.uniform(-12, 12)
    return tuple(int(np.clip(c + lift + rng.uniform(-10, 10), 0, 255)) for c in COLORS[name])  # type: ignore[return-value]


def random_shape(rng: random.Random, kind: str, color: str, cx: float, cy: float, r: float) -> FreeShape:
    """A shape of the kind with a random variant: any rotation, any triangle whose angles are all at least
    30 degrees (three corners on its circumscribed circle), any star thickness."""
    corners: tuple[float, ...] = ()
    if kind == "triangle":
        while True:  # the arcs between corners are twice the opposite angles: at least 60 degrees each
            arcs = sorted(rng.uniform(0, 2 * math.pi) for _ in range(3))
            gaps = (arcs[1] - arcs[0], arcs[2] - arcs[1], 2 * math.pi - arcs[2] + arcs[0])
            if min(gaps) >= math.radians(60):
                corners = tuple(arcs)
                break
    return FreeShape(
        kind,
        color,
        shade(rng, color),
        cx,
        cy,
        r,
        angle=rng.uniform(0, 2 * math.pi),
        corners=corners,
        inner=rng.uniform(0.38, 0.6),
    )


def random_scene(
    rng: random.Random,
    n: int,
    *,
    size: tuple[int, int] | None = None,
    kinds: tuple[str, ...] = SHAPES,
    each: list[str] | None = None,
) -> Scene:
    """n shapes of kinds picked from `kinds` (or of the kinds listed in `each`, one per shape) placed at
    random, each at least a small gap from the others and often right next to one, as a person draws them."""
    if not 1 <= n <= MAX_SHAPES:
        raise ValueError(f"a scene holds 1 to {MAX_SHAPES} shapes, got {n}")
    if each is not None and len(each) != n:
        raise ValueError(f"each lists {len(each)} kinds for {n} shapes")
    width, height = size or picture_size(rng)
    short, long = min(width, height), max(width, height)
    smallest = max(MIN_PIXELS, SIZES[0] * long) / 2
    min_gap = max(2.0, 0.015 * short)
    for _ in range(50):
        shapes: list[FreeShape] = []
        for i in range(n):
            kind = each[i] if each is not None else rng.choice(kinds)
            r = rng.uniform(smallest, max(smallest, SIZES[1] * short / 2))
            placed = None
            for attempt in range(60):
                if attempt and attempt % 20 == 0:
                    r = max(smallest, r * 0.75)
                pad = r + min_gap
                if shapes and rng.random() < 0.4:  # next to a shape already there
                    other = rng.choice(shapes)
                    a, d = rng.uniform(0, 2 * math.pi), (r + other.r) * rng.uniform(0.75, 1.2)
                    cx, cy = other.cx + d * math.cos(a), other.cy + d * math.sin(a)
                    if not (pad <= cx <= width - pad and pad <= cy <= height - pad):
                        continue
                else:
                    cx, cy = rng.uniform(pad, width - pad), rng.uniform(pad, height - pad)
                shape = random_shape(rng, kind, rng.choice(list(COLORS)), cx, cy, r)
                if all(gap(shape, s) >= min_gap for s in shapes):
                    placed = shape
                    break
            if placed is None:
                break
            shapes.append(placed)
        if len(shapes) == n:
            return Scene(width, height, tuple(shapes), *background(rng))
    raise RuntimeError(f"could not place {n} shapes on a {width}x{height} picture")


def background(rng: random.Random) -> tuple[tuple[int, int, int], float, int, int]:
    """(colour, noise level, noise seed, supersampling) of a light picture: plain, tinted or noisy."""
    style = rng.random()
    if style < 0.35:
        colour = rng.choice(((255, 255, 255), (245, 245, 240), (250, 250, 250)))
    else:
        colour = tuple(255 - int(rng.uniform(0, 30)) for _ in range(3))
    noise = rng.uniform(2, 7) if style > 0.7 else 0.0
    return colour, noise, rng.randrange(2**31), rng.choice((1, 2, 2, 3))  # type: ignore[return-value]


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB picture: each shape drawn at `supersample` times the size and shrunk onto the
    background (1: hard edges, as some drawing programs make them)."""
    k = scene.supersample
    back = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    back[:] = scene.background
    if scene.noise:
        back += np.random.default_rng(scene.seed).normal(0, scene.noise, back.shape).astype(np.float32)
    image = Image.fromarray(np.clip(back, 0, 255).round().astype(np.uint8))
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        x0, y0 = max(0, int(x0) - 1), max(0, int(y0) - 1)
        x1, y1 = min(scene.width, int(x1) + 2), min(scene.height, int(y1) + 2)
        mask = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
        draw = ImageDraw.Draw(mask)
        if s.kind == "circle":
            draw.ellipse(
                [(s.cx - s.r - x0) * k, (s.cy - s.r - y0) * k, (s.cx + s.r - x0) * k, (s.cy + s.r - y0) * k],
                fill=255,
            )
        else:
            draw.polygon([((x - x0) * k, (y - y0) * k) for x, y in s.outline()], fill=255)
        if k > 1:
            mask = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        image.paste(s.rgb, (x0, y0, x1, y1), mask)
    return image


# -- visual prompts ------------------------------------------------------------------------------------


def mark_colour(rng: random.Random, target: FreeShape) -> str:
    """A palette colour that shows on the shape."""
    return rng.choice([c for c in PALETTE if c not in CLASHES[target.color]])


def box_around(
    rng: random.Random, scene: Scene, target: FreeShape, kind: str
) -> tuple[float, float, float, float] | None:
    """A rectangle (each side 0 to MAX_MARGIN of the shape's extent away from it) or an ellipse (as loose,
    evenly on both sides) around the target, inside the picture, holding under 15% of any other shape and
    no other shape's centre; None when no such prompt fits."""
    x0, y0, x1, y1 = target.box
    w, h = x1 - x0, y1 - y0
    extent = max(w, h)
    if kind == "ellipse":  # the smallest ellipse of the box's proportions around every corner of the outline
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        points = target.outline()
        grow = float(
            np.sqrt((((points[:, 0] - cx) / (w / 2)) ** 2 + ((points[:, 1] - cy) / (h / 2)) ** 2).max())
        )
        x0, x1, y0, y1 = cx - grow * w / 2, cx + grow * w / 2, cy - grow * h / 2, cy + grow * h / 2
    scale = 1.0
    for _ in range(6):
        if kind == "rectangle":
            m = [rng.uniform(0, MAX_MARGIN) * extent * scale for _ in range(4)]
        else:
            mx, my = (rng.uniform(0, MAX_MARGIN) * extent * scale for _ in range(2))
            m = [mx, my, mx, my]
        box = (x0 - m[0], y0 - m[1], x1 + m[2], y1 + m[3])
        if kind == "rectangle":
            box = (max(0.0, box[0]), max(0.0, box[1]), min(scene.width, box[2]), min(scene.height, box[3]))
        fits = box[0] >= 0 and box[1] >= 0 and box[2] <= scene.width and box[3] <= scene.height
        others = [s for s in scene.shapes if s is not target]
        if fits and all(
            not in_region(kind, box, np.asarray([s.centre]))[0] and share_inside(s, kind, box) < 0.15
            for s in others
        ):
            return box
        scale *= 0.5
    return None


def arrow_to(rng: random.Random, scene: Scene, target: FreeShape) -> list[list[float]] | None:
    """An arrow aimed at (near) the target's centre from a random direction, its tip from a little inside
    the target's edge to a little off it, its shaft of any length clear of the other shapes, and no other
    shape nearly as close to its tip; None when none fits."""
    cx, cy = target.centre
    others = [s for s in scene.shapes if s is not target]
    width = stroke_width(scene)
    clear = width + 2
    short, long = min(scene.width, scene.height), max(scene.width, scene.height)
    for _ in range(40):
        a = rng.uniform(0, 2 * math.pi)
        aim = (cx + rng.uniform(-0.3, 0.3) * target.r, cy + rng.uniform(-0.3, 0.3) * target.r)
        ux, uy = math.cos(a), math.sin(a)  # from the aim point back toward the tail
        steps = np.linspace(
            2.5 * target.r, 0, 200
        )  # walking in from far out: where the ray enters the target
        hits = inside(target.outline(), np.stack([aim[0] + ux * steps, aim[1] + uy * steps], axis=1))
        if not hits.any():
            continue
        tip = steps[int(np.argmax(hits))] + rng.uniform(-0.1, 0.25) * target.r
        length = rng.uniform(max(4 * width + 2, 0.08 * short), 0.6 * long)
        head = (aim[0] + ux * tip, aim[1] + uy * tip)
        tail = (head[0] + ux * length, head[1] + uy * length)
        if not (1 <= tail[0] <= scene.width - 1 and 1 <= tail[1] <= scene.height - 1):
            continue
        if not (0 <= head[0] <= scene.width and 0 <= head[1] <= scene.height):
            continue
        shaft = np.stack([np.linspace(head[0], tail[0], 64), np.linspace(head[1], tail[1], 64)], axis=1)
        near = min(distance_to(target, head), target.r)
        if all(
            distances(s, shaft).min() >= clear and distance_to(s, head) > 2 * near + clear for s in others
        ):
            return [[round(float(v), 1) for v in tail], [round(float(v), 1) for v in head]]
    return None


def pull_inside(target: FreeShape, points: np.ndarray, shrink: float) -> np.ndarray:
    """The points, each moved toward the target's centre until it lies in the outline shrunk by `shrink`."""
    centre = np.asarray(target.centre)
    shrunk = (target.outline() - centre) * shrink + centre
    out = points.copy()
    for _ in range(20):
        outside = ~inside(shrunk, out)
        if not outside.any():
            break
        out[outside] = centre + (out[outside] - centre) * 0.8
    return out


def point_on(rng: random.Random, target: FreeShape) -> list[float]:
    """A point well inside the target (in its outline shrunk by half toward its centre)."""
    cx, cy = target.centre
    p = np.asarray([[cx + rng.uniform(-0.5, 0.5) * target.r, cy + rng.uniform(-0.5, 0.5) * target.r]])
    x, y = pull_inside(target, p, 0.5)[0]
    return [round(float(x), 1), round(float(y), 1)]


def scribble_on(rng: random.Random, target: FreeShape) -> list[list[float]]:
    """A zigzag across the target, as a person scribbles over a shape: 3 to 7 turns along a random
    direction, kept inside its outline shrunk to two thirds."""
    n = rng.randint(3, 7)
    a = rng.uniform(0, math.pi)
    along = np.linspace(-1, 1, n) * rng.uniform(0.4, 0.7) * target.r
    across = np.asarray([(-1) ** i * rng.uniform(0.2, 0.5) * target.r for i in range(n)])
    cx, cy = target.centre
    points = np.stack(
        [cx + along * math.cos(a) - across * math.sin(a), cy + along * math.sin(a) + across * math.cos(a)],
        axis=1,
    )
    return [[round(float(x), 1), round(float(y), 1)] for x, y in pull_inside(target, points, 2 / 3)]


def stroke_width(scene: Scene) -> int:
    """The width `vlmkit.visual_prompts` draws a prompt with by default on this scene's picture."""
    return default_width(Image.new("1", (scene.width, scene.height)))


def mark(rng: random.Random, scene: Scene, target: FreeShape, kind: str) -> dict[str, Any] | None:
    """A visual prompt of the kind ("rectangle", "ellipse", "scribble", "point") marking the target, with
    the default width and (sometimes) the hand-drawn wobble; None when a box does not fit or the shape is
    too small to stay visible under a scribble (8 widths) or a point (6 widths)."""
    smallest = {"scribble": 8, "point": 6}.get(kind, 0) * stroke_width(scene)
    if 2 * target.r < smallest:
        return None
    if kind in ("rectangle", "ellipse"):
        box = box_around(rng, scene, target, kind)
        if box is None:
            return None
        spec: dict[str, Any] = {
            "type": kind,
            "box": [round(float(v), 1) for v in box],
            "color": rng.choice(list(PALETTE)),
        }
    elif kind == "scribble":
        spec = {
            "type": "scribble",
            "points": scribble_on(rng, target),
            "color": mark_colour(rng, target),
        }
        if len({tuple(p) for p in spec["points"]}) < 2:
            return None
    else:
        spec = {"type": "point", "point": point_on(rng, target), "color": mark_colour(rng, target)}
    if kind in ("rectangle", "scribble") and rng.random() < 0.5:
        spec["seed"] = rng.randrange(2**31)
    return spec


def draw(scene: Scene, prompts: list[dict[str, Any]] | None = None) -> Image.Image:
    image = render(scene)
    return draw_visual_prompts(image, prompts) if prompts else image


# -- questions -----------------------------------------------------------------------------------------


def make_example(rng: random.Random, kind: str) -> FreeExample:
    """One question of the given type (the grid world's types and answers) with its picture(s)."""
    plan = plan_example(rng, kind)
    images = [draw(s, [plan.prompt] if plan.prompt and i == 0 else None) for i, s in enumerate(plan.scenes)]
    return FreeExample(images, plan.question, plan.answer, kind, plan.scenes, plan.prompt, plan.target)


def plan_example(rng: random.Random, kind: str) -> FreeExample:
    """The example without its pictures drawn (what `make_example` draws; every random choice is made here)."""
    if kind == "box_shape":
        while True:
            scene = random_scene(rng, rng.randint(2, MAX_SHAPES))
            target, prompt = rng.choice(scene.shapes), rng.choice(list(MARK_QUESTIONS))
            spec = mark(rng, scene, target, prompt)
            if spec is not None:
                question = MARK_QUESTIONS[prompt].format(spec["color"])
                return FreeExample([], question, target.kind, kind, (scene,), spec, target)
    if kind == "arrow_color":
        while True:
            scene = random_scene(rng, rng.randint(2, MAX_SHAPES))
            target = rng.choice(scene.shapes)
            points = arrow_to(rng, scene, target)
            if points is not None:
                spec = {"type": "arrow", "points": points, "color": mark_colour(rng, target)}
                return FreeExample([], ARROW_QUESTION, target.color, kind, (scene,), spec, target)
    if kind == "count":
        asked = rng.choice(SHAPES)
        n = rng.randint(0, MAX_COUNT)
        others = [
            rng.choice([k for k in SHAPES if k != asked])
            for _ in range(rng.randint(int(n == 0), MAX_SHAPES - n))
        ]
        kinds = [asked] * n + others
        rng.shuffle(kinds)
        scene = random_scene(rng, len(kinds), each=kinds)
        return FreeExample([], f"How many {asked}s are there?", NUMBERS[n], kind, (scene,))
    if kind == "caption":
        while True:
            scene = random_scene(rng, rng.randint(1, CAPTION_SHAPES))
            if reading_order(scene.shapes) is not None:
                return FreeExample([], "Describe the image.", describe(scene.shapes), kind, (scene,))
    if kind == "which_image":
        asked = rng.choice(SHAPES)
        others = tuple(s for s in SHAPES if s != asked)
        n = rng.randint(1, CAPTION_SHAPES)
        with_it = random_scene(rng, n, each=[asked] + [rng.choice(SHAPES) for _ in range(n - 1)])
        without = random_scene(rng, rng.randint(1, CAPTION_SHAPES), kinds=others)
        first_has = rng.random() < 0.5
        scenes = (with_it, without) if first_has else (without, with_it)
        question = f"Which image has a {asked}, the first or the second?"
        return FreeExample([], question, "the first" if first_has else "the second", kind, scenes)
    raise ValueError(
        f"unknown question type {kind!r}; known: {sorted({k for v in QUESTION_TYPES.values() for k in v})}"
    )


# -- the vision tower's first lesson -----------------------------------------------------------------


def patch_labels(grid: int) -> dict[str, int]:
    """The classes of each per-patch label `labelled_scene` gives, for a grid x grid patch model."""
    return {
        "shape": len(SHAPES) + 1,  # the shape over most of the patch, or whose centre it holds (last: none)
        "color": len(COLORS) + 1,
        "centre": 2,  # holds a shape's centre: one patch per shape, what counting needs
        "marked": 2,  # belongs to the shape a box, ellipse, scribble or point marks
        "arrow_head": 2,  # belongs to the shape an arrow points to
        "arrow_tail": 2,
        "row": grid,  # where the patch is: IDEFICS's cross-attention sees no positions but these
        "column": grid,
    }


def to_input(width: int, height: int, size: int, fit: str) -> tuple[float, float, float, float]:
    """(x scale, y scale, x offset, y offset) from a width x height picture's pixels to the model's size x
    size input: "pad" pads the picture to a square first, centred (LLaVA), "squash" resizes it to the
    square (IDEFICS)."""
    side = max(width, height)
    if fit == "pad":
        scale = size / side
        return scale, scale, (side - width) // 2 * scale, (side - height) // 2 * scale
    if fit == "squash":
        return size / width, size / height, 0.0, 0.0
    raise ValueError(f"fit must be 'pad' or 'squash', got {fit!r}")


def labelled_scene(
    rng: random.Random, size: int, patch: int, fit: str
) -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """A scene with (sometimes) a mark and an arrow on it, and per patch of a size x size model input
    (`fit`: how the picture becomes that input) what it holds: see `patch_labels`. A patch belongs to the
    shape that covers a quarter of it or more (the most covering one), or whose centre it holds."""
    grid = size // patch
    scene = random_scene(rng, rng.randint(1, MAX_SHAPES))
    sx, sy, dx, dy = to_input(scene.width, scene.height, size, fit)

    def cell(x: float, y: float) -> int:
        col = min(grid - 1, max(0, int((x * sx + dx) // patch)))
        row = min(grid - 1, max(0, int((y * sy + dy) // patch)))
        return row * grid + col

    # 4 x 4 sample points per patch, taken back to picture pixels
    ticks = (np.arange(grid)[:, None] * patch + (np.arange(4) + 0.5) * patch / 4).ravel()
    gx, gy = np.meshgrid((ticks - dx) / sx, (ticks - dy) / sy)
    samples = np.stack([gx.ravel(), gy.ravel()], axis=1)
    cover = np.stack([inside(s.outline(), samples) for s in scene.shapes])  # (n, (grid * 4) ** 2)
    cover = cover.reshape(-1, grid, 4, grid, 4).mean(axis=(2, 4)).reshape(len(scene.shapes), -1)
    owner = np.where(cover.max(0) >= 0.25, cover.argmax(0), -1)
    centres = [cell(*s.centre) for s in scene.shapes]
    for i, c in enumerate(centres):
        owner[c] = i
    labels = {k: torch.zeros(grid * grid, dtype=torch.long) for k in patch_labels(grid)}
    labels["row"] = torch.arange(grid * grid) // grid
    labels["column"] = torch.arange(grid * grid) % grid
    held = torch.from_numpy(owner >= 0)
    kinds = torch.tensor([SHAPES.index(s.kind) for s in scene.shapes] + [len(SHAPES)])
    colors = torch.tensor([list(COLORS).index(s.color) for s in scene.shapes] + [len(COLORS)])
    labels["shape"] = kinds[torch.from_numpy(owner)]  # -1 picks the last entry: none
    labels["color"] = colors[torch.from_numpy(owner)]
    labels["centre"][centres] = 1
    specs = []
    if rng.random() < 0.5:
        target = rng.randrange(len(scene.shapes))
        spec = mark(rng, scene, scene.shapes[target], rng.choice(list(MARK_QUESTIONS)))
        if spec is not None:
            specs.append(spec)
            labels["marked"] = (held & torch.from_numpy(owner == target)).long()
    if len(scene.shapes) > 1 and rng.random() < 0.5:
        target = rng.randrange(len(scene.shapes))
        points = arrow_to(rng, scene, scene.shapes[target])
        if points is not None:
            specs.append({"type": "arrow", "points": points, "color": mark_colour(rng, scene.shapes[target])})
            labels["arrow_head"] = (held & torch.from_numpy(owner == target)).long()
            labels["arrow_tail"][cell(*points[0])] = 1
    return draw(scene, specs), labels


# -- datasets ------------------------------------------------------------------------------------------


def write_dataset(
    folder: str | Path,
    rows: int,
    *,
    family: str = "vipllava",
    seed: int = 0,
    name: str = "train.jsonl",
    kinds: tuple[str, ...] | None = None,
    workers: int = 0,
) -> Path:
    """rows questions of the free-form world as `vlmkit.demo.shapes.write_dataset` writes them (JSONL in
    the LLaVA conversation format + PNGs at the pictures' own sizes); returns the JSONL path."""
    return write_rows(
        folder, rows, family=family, seed=seed, name=name, kinds=kinds, make=make_example, workers=workers
    )


def corpus() -> list[str]:
    """Questions and answers of every type (no pictures drawn): text for the demo models' tokenizer."""
    rng = random.Random(0)
    lines = []
    for kind in ("box_shape", "arrow_color", "count", "caption", "which_image"):
        for _ in range(200):
            plan = plan_example(rng, kind)
            lines.append(f"{plan.question} {plan.answer}")
    words = [*MARK_QUESTIONS, *PALETTE, *COLORS, *SHAPES, *[s + "s" for s in SHAPES], *NUMBERS]
    return lines + [" ".join(words)] * 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="where the dataset goes")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_dataset(args.out_dir, args.rows, family=args.family, seed=args.seed))


if __name__ == "__main__":
    main()
