"""LLaVA-NeXT's "anyres" tiling: the grid a picture's size chooses, its tiles, and how many feature cells
of the grid are the picture and not padding.

A picture of size (H, W) picks the grid pinpoint (h, w) that keeps most of its pixels and wastes least
space, is resized to fit inside (h, w) keeping its aspect ratio, centred on a black canvas of that size and
cut into square tiles. A "base" view, the whole picture squashed to one tile, comes first. The model later
drops the feature cells that fall on the canvas's padding (`unpadded_box`), so the number of image tokens
depends on the picture's size, which travels with the pixels as `image_sizes`.

The geometry is shared by the processor (how many `<image>` tokens a picture takes) and the model (which
cells of the feature grid it keeps); both must agree exactly, and both agree with transformers'.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmkit.image_processor import ImageProcessor
from vlmkit.images import DEFAULT_MAX_PIXELS, ImageInput, check_image_size

# The grid pinpoints (height, width) of the published LLaVA-v1.6 checkpoints, the reference's default.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
PROCESSOR_TYPES = ("LlavaNextImageProcessor",)  # with an optional "Pil" / "Fast" backend suffix


def parse_pinpoints(value: Any, *, tile: int | None = None) -> tuple[tuple[int, int], ...]:
    """`image_grid_pinpoints` as (height, width) pairs of positive ints; with `tile`, each must be a multiple
    of it (the model reshapes the tiles' features into that grid)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width], got {value!r}")
    out = []
    for pair in value:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise ValueError(
                f"image_grid_pinpoints entries must be [height, width] positive ints, got {pair!r}"
            )
        if tile is not None and (pair[0] % tile or pair[1] % tile):
            raise ValueError(
                f"image_grid_pinpoints entry {list(pair)} is not a grid of whole {tile}-pixel tiles"
            )
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)


def best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) for a picture of `size` (height, width): the most of the picture's pixels
    kept after fitting it inside, then the least area left empty; the first such pinpoint on a tie."""
    height, width = size
    best, kept_best, wasted_best = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - kept
        if kept > kept_best or (kept == kept_best and wasted < wasted_best):
            best, kept_best, wasted_best = (h, w), kept, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits a {width}x{height} picture (pinpoints {list(pinpoints)})")
    return best


def fitted_size(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """(height, width) of a picture of `size` resized to fit inside `target`, aspect ratio kept (the side
    that limits the scale is filled exactly, the other rounded up, at most the target's)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    # rounded up from the float product, as the reference rounds (an exact fraction can differ by one)
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles a picture of `size` is cut into."""
    h, w = best_resolution(size, pinpoints)
    return h // tile, w // tile


def tile_count(size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """The views of a picture: the base view and the tiles of its grid."""
    rows, cols = grid_shape(size, pinpoints, tile)
    return 1 + rows * cols


def unpadded_box(size: Sequence[int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the cells of a rows x cols feature grid that show the picture of `size`
    (height, width) rather than the canvas's padding: the padding is split evenly over both sides of the
    side that the picture does not fill."""
    height, width = size
    if width / height > cols / rows:  # wider than the grid: padding above and below
        shown = int(round(height * (cols / width), 7))
        pad = (rows - shown) // 2
        return pad, rows - pad, 0, cols
    shown = int(round(width * (rows / height), 7))
    pad = (cols - shown) // 2
    return 0, rows, pad, cols - pad


def grid_tokens(size: Sequence[int], rows: int, cols: int) -> int:
    """Tokens of the grid part of a picture: the cells kept by `unpadded_box`, plus one newline per row."""
    top, bottom, left, right = unpadded_box(size, rows, cols)
    return (bottom - top) * (right - left + 1)


# ---------------------------------------------------------------------------------------------
# The image processor
# ---------------------------------------------------------------------------------------------


@dataclass
class AnyResImageProcessor:
    """LlavaNextImageProcessor (its PIL backend): every picture becomes its base view and its tiles, each
    finished (resize, center crop, rescale, normalize) as a CLIP processor of the same settings finishes an
    image; the pictures' views are zero-padded to the largest count, and `image_sizes` holds each picture's
    (height, width).

        >>> proc = AnyResImageProcessor.from_dict(json.load(open("preprocessor_config.json")))
        >>> pixel_values, image_sizes = proc.tiles([Image.new("RGB", (800, 600))])
        >>> pixel_values.shape, image_sizes.tolist()
        (torch.Size([1, 5, 3, 336, 336]), [[600, 800]])
    """

    views: ImageProcessor  # how each view is finished (kind "clip")
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS

    def __post_init__(self) -> None:
        if self.views.kind != "clip" or self.views.do_pad:
            raise ValueError("the views of an anyres picture are finished by a CLIP processor without do_pad")
        size = self.views.size
        if "height" in size:
            self.base_size = (size["height"], size["width"])
        elif set(size) == {"shortest_edge"}:
            self.base_size = (size["shortest_edge"], size["shortest_edge"])
        else:
            raise ValueError(f"LLaVA-NeXT's size must be a shortest_edge or a height and width, got {size}")
        self.tile = self.views.crop_size["height"]  # the reference cuts tiles of the crop's height
        self.image_grid_pinpoints = parse_pinpoints(self.image_grid_pinpoints, tile=self.tile)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnyResImageProcessor:
        """Read a `preprocessor_config.json` (or a transformers-5 `processor_config.json`, or its nested
        "image_processor" entry) of a LlavaNextImageProcessor; keys left out take the reference defaults."""
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]
        type_name = d.get("image_processor_type")
        base_name = re.sub(r"(Pil|Fast)$", "", type_name) if isinstance(type_name, str) else None
        if base_name not in PROCESSOR_TYPES:
            raise ValueError(
                f"unsupported image_processor_type {type_name!r} for LLaVA-NeXT; expected "
                f"{' or '.join(PROCESSOR_TYPES)} (optionally ending in 'Pil' or 'Fast')"
            )
        # do_pad here pads the pictures' view counts to one (always done); it is not CLIP's padding
        views = ImageProcessor.from_dict({**d, "image_processor_type": "CLIPImageProcessor", "do_pad": None})
        pinpoints = d.get("image_grid_pinpoints")
        return cls(views, DEFAULT_PINPOINTS if pinpoints is None else pinpoints)

    def tiles(
        self,
        images: Sequence[ImageInput],
        *,
        allow_remote: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (N, V, 3, h, w) float32, each picture's views zero-padded to the largest count V, and
        image_sizes (N, 2) long, each picture's (height, width)."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("tiles() takes a non-empty list of images")
        views, sizes = [], []
        for source in images:
            image = self.views.load(source, allow_remote=allow_remote, max_pixels=max_pixels)
            views.append(self.picture_views(image, max_pixels=max_pixels))
            sizes.append((image.height, image.width))
        most = max(len(v) for v in views)
        pixels = np.zeros((len(views), most, *views[0][0].shape), dtype=np.float32)
        for i, picture in enumerate(views):
            pixels[i, : len(picture)] = np.stack(picture)
        return torch.from_numpy(pixels), torch.tensor(sizes, dtype=torch.long)

    def picture_views(self, image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
        """The base view and the tiles (row by row) of one RGB picture, each finished: (3, h, w) float32."""
        size = (image.height, image.width)
        target = best_resolution(size, self.image_grid_pinpoints)
        fit_h, fit_w = fitted_size(size, target)
        check_image_size(fit_w, fit_h, max_pixels, f"the resized image of {image.width}x{image.height}")
        fitted = np.asarray(image.resize((fit_w, fit_h), resample=self.views.resample))
        canvas = np.zeros((*target, 3), dtype=np.uint8)  # (H, W, 3): black padding, centred picture
        top, left = (target[0] - fit_h) // 2, (target[1] - fit_w) // 2
        canvas[top : top + fit_h, left : left + fit_w] = fitted
        t = self.tile
        tiles = [
            Image.fromarray(canvas[y : y + t, x : x + t])
            for y in range(0, target[0], t)
            for x in range(0, target[1], t)
        ]
        base = image.resize(self.base_size[::-1], resample=self.views.resample)
        return [self.views.finish(view, max_pixels=max_pixels) for view in (base, *tiles)]
