"""A synthetic "shapes" world where every question has one checkable answer: pictures of a few coloured
shapes, visual prompts drawn on them, and questions about what the prompts point at.

    python -m vlmkit.demo.shapes OUT_DIR --rows 5000 --family vipllava --seed 0

writes OUT_DIR/train.jsonl (LLaVA conversation format) and the PNGs it refers to.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.visual_prompts import draw_visual_prompts

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
ARROW_COLORS = ("lime", "fuchsia", "aqua")  # an arrow's head sits on its shape: no colour a shape has
NUMBERS = ("zero", "one", "two", "three", "four")
CHUNK_ROWS = 250  # rows drawn from one seeded generator by `write_dataset`
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


GRID = 3  # scenes are a 3 x 3 grid of cells, at most one shape per cell (one 32-px patch each at 96 px)


def cell_of(shape: Shape, size: int) -> tuple[int, int]:
    """(row, column) of the grid cell holding the shape."""
    cell = size / GRID
    return int(shape.cy // cell), int(shape.cx // cell)


def random_scene(
    rng: random.Random,
    size: int,
    n: int,
    *,
    kinds: tuple[str, ...] = SHAPES,
    cells: list[tuple[int, int]] | None = None,
) -> list[Shape]:
    """n shapes in n distinct cells of a 3 x 3 grid (or in the given cells), each jittered inside its cell
    with room for a visual prompt around it."""
    if not 1 <= n <= GRID * GRID:
        raise ValueError(f"a scene holds 1 to {GRID * GRID} shapes, got {n}")
    cell = size / GRID
    chosen = cells if cells is not None else rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    shapes = []
    for row, col in chosen:
        r = rng.uniform(0.29, 0.33) * cell
        shift = cell * 0.04  # shapes sit near their cell's centre: a small model learns them in minutes
        cx = (col + 0.5) * cell + rng.uniform(-shift, shift)
        cy = (row + 0.5) * cell + rng.uniform(-shift, shift)
        shapes.append(Shape(rng.choice(kinds), rng.choice(list(COLORS)), cx, cy, r))
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


def describe(shapes: list[Shape], size: int = 96) -> str:
    """The shapes in reading order (row by row, left to right): "a red circle and a blue square"."""
    parts = [
        f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}"
        for s in sorted(shapes, key=lambda s: cell_of(s, size))
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def arrow_to(rng: random.Random, target: Shape, shapes: list[Shape], size: int) -> list[list[float]] | None:
    """An arrow from an empty neighbouring cell to the target's edge, or None when every neighbour is taken."""
    row, col = cell_of(target, size)
    taken = {cell_of(s, size) for s in shapes}
    free = [
        (row + dr, col + dc)
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if (dr or dc) and 0 <= row + dr < GRID and 0 <= col + dc < GRID and (row + dr, col + dc) not in taken
    ]
    if not free:
        return None
    cell = size / GRID
    r, c = rng.choice(free)
    jitter = cell * 0.1
    tail = ((c + 0.5) * cell + rng.uniform(-jitter, jitter), (r + 0.5) * cell + rng.uniform(-jitter, jitter))
    dx, dy = tail[0] - target.cx, tail[1] - target.cy
    norm = math.hypot(dx, dy)
    gap = target.r + size * 0.02
    head = (target.cx + dx / norm * gap, target.cy + dy / norm * gap)
    return [list(tail), list(head)]


def count_scene(rng: random.Random, size: int) -> tuple[str, list[Shape]]:
    """A counting question's shape and scene: every count of it from zero to three equally often, with other
    shapes around."""
    asked = rng.choice(SHAPES)
    n = rng.randint(0, 3)
    others = [rng.choice([k for k in SHAPES if k != asked]) for _ in range(rng.randint(int(n == 0), 4 - n))]
    kinds = [asked] * n + others
    rng.shuffle(kinds)
    scene = random_scene(rng, size, len(kinds))
    return asked, [Shape(k, s.color, s.cx, s.cy, s.r) for k, s in zip(kinds, scene, strict=True)]


def make_example(rng: random.Random, kind: str, size: int = 96) -> Example:
    """One question of the given type with its image(s) and its one right answer."""
    if kind == "box_shape":
        shapes = random_scene(rng, size, rng.randint(2, 4))
        target, color = rng.choice(shapes), rng.choice(PROMPT_COLORS)
        prompt = rng.choice(("rectangle", "ellipse"))
        pad = size * (0.03 if prompt == "rectangle" else 0.05)
        x0, y0, x1, y1 = target.box
        box = [max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad)]
        image = draw_visual_prompts(render(shapes, size), {"type": prompt, "box": box, "color": color})
        return Example([image], f"What shape is inside the {color} {prompt}?", target.kind, kind)
    if kind == "arrow_color":
        for _ in range(100):
            shapes = random_scene(rng, size, rng.randint(2, 4))
            target = rng.choice(shapes)
            points = arrow_to(rng, target, shapes, size)
            if points is not None:
                break
        spec = {"type": "arrow", "points": points, "color": rng.choice(ARROW_COLORS)}
        image = draw_visual_prompts(render(shapes, size), spec)
        return Example([image], "What color is the shape the arrow points to?", target.color, kind)
    if kind == "count":
        asked, shapes = count_scene(rng, size)
        n = sum(s.kind == asked for s in shapes)
        return Example([render(shapes, size)], f"How many {asked}s are there?", NUMBERS[n], kind)
    if kind == "caption":
        shapes = random_scene(rng, size, rng.randint(1, 3))
        return Example([render(shapes, size)], "Describe the image.", describe(shapes, size), kind)
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


EXAMPLES = Path(__file__).parent / "examples"


def handmade() -> dict:
    """The hand-made held-out set (examples/handmade.json): scenes and questions with their answers."""
    return json.loads((EXAMPLES / "handmade.json").read_text())


def draw_handmade(spec: list[list], size: int) -> Image.Image:
    """A scene from [colour, shape, row, column] entries, each shape centred in its cell."""
    cell = size / GRID
    return render(
        [
            Shape(kind, color, (col + 0.5) * cell, (row + 0.5) * cell, 0.31 * cell)
            for color, kind, row, col in spec
        ],
        size,
    )


def write_handmade(folder: str | Path = EXAMPLES) -> list[Path]:
    """Draw the hand-made scenes as PNGs next to handmade.json (or into folder)."""
    data = handmade()
    paths = []
    for name, spec in data["scenes"].items():
        paths.append(Path(folder) / f"{name}.png")
        draw_handmade(spec, data["size"]).save(paths[-1])
    return paths


def write_dataset(
    folder: str | Path,
    rows: int,
    *,
    family: str = "vipllava",
    seed: int = 0,
    size: int = 96,
    name: str = "train.jsonl",
    sizes: tuple[int, ...] | None = None,
    kinds: tuple[str, ...] | None = None,
    make: Callable[[random.Random, str], Example] | None = None,
    workers: int = 0,
) -> Path:
    """rows questions, the question types of `family` in turn (or `kinds` in turn: repeat a type to weight
    it), as JSONL + PNGs; returns the JSONL path. sizes: draw each picture at one of these sizes, picked at
    random (default: `size`), so that a model sees pictures resized to its input as users send them.
    make: another world's example maker, make(rng, kind), which picks its own picture sizes. Rows are drawn
    in chunks of CHUNK_ROWS, each from its own seeded generator, so `workers` processes give the same
    files as one."""
    if family not in QUESTION_TYPES:
        raise ValueError(f"family must be one of {sorted(QUESTION_TYPES)}, got {family!r}")
    if kinds is not None and not (kinds and set(kinds) <= set(QUESTION_TYPES[family])):
        raise ValueError(f"kinds for {family} must be among {QUESTION_TYPES[family]}, got {kinds}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    job = partial(
        _write_rows,
        folder=folder,
        rows=rows,
        seed=seed,
        size=size,
        name=name,
        sizes=sizes,
        kinds=kinds or QUESTION_TYPES[family],
        make=make,
    )
    chunks = range(0, rows, CHUNK_ROWS)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(job, chunks))
    else:
        parts = [job(start) for start in chunks]
    lines = [line for part in parts for line in part]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_rows(
    start: int,
    *,
    folder: Path,
    rows: int,
    seed: int,
    size: int,
    name: str,
    sizes: tuple[int, ...] | None,
    kinds: tuple[str, ...],
    make: Callable[[random.Random, str], Example] | None,
) -> list[str]:
    """Rows start .. start + CHUNK_ROWS of `write_dataset` (their PNGs written); their JSONL lines."""
    rng = random.Random(seed * 1_000_003 + start // CHUNK_ROWS)
    lines = []
    for i in range(start, min(rows, start + CHUNK_ROWS)):
        kind = kinds[i % len(kinds)]
        if make is not None:
            example = make(rng, kind)
        else:
            example = make_example(rng, kind, rng.choice(sizes) if sizes else size)
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
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", help="where the dataset goes")
    ap.add_argument("--handmade", action="store_true", help="redraw the hand-made example scenes instead")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    if args.handmade:
        print("\n".join(str(p) for p in write_handmade()))
        return
    if args.out_dir is None:
        ap.error("give out_dir (or --handmade)")
    print(write_dataset(args.out_dir, args.rows, family=args.family, seed=args.seed, size=args.size))


if __name__ == "__main__":
    main()
