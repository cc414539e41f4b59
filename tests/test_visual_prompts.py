"""Visual prompts: the pixels each kind draws, colours, alpha, widths, seeds, and every invalid spec."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmkit.visual_prompts import COLORS, default_width, draw_visual_prompts

W, H = 200, 160


def canvas() -> Image.Image:
    return Image.new("RGB", (W, H), (128, 128, 128))


def px(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return img.getpixel((x, y))


def changed(img: Image.Image) -> np.ndarray:
    return (np.asarray(img).astype(int) != 128).any(axis=-1)


def test_rectangle_outline_not_inside():
    img = draw_visual_prompts(
        canvas(), {"type": "rectangle", "box": [40, 30, 160, 130], "color": "red", "width": 4}
    )
    assert (
        px(img, 40, 80) == COLORS["red"]
        and px(img, 100, 30) == COLORS["red"]
        and px(img, 160, 100) == COLORS["red"]
    )
    assert px(img, 100, 80) == (128, 128, 128)  # the inside stays the photo
    assert px(img, 10, 10) == (128, 128, 128)


def test_ellipse_triangle_point_scribble():
    img = draw_visual_prompts(
        canvas(), {"type": "ellipse", "box": [40, 30, 160, 130], "color": "lime", "width": 3}
    )
    assert px(img, 100, 31) == COLORS["lime"] and px(img, 41, 80) == COLORS["lime"]
    assert px(img, 42, 32) == (128, 128, 128) and px(img, 100, 80) == (
        128,
        128,
        128,
    )  # corner of the box: not drawn
    img = draw_visual_prompts(
        canvas(),
        {"type": "triangle", "points": [[20, 140], [100, 20], [180, 140]], "color": "blue", "width": 3},
    )
    assert px(img, 100, 140) == COLORS["blue"] and px(img, 100, 100) == (128, 128, 128)
    img = draw_visual_prompts(canvas(), {"type": "point", "point": [50, 60], "color": "yellow", "width": 4})
    assert px(img, 50, 60) == COLORS["yellow"] and px(img, 54, 60) == COLORS["yellow"]
    assert px(img, 60, 60) == (128, 128, 128)
    img = draw_visual_prompts(
        canvas(),
        {"type": "scribble", "points": [[10, 10], [60, 40], [120, 20]], "color": "fuchsia", "width": 3},
    )
    assert px(img, 10, 10) == COLORS["fuchsia"] and px(img, 60, 40) == COLORS["fuchsia"]
    assert px(img, 35, 25) == COLORS["fuchsia"]  # along the stroke


def test_arrow_has_a_head_at_the_head_end():
    img = draw_visual_prompts(
        canvas(), {"type": "arrow", "points": [[20, 80], [180, 80]], "color": "aqua", "width": 3}
    )
    drawn = changed(img)
    head_rows = drawn[:, 170].sum()
    tail_rows = drawn[:, 40].sum()
    assert px(img, 30, 80) == COLORS["aqua"] and px(img, 179, 80) == COLORS["aqua"]
    assert head_rows > 2 * tail_rows  # the head is wider than the shaft


def test_masks_filled_and_contour():
    poly = [[50, 40], [150, 40], [150, 120], [50, 120]]
    filled = draw_visual_prompts(canvas(), {"type": "mask", "polygon": poly, "color": "orange"})
    blended = tuple(round(128 + (c - 128) * 0.5) for c in COLORS["orange"])  # default alpha 0.5 for masks
    assert all(abs(a - b) <= 1 for a, b in zip(px(filled, 100, 80), blended, strict=True))
    assert px(filled, 20, 20) == (128, 128, 128)
    contour = draw_visual_prompts(
        canvas(), {"type": "mask_contour", "polygon": poly, "color": "purple", "width": 4}
    )
    assert px(contour, 51, 80) == COLORS["purple"] and px(contour, 100, 80) == (128, 128, 128)
    array = np.zeros((H, W), dtype=np.uint8)
    array[60:100, 80:120] = 1
    from_array = draw_visual_prompts(canvas(), {"type": "mask", "mask": array, "color": "gold", "alpha": 1.0})
    assert px(from_array, 100, 80) == COLORS["gold"] and px(from_array, 70, 80) == (128, 128, 128)


def test_alpha_hex_and_rgb_colours():
    img = draw_visual_prompts(
        canvas(), {"type": "point", "point": [50, 50], "color": "#00ff00", "alpha": 0.25, "width": 4}
    )
    assert px(img, 50, 50) == (96, 160, 96)
    img = draw_visual_prompts(canvas(), {"type": "point", "point": [50, 50], "color": [10, 20, 30]})
    assert px(img, 50, 50) == (10, 20, 30)


def test_width_scales_with_the_image():
    assert default_width(Image.new("RGB", (100, 100))) == 2
    assert default_width(Image.new("RGB", (1000, 800))) == 8
    big = draw_visual_prompts(
        Image.new("RGB", (1000, 800), (128, 128, 128)), {"type": "rectangle", "box": [100, 100, 900, 700]}
    )
    assert changed(big)[400, 96:105].sum() >= 7


def test_deterministic_unless_seeded():
    spec = {"type": "scribble", "points": [[10, 10], [60, 40], [120, 20], [180, 100]]}
    a, b = draw_visual_prompts(canvas(), spec), draw_visual_prompts(canvas(), spec)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    s1, s1b, s2 = (draw_visual_prompts(canvas(), spec, seed=s) for s in (1, 1, 2))
    assert np.array_equal(np.asarray(s1), np.asarray(s1b))
    assert not np.array_equal(np.asarray(s1), np.asarray(s2)) and not np.array_equal(
        np.asarray(s1), np.asarray(a)
    )


def test_several_prompts_and_json_text():
    text = '[{"type": "rectangle", "box": [10, 10, 50, 50], "color": "red"}, {"type": "point", "point": [150, 100], "color": "blue"}]'
    img = draw_visual_prompts(canvas(), text)
    assert px(img, 10, 30) == COLORS["red"] and px(img, 150, 100) == COLORS["blue"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "hexagon"}, "type 'hexagon' is not a visual prompt kind"),
        (
            {"type": "rectangle", "box": [10, 10, 50, 50], "color": "teal"},
            "color 'teal' is not a known colour",
        ),
        ({"type": "rectangle", "box": [10, 10, 250, 50]}, r"'box' .* must satisfy"),
        ({"type": "rectangle", "box": [50, 10, 50, 50]}, "must satisfy 0 <= x0 < x1"),
        ({"type": "rectangle", "box": [1, 2, 3]}, r"'box' must be \[x0, y0, x1, y1\]"),
        ({"type": "ellipse"}, "'box' must be"),
        ({"type": "triangle", "points": [[0, 0], [50, 50], [100, 100]]}, "lie on one line"),
        ({"type": "triangle", "points": [[0, 0], [50, 50]]}, "needs exactly 3 points"),
        ({"type": "point", "point": [500, 10]}, "outside the 200x160 image"),
        ({"type": "point"}, "needs 'point'"),
        ({"type": "arrow", "points": [[10, 10], [11, 11]]}, "tail and head are"),
        ({"type": "scribble", "points": [[10, 10]]}, "at least 2 different points"),
        ({"type": "mask", "polygon": [[10, 10], [20, 20]]}, "'polygon' must enclose an area"),
        ({"type": "mask"}, "needs 'polygon'"),
        ({"type": "mask", "mask": np.zeros((10, 10))}, "'mask' is 10x10 but the image is 200x160"),
        ({"type": "mask", "mask": np.zeros((H, W))}, "'mask' is empty"),
        ({"type": "point", "point": [10, 10], "alpha": 0}, r"'alpha' must be in \(0, 1\]"),
        ({"type": "point", "point": [10, 10], "width": -1}, "'width' must be a number of pixels in"),
        ({"type": "point", "point": [10, 10], "radius": 3}, r"unknown fields \['radius'\]"),
        ("not json", "not valid JSON"),
        (42, "a JSON object or a list"),
    ],
)
def test_invalid_specs_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        draw_visual_prompts(canvas(), spec)
