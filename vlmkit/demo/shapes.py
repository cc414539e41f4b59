"""A synthetic "shapes" world where every question has one checkable answer: pictures of a few coloured
shapes, visual prompts drawn on them, and questions about what the prompts point at.

    python -m vlmkit.demo.shapes OUT_DIR --rows 5000 --family vipllava --seed 0

writes OUT_DIR/train.jsonl (LLaVA conversation format) and the PNGs it refers to.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.vipllava.visual_prompts import draw_visual_prompts

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
PROMPT_COLORS = ("red", "lime", "blue", "yellow", "fuchsia", "aqua")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = {
    "vipllava": ("box_shape", "arrow_color", "count", "caption"),
    "idefics": ("count", "caption", "which_image"),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    r: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


@dataclass(frozen=True)
class Example:
    images: list[Image.Image]
    question: str
    answer: str
    kind: str


def random_scene(rng: random.Random, size: int, n: int, *, kinds: tuple[str, ...] = SHAPES) -> list[Shape]:
    """n non-overlapping shapes with a margin between them and to the border (room for a box around each)."""
    shapes: list[Shape] = []
    r_min, r_max = size * 0.08, size * 0.13
    for _ in range(1000):
        if len(shapes) == n:
            break
        r = rng.uniform(r_min, r_max)
        margin = r + size * 0.06
        cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
        if all(math.hypot(cx - s.cx, cy - s.cy) > r + s.r + size * 0.1 for s in shapes):
            shapes.append(Shape(rng.choice(kinds), rng.choice(list(COLORS)), cx, cy, r))
    if len(shapes) < n:
        raise RuntimeError(f"could not place {n} shapes on a {size}px image")
    return shapes


def polygon(shape: Shape) -> list[tuple[float, float]]:
    cx, cy, r = shape.cx, shape.cy, shape.r
    if shape.kind == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape.kind == "star":
        return [
            (
                cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    raise ValueError(shape.kind)


def render(shapes: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            k = s.r * 0.85
            draw.rectangle((s.cx - k, s.cy - k, s.cx + k, s.cy + k), fill=fill)
        else:
            draw.polygon(polygon(s), fill=fill)
    return image


def describe(shapes: list[Shape]) -> str:
    parts = [f"a {s.color} {s.kind}" for s in sorted(shapes, key=lambda s: s.cx)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_example(rng: random.Random, kind: str, size: int = 96) -> Example:
    """One question of the given type with its image(s) and its one right answer."""
    if kind == "box_shape":
        shapes = random_scene(rng, size, rng.randint(2, 4))
        target, color = rng.choice(shapes), rng.choice(PROMPT_COLORS)
        pad = size * 0.04
        x0, y0, x1, y1 = target.box
        box = [max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad)]
        image = draw_visual_prompts(render(shapes, size), {"type": "rectangle", "box": box, "color": color})
        return Example([image], f"What shape is inside the {color} rectangle?", target.kind, kind)
    if kind == "arrow_color":
        shapes = random_scene(rng, size, rng.randint(2, 4))
        target = rng.choice(shapes)
        length = size * 0.25
        for _ in range(100):  # a direction whose tail stays inside the picture
            angle = rng.uniform(0, 2 * math.pi)
            head = (
                target.cx + (target.r + 2) * math.cos(angle),
                target.cy + (target.r + 2) * math.sin(angle),
            )
            tail = (head[0] + length * math.cos(angle), head[1] + length * math.sin(angle))
            if all(1 <= v <= size - 1 for v in (*head, *tail)):
                break
        spec = {"type": "arrow", "points": [list(tail), list(head)], "color": rng.choice(PROMPT_COLORS)}
        image = draw_visual_prompts(render(shapes, size), spec)
        return Example([image], "What color is the shape the arrow points to?", target.color, kind)
    if kind == "count":
        asked = rng.choice(SHAPES)
        shapes = random_scene(rng, size, rng.randint(1, 4))
        n = sum(s.kind == asked for s in shapes)
        return Example([render(shapes, size)], f"How many {asked}s are there?", NUMBERS[n], kind)
    if kind == "caption":
        shapes = random_scene(rng, size, rng.randint(1, 3))
        return Example([render(shapes, size)], "Describe the image.", describe(shapes), kind)
    if kind == "which_image":
        asked = rng.choice(SHAPES)
        others = tuple(s for s in SHAPES if s != asked)
        first_has = rng.random() < 0.5
        with_it = random_scene(rng, size, rng.randint(1, 3))
        if not any(s.kind == asked for s in with_it):
            with_it[0] = Shape(asked, with_it[0].color, with_it[0].cx, with_it[0].cy, with_it[0].r)
        without = random_scene(rng, size, rng.randint(1, 3), kinds=others)
        images = [render(with_it, size), render(without, size)]
        if not first_has:
            images.reverse()
        answer = "the first" if first_has else "the second"
        return Example(images, f"Which image has a {asked}, the first or the second?", answer, kind)
    raise ValueError(
        f"unknown question type {kind!r}; known: {sorted({k for v in QUESTION_TYPES.values() for k in v})}"
    )


def write_dataset(
    folder: str | Path,
    rows: int,
    *,
    family: str = "vipllava",
    seed: int = 0,
    size: int = 96,
    name: str = "train.jsonl",
) -> Path:
    """rows questions, the question types of `family` in turn, as JSONL + PNGs; returns the JSONL path."""
    if family not in QUESTION_TYPES:
        raise ValueError(f"family must be one of {sorted(QUESTION_TYPES)}, got {family!r}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    kinds = QUESTION_TYPES[family]
    lines = []
    for i in range(rows):
        example = make_example(rng, kinds[i % len(kinds)], size)
        names = []
        for j, image in enumerate(example.images):
            names.append(f"images/{Path(name).stem}-{i:06d}-{j}.png")
            image.save(folder / names[-1])
        markers = "<image>\n" * len(names)
        lines.append(
            json.dumps(
                {
                    "id": i,
                    "type": example.kind,
                    "image": names if len(names) > 1 else names[0],
                    "conversations": [
                        {"from": "human", "value": markers + example.question},
                        {"from": "gpt", "value": example.answer},
                    ],
                }
            )
        )
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    print(write_dataset(args.out_dir, args.rows, family=args.family, seed=args.seed, size=args.size))


if __name__ == "__main__":
    main()
