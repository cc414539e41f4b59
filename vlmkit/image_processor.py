"""Image preprocessing for the CLIP vision tower (LLaVA-1.5, ViP-LLaVA) and for IDEFICS: `ImageProcessor`
reads a `preprocessor_config.json` and gives the same `pixel_values` as the transformers PIL image
processors (CLIPImageProcessor, LlavaImageProcessor, IdeficsImageProcessor):

    >>> processor = ImageProcessor.from_dict(json.load(open("preprocessor_config.json")))
    >>> processor.preprocess(["cat.png", Image.new("RGB", (640, 480))]).shape
    torch.Size([2, 3, 336, 336])
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmkit.configs import known_fields
from vlmkit.images import DEFAULT_MAX_PIXELS, ImageInput, check_image_size, is_encoded, load_image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IDEFICS_STANDARD_MEAN = OPENAI_CLIP_MEAN  # IDEFICS publishes its own constants; they equal CLIP's
IDEFICS_STANDARD_STD = OPENAI_CLIP_STD

BICUBIC = int(Image.Resampling.BICUBIC)
_RESAMPLE_CODES = {int(r) for r in Image.Resampling}
# transformers class names (without their "Pil"/"Fast" backend suffix) -> (kind, pads to square)
_PROCESSOR_TYPES = {
    "CLIPImageProcessor": ("clip", False),
    "CLIPFeatureExtractor": ("clip", False),
    "LlavaImageProcessor": ("clip", True),
    "IdeficsImageProcessor": ("idefics", False),
}
_KIND_FIELDS = {
    "clip": {"do_pad"},
    "idefics": {"image_size", "image_num_channels"},
}
_SIZE_KEY_SETS = (
    {"height", "width"},
    {"shortest_edge"},
    {"shortest_edge", "longest_edge"},
    {"max_height", "max_width"},
)


# -- preprocessing ---------------------------------------------------------------------------------


@dataclass
class ImageProcessor:
    """The preprocessing of a `preprocessor_config.json`, in two flavours.

    `kind="clip"`: CLIPImageProcessor / LlavaImageProcessor (LLaVA-1.5, ViP-LLaVA): resize the shortest edge,
    center crop, rescale, normalize; `do_pad` first pads to a square of the mean colour, as LLaVA does.
    `kind="idefics"`: IdeficsImageProcessor: resize to `image_size` x `image_size`, rescale, normalize.
    Fields left as None take that kind's reference defaults. `size` may also be given as an int (the
    shortest edge for "clip", a square for "idefics") or as [height, width]; `crop_size` as an int.

        >>> ImageProcessor(kind="clip", size={"shortest_edge": 336}, crop_size=336).preprocess([img]).shape
        torch.Size([1, 3, 336, 336])
    """

    kind: str
    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict[str, int] | None = None
    resample: int = BICUBIC  # a PIL resampling code
    do_center_crop: bool | None = None
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    do_pad: bool = False  # "clip" only: pad to a square of the mean colour before resizing
    image_size: int | None = None  # "idefics" only: alias of size = {"height": n, "width": n}
    image_num_channels: int = 3  # "idefics" only, kept for the round trip

    def __post_init__(self) -> None:
        if self.kind not in _KIND_FIELDS:
            raise ValueError(f"kind must be 'clip' or 'idefics', got {self.kind!r}")
        is_clip = self.kind == "clip"
        if self.image_size is not None:
            if is_clip:
                raise ValueError("image_size is an IDEFICS field; give kind 'clip' a size instead")
            self.size = {"height": self.image_size, "width": self.image_size}
        default_size: Any = {"shortest_edge": 224} if is_clip else {"height": 224, "width": 224}
        self.size = _size_dict(
            self.size if self.size is not None else default_size, "size", square=not is_clip
        )
        if not is_clip and "height" in self.size:
            self.image_size = self.size["height"]
        if self.do_center_crop is None:
            self.do_center_crop = is_clip
        if self.crop_size is None and is_clip:
            self.crop_size = {"height": 224, "width": 224}
        if self.crop_size is not None:
            self.crop_size = _size_dict(self.crop_size, "crop_size", square=True)
            if set(self.crop_size) != {"height", "width"}:
                raise ValueError(f"crop_size needs 'height' and 'width', got {self.crop_size}")
        elif self.do_center_crop:
            raise ValueError("do_center_crop is set but crop_size is not")
        self.image_mean = _channel_values(
            self.image_mean if self.image_mean is not None else OPENAI_CLIP_MEAN, "image_mean"
        )
        self.image_std = _channel_values(
            self.image_std if self.image_std is not None else OPENAI_CLIP_STD, "image_std"
        )
        if 0.0 in self.image_std:
            raise ValueError(f"image_std has a zero: {self.image_std}")
        if self.resample not in _RESAMPLE_CODES:
            raise ValueError(
                f"resample must be a PIL resampling code {sorted(_RESAMPLE_CODES)}, got {self.resample}"
            )
        if self.do_pad and not is_clip:
            raise ValueError("do_pad (pad to square) is a LLaVA option; kind 'idefics' has none")
        if self.do_pad and not all(0 <= int(m * 255) <= 255 for m in self.image_mean):
            raise ValueError(
                f"do_pad pads with the mean colour, which needs image_mean in [0, 1]: {self.image_mean}"
            )
        if self.image_num_channels != 3:
            raise ValueError(f"image_num_channels must be 3, got {self.image_num_channels}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessor:
        """Read a `preprocessor_config.json` (or a transformers-5 `processor_config.json`, or its nested
        "image_processor" entry). The flavour comes from "image_processor_type"; unknown keys are ignored and
        keys left out (or null) take the reference defaults."""
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]
        type_name = d.get("image_processor_type") or d.get("feature_extractor_type")
        base_name = re.sub(r"(Pil|Fast)$", "", type_name) if isinstance(type_name, str) else None
        if base_name not in _PROCESSOR_TYPES:
            raise ValueError(
                f"unsupported image_processor_type {type_name!r}; expected one of {sorted(_PROCESSOR_TYPES)} "
                "(optionally ending in 'Pil' or 'Fast')"
            )
        kind, pads_to_square = _PROCESSOR_TYPES[base_name]
        other_kind = next(k for k in _KIND_FIELDS if k != kind)
        values = {
            k: v
            for k, v in known_fields(cls, d).items()
            if v is not None and k != "kind" and k not in _KIND_FIELDS[other_kind]
        }
        if values.get("do_pad") and not pads_to_square:
            # CLIPImageProcessor's do_pad pads a batch to its largest image, which changes nothing when
            # every image leaves at the same size; it is not LLaVA's pad-to-square.
            processor = cls(kind=kind, **{**values, "do_pad": False})
            if processor._fixed_output_size() is None:
                raise ValueError(
                    f"{base_name} with do_pad and images of varying output size (batch padding) is not supported"
                )
            return processor
        return cls(kind=kind, **values)

    def to_dict(self) -> dict[str, Any]:
        """A `preprocessor_config.json` that transformers' AutoImageProcessor loads back."""
        if self.kind == "idefics":
            type_name = "IdeficsImageProcessor"
        else:
            type_name = "LlavaImageProcessor" if self.do_pad else "CLIPImageProcessor"
        d: dict[str, Any] = {
            "image_processor_type": type_name,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        if self.crop_size is not None:
            d["crop_size"] = dict(self.crop_size)
        if self.kind == "clip":
            d["do_pad"] = self.do_pad
        else:
            d["image_num_channels"] = self.image_num_channels
            if self.size.get("height") is not None and self.size.get("height") == self.size.get("width"):
                d["image_size"] = self.size["height"]  # the reference lets image_size override size
        return d

    def preprocess(
        self, images: list[ImageInput], *, allow_remote: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> torch.Tensor:
        """Load and preprocess `images` into float32 pixel_values (N, 3, H, W).

        File paths, bytes, URLs and data: URIs are read as the reference reads a path (EXIF-upright, then
        plain RGB conversion: transparency is dropped); PIL images and arrays have their transparency
        composited on white. `max_pixels` bounds both the input and the resized image.
        """
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"preprocess() takes a list of images, got {type(images).__name__}; wrap it: [image]"
            )
        arrays = [
            self._process(source, allow_remote=allow_remote, max_pixels=max_pixels) for source in images
        ]
        if not arrays:
            size = self._fixed_output_size()
            if size is None:
                raise ValueError("no images given, and this configuration has no fixed output size")
            return torch.empty((0, 3, *size), dtype=torch.float32)
        shapes = sorted({a.shape[1:] for a in arrays})
        if len(shapes) > 1:
            raise ValueError(
                f"images came out at different sizes {shapes}; set do_center_crop or a fixed size"
            )
        return torch.from_numpy(np.stack(arrays))

    # -- one image ------------------------------------------------------------------------------

    def _process(self, source: ImageInput, *, allow_remote: bool, max_pixels: int) -> np.ndarray:
        image = self.load(source, allow_remote=allow_remote, max_pixels=max_pixels)
        if self.do_pad:
            image = _pad_to_square(image, tuple(int(m * 255) for m in self.image_mean))
        return self.finish(image, max_pixels=max_pixels)

    def load(
        self, source: ImageInput, *, allow_remote: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> Image.Image:
        """One image read (as `preprocess` reads it) and converted to RGB as the reference converts it (an RGB
        PIL image comes back itself, not a copy)."""
        image = load_image(source, allow_remote=allow_remote, max_pixels=max_pixels)
        return self._to_rgb(image, encoded=is_encoded(source))

    def finish(self, image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """An RGB image (or one view of it, such as a tile) resized, center-cropped, rescaled and normalized
        as configured: float32 (3, H, W)."""
        if self.do_resize:
            height, width = self._resized_size(image.height, image.width)
            check_image_size(width, height, max_pixels, f"the resized image of {image.width}x{image.height}")
            if (width, height) != image.size:  # Pillow returns a copy for the same size
                image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_center_crop:
            array = _center_crop(array, self.crop_size["height"], self.crop_size["width"])
        return self._rescale_and_normalize(array)

    def _to_rgb(self, image: Image.Image, *, encoded: bool) -> Image.Image:
        if encoded:  # the reference's path loader: any transparency is dropped
            return image if image.mode == "RGB" else image.convert("RGB")
        if not self.do_convert_rgb:
            if image.mode != "RGB":
                raise ValueError(f"do_convert_rgb is off, so images must be RGB; got mode {image.mode}")
            return image
        # Same test as the reference, so e.g. LAB (its bands are L, A, B) also goes through RGBA.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.size
        if "shortest_edge" in size and "longest_edge" in size:
            return _shortest_edge_capped(height, width, size["shortest_edge"], size["longest_edge"])
        if "shortest_edge" in size:
            short, long = min(height, width), max(height, width)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if "max_height" in size:
            scale = min(size["max_height"] / height, size["max_width"] / width)
            new_height, new_width = int(height * scale), int(width * scale)
            if new_height <= 0 or new_width <= 0:
                raise ValueError(
                    f"a {width}x{height} image resizes to {new_width}x{new_height} within {size}"
                )
            return new_height, new_width
        return size["height"], size["width"]

    def _rescale_and_normalize(self, array: np.ndarray) -> np.ndarray:
        if array.dtype != np.uint8:
            return _rescaled_normalized(array, self._value_steps())
        # A uint8 pixel has 256 values: each channel's outputs are worked out once (the same arithmetic,
        # value by value) and looked up, which is several times faster than doing it per pixel.
        table = _value_table(*self._value_steps())
        return np.stack([table[c].take(array[c]) for c in range(array.shape[0])])

    def _value_steps(self) -> tuple:
        return (
            self.do_rescale,
            self.rescale_factor,
            self.do_normalize,
            tuple(self.image_mean),
            tuple(self.image_std),
        )

    def _fixed_output_size(self) -> tuple[int, int] | None:
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None


def _size_dict(value: Any, name: str, *, square: bool) -> dict[str, int]:
    """A size as a dict of positive ints: an int is a square (`square`) or the shortest edge, a pair is
    (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an int, [height, width] or a dict, got {value!r}")
    value = {k: v for k, v in value.items() if v is not None}
    if set(value) not in _SIZE_KEY_SETS:
        raise ValueError(
            f"{name} keys must be one of {[sorted(s) for s in _SIZE_KEY_SETS]}, got {sorted(value)}"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ValueError(f"{name} values must be positive integers, got {value}")
    return dict(value)


def _channel_values(value: Any, name: str) -> tuple[float, ...]:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name} must be one number or three (R, G, B), got {value!r}")
    return tuple(float(v) for v in values)


def _shortest_edge_capped(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """Shortest edge to `shortest` unless the longest would pass `longest`, with the reference's rounding."""
    short, long = float(min(height, width)), float(max(height, width))
    exact = None
    if long / short * shortest > longest:
        exact = longest * short / long
        shortest = int(round(exact))
    if min(height, width) == shortest:
        return height, width
    edge = exact if exact is not None else shortest
    if width < height:
        return int(edge * height / width), shortest
    return shortest, int(edge * width / height)


def _rescaled_normalized(array: np.ndarray, steps: tuple) -> np.ndarray:
    do_rescale, rescale_factor, do_normalize, image_mean, image_std = steps
    if do_rescale:
        # The reference multiplies in float64 and rounds to float32 afterwards; a float32 product
        # differs from it in the last bit for some pixel values.
        out = (array.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        out = array.astype(np.float32)
    if do_normalize:
        mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return out


@functools.lru_cache(maxsize=16)
def _value_table(*steps: Any) -> np.ndarray:
    """(channels, 256) float32: what `_rescaled_normalized` gives each uint8 value in each channel."""
    channels = len(steps[3])
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256))
    return _rescaled_normalized(values, steps)[:, 0, :]


def _pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (C, H, W) to (C, height, width) around the centre, zero-padding any edge that is too short."""
    return _crop_axis(_crop_axis(array, height, axis=1), width, axis=2)


def _crop_axis(array: np.ndarray, target: int, *, axis: int) -> np.ndarray:
    length = array.shape[axis]
    if target <= length:
        start = (length - target) // 2
        return array[(slice(None),) * axis + (slice(start, start + target),)]
    before = math.ceil((target - length) / 2)  # an odd extra pixel goes after the image
    widths = [(0, 0)] * array.ndim
    widths[axis] = (before, target - length - before)
    return np.pad(array, widths)
