"""Visual prompts as ViP-LLaVA reads them: boxes, ellipses, triangles, points, arrows, scribbles and masks
drawn onto the image in pixel coordinates, then referred to in the text ("the object in the red box").

    image = draw_visual_prompts(image, [{"type": "rectangle", "box": [40, 30, 200, 180], "color": "red"},
                                        {"type": "arrow", "points": [[10, 10], [120, 90]], "color": "lime"}])

Each spec takes optional "color" (a named colour of the ViP-LLaVA release, "#rrggbb" or [r, g, b]), "alpha"
(0..1, composited over the image) and "width" (pixels; by default scaled with the image size). Drawing is
deterministic; a "seed" (per spec or for the call) adds the hand-drawn wobble the release's training data
has, reproducibly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from vlmkit import safejson

# The colours of the ViP-LLaVA release.
COLORS: dict[str, tuple[int, int, int]] = {
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
KINDS = ("rectangle", "ellipse", "triangle", "point", "arrow", "scribble", "mask_contour", "mask")
DEFAULT_ALPHA = {"mask": 0.5}


def default_width(image: Image.Image) -> int:
    """Stroke width that reads the same on any image size: about 1% of the shorter side, at least 2 px."""
    return max(2, round(min(image.size) / 100))


def parse_color(value: Any) -> tuple[int, int, int]:
    if isinstance(value, str):
        name = value.strip().lower()
        if name in COLORS:
            return COLORS[name]
        if name.startswith("#") and len(name) == 7:
            try:
                return tuple(int(name[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
            except ValueError:
                pass
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(c, int) and 0 <= c <= 255 for c in value)
    ):
        return tuple(value)  # type: ignore[return-value]
    raise ValueError(
        f"color {value!r} is not a known colour; use one of {sorted(COLORS)}, '#rrggbb' or [r, g, b]"
    )


def _points(spec: dict, key: str, n: int | None, image: Image.Image, kind: str) -> list[tuple[float, float]]:
    raw = spec.get(key)
    if not isinstance(raw, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(c, (int, float)) for c in p)
        for p in raw
    ):
        raise ValueError(f"{kind}: '{key}' must be a list of [x, y] pairs, got {raw!r}")
    if n is not None and len(raw) != n:
        raise ValueError(f"{kind}: '{key}' needs exactly {n} points, got {len(raw)}")
    W, H = image.size
    for x, y in raw:
        if not (0 <= x <= W and 0 <= y <= H):
            raise ValueError(f"{kind}: point [{x}, {y}] in '{key}' is outside the {W}x{H} image")
    return [(float(x), float(y)) for x, y in raw]


def _box(spec: dict, image: Image.Image, kind: str) -> tuple[float, float, float, float]:
    box = spec.get("box")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(c, (int, float)) for c in box)
    ):
        raise ValueError(f"{kind}: 'box' must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(c) for c in box)
    W, H = image.size
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(
            f"{kind}: 'box' {list(box)} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H}"
        )
    return x0, y0, x1, y1


def _area(points: list[tuple[float, float]]) -> float:
    return 0.5 * abs(
        sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True))
    )


def _wobble(
    points: list[tuple[float, float]], rng: np.random.Generator | None, amount: float, image: Image.Image
) -> list[tuple[float, float]]:
    if rng is None:
        return points
    W, H = image.size
    noise = rng.normal(0.0, amount, size=(len(points), 2))
    return [
        (min(max(x + dx, 0), W), min(max(y + dy, 0), H))
        for (x, y), (dx, dy) in zip(points, noise, strict=True)
    ]


def _mask_image(spec: dict, image: Image.Image, kind: str) -> Image.Image:
    """A binary ("L", 0/255) mask of the image's size from 'polygon' or 'mask' (an image or array)."""
    if "polygon" in spec:
        polygon = _points(spec, "polygon", None, image, kind)
        if len(polygon) < 3 or _area(polygon) == 0:
            raise ValueError(f"{kind}: 'polygon' must enclose an area (3 or more points not on one line)")
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).polygon(polygon, fill=255)
        return mask
    raw = spec.get("mask")
    if raw is None:
        raise ValueError(
            f"{kind}: needs 'polygon' ([[x, y], ...]) or 'mask' (an image the size of the picture)"
        )
    mask = (
        Image.fromarray(np.asarray(raw).astype(bool).astype(np.uint8) * 255)
        if isinstance(raw, np.ndarray)
        else raw.convert("L")
        if isinstance(raw, Image.Image)
        else None
    )
    if mask is None:
        raise ValueError(f"{kind}: 'mask' must be a PIL image or a numpy array, got {type(raw).__name__}")
    if mask.size != image.size:
        raise ValueError(
            f"{kind}: 'mask' is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}"
        )
    mask = mask.point(lambda v: 255 if v else 0)
    if not mask.getbbox():
        raise ValueError(f"{kind}: 'mask' is empty")
    return mask


SPEC_FIELDS = frozenset(
    {"type", "box", "points", "point", "polygon", "mask", "color", "alpha", "width", "seed"}
)


def draw_prompt(image: Image.Image, spec: dict[str, Any], *, seed: int | None = None) -> Image.Image:
    """One visual prompt drawn onto an RGB image (a new image is returned)."""
    if not isinstance(spec, dict):
        raise ValueError(f"a visual prompt must be a JSON object, got {spec!r}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ValueError(f"type {kind!r} is not a visual prompt kind; use one of {list(KINDS)}")
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise ValueError(f"{kind}: unknown fields {sorted(unknown)}")
    color = parse_color(spec.get("color", "red"))
    alpha = spec.get("alpha", DEFAULT_ALPHA.get(kind, 1.0))
    if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"{kind}: 'alpha' must be in (0, 1], got {alpha!r}")
    width = spec.get("width", default_width(image))
    widest = max(image.size)  # a wider stroke covers nothing more, and drawing it would take minutes
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or not 0 < width <= widest
    ):
        raise ValueError(
            f"{kind}: 'width' must be a number of pixels in (0, {widest}] (the picture's longer side), got {width!r}"
        )
    width = max(1, round(width))
    seed = spec.get("seed", seed)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"{kind}: 'seed' must be an integer in [0, 2**63), got {seed!r}")
    rng = np.random.default_rng(seed) if seed is not None else None
    base = image.convert("RGB")
    layer = _coverage(spec, kind, base, width, rng)
    if not layer.getbbox():
        raise ValueError(f"{kind}: the prompt covers no pixel of the image")
    coverage = layer.point(lambda v: round(v * alpha))
    return Image.composite(Image.new("RGB", base.size, color), base, coverage)


def _coverage(
    spec: dict[str, Any], kind: str, base: Image.Image, width: int, rng: np.random.Generator | None
) -> Image.Image:
    """Where the prompt covers the image: an "L" layer of its size (255: covered)."""
    if kind in ("mask_contour", "mask"):
        mask = _mask_image(spec, base, kind)
        if kind == "mask":
            return mask
        inner = mask.filter(ImageFilter.MinFilter(2 * (width // 2) + 1))
        return ImageChops.subtract(mask, inner)
    layer = Image.new("L", base.size, 0)
    draw = ImageDraw.Draw(layer)
    jitter = width / 2
    if kind in ("rectangle", "ellipse"):
        x0, y0, x1, y1 = _box(spec, base, kind)
        if kind == "rectangle":
            corners = _wobble([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], rng, jitter, base)
            draw.line([*corners, corners[0]], fill=255, width=width, joint="curve")
        else:
            draw.ellipse([x0, y0, x1, y1], outline=255, width=width)
    elif kind == "triangle":
        points = _points(spec, "points", 3, base, kind)
        if _area(points) == 0:
            raise ValueError("triangle: the 3 'points' lie on one line")
        points = _wobble(points, rng, jitter, base)
        draw.line([*points, points[0]], fill=255, width=width, joint="curve")
    elif kind == "point":
        if "point" not in spec:
            raise ValueError("point: needs 'point': [x, y]")
        ((x, y),) = _points({"point": [spec["point"]]}, "point", 1, base, kind)
        r = max(2.0, 1.5 * width)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif kind == "arrow":
        _draw_arrow(draw, _points(spec, "points", 2, base, kind), width)
    else:  # scribble
        points = _points(spec, "points", None, base, kind)
        if len(points) < 2 or len(set(points)) < 2:
            raise ValueError("scribble: 'points' needs at least 2 different points")
        draw.line(_wobble(points, rng, jitter, base), fill=255, width=width, joint="curve")
    return layer


def _draw_arrow(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: int) -> None:
    """A shaft from the tail to the base of a triangular head whose tip is the head point."""
    (tx, ty), (hx, hy) = points
    length = math.hypot(hx - tx, hy - ty)
    if length < 2 * width:
        raise ValueError(
            f"arrow: tail and head are {length:.1f} px apart; they must be at least {2 * width} px apart"
        )
    ux, uy = (hx - tx) / length, (hy - ty) / length
    head = min(length / 2, 4 * width)
    base_x, base_y = hx - ux * head, hy - uy * head
    draw.line([(tx, ty), (base_x, base_y)], fill=255, width=width)
    draw.polygon(
        [
            (hx, hy),
            (base_x - uy * head / 2, base_y + ux * head / 2),
            (base_x + uy * head / 2, base_y - ux * head / 2),
        ],
        fill=255,
    )


def draw_visual_prompts(image: Image.Image, prompts: Any, *, seed: int | None = None) -> Image.Image:
    """Draw a visual prompt, a list of them, or their JSON text onto an image, in order."""
    if isinstance(prompts, str):
        try:
            prompts = safejson.loads(prompts)
        except ValueError as e:
            raise ValueError(f"visual prompt is not valid JSON: {e}") from e
    if isinstance(prompts, dict):
        prompts = [prompts]
    if not isinstance(prompts, list):
        raise ValueError(
            f"visual prompts must be a JSON object or a list of them, got {type(prompts).__name__}"
        )
    out = image.convert("RGB")
    for i, spec in enumerate(prompts):
        try:
            out = draw_prompt(out, spec, seed=None if seed is None else seed + i)
        except ValueError as e:
            raise ValueError(f"visual prompt {i}: {e}") from None
    return out
