"""vlmkit.images against the transformers PIL image processors, and load_image on every source and error."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.image_processor import ImageProcessor
from vlmkit.images import DEFAULT_MAX_PIXELS, load_image

transformers = pytest.importorskip("transformers")

REFERENCE_CLASSES = {
    "CLIPImageProcessor": "CLIPImageProcessorPil",
    "LlavaImageProcessor": "LlavaImageProcessorPil",
    "IdeficsImageProcessor": "IdeficsImageProcessorPil",
}
TOLERANCE = 1e-4


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def awkward_images() -> dict[str, Image.Image]:
    rgba = noise(37, 211, 4)
    rgba[..., 3] = np.where(np.arange(37) % 3 == 0, 0, rgba[..., 3])  # fully clear columns among partial ones
    palette = Image.fromarray(noise(333, 334, seed=1)).quantize(64)
    palette_clear = palette.copy()
    palette_clear.info["transparency"] = 5
    grey_clear = Image.fromarray(noise(90, 70, 1, seed=2)[..., 0])
    grey_clear.info["transparency"] = 128
    i16 = np.random.default_rng(3).integers(0, 2**16, (40, 30), dtype=np.uint16)
    i16[:20] //= 512  # keep some values below 255: the reference clips I;16 to 255 rather than scaling
    images = {
        "RGBA 37x211 partial alpha": Image.fromarray(rgba),
        "L 1x500": Image.fromarray(noise(1, 500, 1)[..., 0]),
        "LA 500x1": Image.fromarray(noise(500, 1, 2)),
        "L with transparency": grey_clear,
        "P 333x334": palette,
        "P with transparency": palette_clear,
        "PA": Image.fromarray(noise(40, 60, 4, seed=4)).convert("PA"),
        "1-bit": Image.fromarray(noise(45, 31, 1)[..., 0] > 127),
        "I;16": Image.fromarray(i16),
        "I": Image.fromarray(i16).convert("I"),
        "F": Image.fromarray(np.random.default_rng(5).random((17, 23), dtype=np.float32) * 300),
        "CMYK": Image.frombytes("CMYK", (61, 47), noise(61, 47, 4).tobytes()),
        "YCbCr": Image.frombytes("YCbCr", (61, 47), noise(61, 47, 3).tobytes()),
        "LAB (bands include 'A')": Image.frombytes("LAB", (30, 20), noise(30, 20, 3).tobytes()),
        "RGB 1x1": Image.fromarray(noise(1, 1)),
        "RGB 3x400": Image.fromarray(noise(3, 400)),
        "RGB 400x3": Image.fromarray(noise(400, 3)),
        "RGB 640x480": Image.fromarray(noise(640, 480)),
        "RGB 224x224": Image.fromarray(noise(224, 224)),
    }
    return images


AWKWARD = awkward_images()
SLOW_AT_336 = {"L 1x500", "LA 500x1"}  # shortest edge 336 -> 336x168000 before the crop

CONFIGS = {
    "clip default": ("CLIPImageProcessor", {}),
    "vip-llava 336": (
        "CLIPImageProcessor",
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3},
    ),
    "llava do_pad": ("LlavaImageProcessor", {"do_pad": True}),
    "llava do_pad off": ("LlavaImageProcessor", {"do_pad": False, "size": 64, "crop_size": 64}),
    "clip odd everything": (
        "CLIPImageProcessor",
        {
            "size": {"shortest_edge": 100},
            "crop_size": {"height": 120, "width": 90},  # taller than some resized images: zero padding
            "resample": 2,
            "image_mean": [0.5, 0.25, 0.75],
            "image_std": [0.2, 0.3, 0.1],
        },
    ),
    "llava do_pad odd": (
        "LlavaImageProcessor",
        {"do_pad": True, "size": 57, "crop_size": 49, "resample": 1, "image_mean": [0.9, 0.1, 0.5]},
    ),
    "clip capped edges": (
        "CLIPImageProcessor",
        {"size": {"shortest_edge": 40, "longest_edge": 90}, "crop_size": 40},
    ),
    "clip fixed size no crop": (
        "CLIPImageProcessor",
        {"size": {"height": 48, "width": 80}, "do_center_crop": False, "resample": 0},
    ),
    "clip max height width": (
        "CLIPImageProcessor",
        {"size": {"max_height": 50, "max_width": 70}, "crop_size": 50, "resample": 4},
    ),
    "clip no rescale": ("CLIPImageProcessor", {"do_rescale": False, "size": 32, "crop_size": 32}),
    "clip rescale only": (
        "CLIPImageProcessor",
        {"do_normalize": False, "rescale_factor": 1 / 127.5, "size": 32},
    ),
    "idefics default": ("IdeficsImageProcessor", {}),
    "idefics odd": (
        "IdeficsImageProcessor",
        {"image_size": 97, "resample": 5, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.6, 0.7]},
    ),
    "idefics non-square": ("IdeficsImageProcessor", {"size": {"height": 50, "width": 70}}),
}


def reference(type_name: str, kwargs: dict):
    return getattr(transformers, REFERENCE_CLASSES[type_name])(**kwargs)


def reference_pixels(processor, images) -> torch.Tensor:
    out = processor(images, return_tensors="pt")
    pixels = out if isinstance(out, torch.Tensor) else out["pixel_values"]
    return pixels.float()  # with neither rescale nor normalize the reference stays uint8


def assert_same(ours: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    assert ours.dtype == torch.float32, label
    assert ours.shape == ref.shape, f"{label}: {tuple(ours.shape)} != {tuple(ref.shape)}"
    worst = (ours - ref).abs().max().item()
    assert worst < TOLERANCE, f"{label}: max abs diff {worst}"


# -- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_parity_on_awkward_images(config: str) -> None:
    type_name, kwargs = CONFIGS[config]
    ref = reference(type_name, kwargs)
    ours = ImageProcessor.from_dict({"image_processor_type": type_name, **kwargs})
    for name, image in AWKWARD.items():
        if (config != "clip default" and image.width * image.height > 200_000) or (
            config == "vip-llava 336" and name in SLOW_AT_336
        ):
            continue  # costly resizes only once, to keep the suite fast
        try:
            expected = reference_pixels(ref, [image])
        except ValueError:  # e.g. 1x500 capped to a 0-pixel-wide size: PIL cannot resize to it
            with pytest.raises(ValueError, match="no pixels|resizes to"):
                ours.preprocess([image])
            continue
        # 1x500 at 336 px resizes to 336x168000: above the default max_pixels, which bounds that too
        pixels = ours.preprocess([image], max_pixels=10**8)
        assert_same(pixels, expected, f"{config} / {name}")


@pytest.mark.parametrize("type_name", ["CLIPImageProcessor", "LlavaImageProcessor", "IdeficsImageProcessor"])
def test_parity_on_a_batch(type_name: str) -> None:
    kwargs = {"do_pad": True} if type_name == "LlavaImageProcessor" else {}
    images = [AWKWARD["RGBA 37x211 partial alpha"], AWKWARD["CMYK"], AWKWARD["P with transparency"]]
    ours = ImageProcessor.from_dict({"image_processor_type": type_name, **kwargs}).preprocess(images)
    assert_same(ours, reference_pixels(reference(type_name, kwargs), images), type_name)


def test_transparency_is_composited_on_white_for_both_flavours() -> None:
    clear = Image.new("RGBA", (8, 8), (200, 10, 10, 0))
    for kind in ("clip", "idefics"):
        pixels = ImageProcessor(kind=kind, do_normalize=False).preprocess([clear])
        assert torch.all(pixels == 1.0), kind


def test_clip_do_pad_is_batch_padding_not_pad_to_square() -> None:
    # For CLIPImageProcessor, do_pad pads a batch to its largest image: with a center crop it is a no-op.
    kwargs = {"do_pad": True, "size": 40, "crop_size": 40}
    ours = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", **kwargs})
    assert ours.do_pad is False
    image = AWKWARD["RGB 3x400"]
    assert_same(
        ours.preprocess([image]), reference_pixels(reference("CLIPImageProcessor", kwargs), [image]), "pad"
    )
    with pytest.raises(ValueError, match="batch padding"):
        ImageProcessor.from_dict(
            {"image_processor_type": "CLIPImageProcessor", "do_pad": True, "do_center_crop": False}
        )


@pytest.mark.parametrize("kind", ["clip", "idefics"])
def test_parity_for_encoded_sources_and_arrays(tmp_path: Path, kind: str) -> None:
    type_name = "CLIPImageProcessor" if kind == "clip" else "IdeficsImageProcessor"
    ref = reference(type_name, {})
    ours = ImageProcessor(kind=kind)
    rgba = Image.fromarray(noise(77, 123, 4))
    rgba.save(tmp_path / "rgba.png")  # a path drops alpha in the reference loader, unlike a PIL image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on load
    Image.fromarray(noise(90, 60)).save(tmp_path / "rotated.jpg", exif=exif)
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "rgba.png").read_bytes()).decode()
    sources = [
        str(tmp_path / "rgba.png"),
        str(tmp_path / "rotated.jpg"),
        uri,
        noise(60, 50),
        noise(60, 50, 4),
    ]
    for source in sources:
        label = f"{kind} / {str(source)[:40] if isinstance(source, str) else source.shape}"
        assert_same(ours.preprocess([source]), reference_pixels(ref, source), label)
    as_path = ours.preprocess([tmp_path / "rgba.png", (tmp_path / "rgba.png").read_bytes()])
    assert torch.equal(as_path[0], ours.preprocess([str(tmp_path / "rgba.png")])[0])
    assert torch.equal(as_path[1], as_path[0])


# -- configuration -----------------------------------------------------------------------------------

VIP_LLAVA_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
IDEFICS_CONFIG = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_num_channels": 3,
    "image_processor_type": "IdeficsImageProcessor",
    "image_size": 224,
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def test_from_dict_reads_published_configs() -> None:
    vip = ImageProcessor.from_dict(VIP_LLAVA_CONFIG)
    assert (vip.kind, vip.size, vip.crop_size, vip.do_pad) == (
        "clip",
        {"shortest_edge": 336},
        VIP_LLAVA_CONFIG["crop_size"],
        False,
    )
    idefics = ImageProcessor.from_dict(IDEFICS_CONFIG)
    assert (idefics.kind, idefics.size, idefics.do_center_crop) == (
        "idefics",
        {"height": 224, "width": 224},
        False,
    )
    nested = {
        "processor_class": "LlavaProcessor",
        "image_processor": {**VIP_LLAVA_CONFIG, "image_processor_type": "CLIPImageProcessorPil"},
    }
    assert ImageProcessor.from_dict(nested) == vip
    assert ImageProcessor.from_dict(nested["image_processor"]) == vip
    assert (
        ImageProcessor.from_dict({**VIP_LLAVA_CONFIG, "image_processor_type": "CLIPImageProcessorFast"})
        == vip
    )
    assert (
        ImageProcessor.from_dict({**IDEFICS_CONFIG, "image_processor_type": "IdeficsImageProcessorPil"})
        == idefics
    )


def test_from_dict_defaults_unknown_keys_and_nulls() -> None:
    bare = ImageProcessor.from_dict(
        {"image_processor_type": "CLIPImageProcessor", "something_new": 1, "crop_size": None}
    )
    assert bare == ImageProcessor(kind="clip")
    assert bare.size == {"shortest_edge": 224} and bare.crop_size == {"height": 224, "width": 224}
    assert bare.resample == 3 and bare.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "size": 300}).size == {
        "shortest_edge": 300
    }
    assert ImageProcessor.from_dict({"image_processor_type": "IdeficsImageProcessor", "size": 300}).size == {
        "height": 300,
        "width": 300,
    }
    with pytest.raises(ValueError, match="image_processor_type"):
        ImageProcessor.from_dict({"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(ValueError, match="image_processor_type"):
        ImageProcessor.from_dict({"size": 224})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "siglip"}, "kind"),
        ({"kind": "clip", "size": {"longest_edge": 5}}, "size keys"),
        ({"kind": "clip", "size": {"shortest_edge": 0}}, "positive"),
        ({"kind": "clip", "resample": 9}, "resample"),
        ({"kind": "clip", "image_mean": [0.5, 0.5]}, "image_mean"),
        ({"kind": "clip", "image_std": [0.5, 0.0, 0.5]}, "zero"),
        ({"kind": "idefics", "do_pad": True}, "do_pad"),
        ({"kind": "idefics", "do_center_crop": True}, "crop_size"),
        ({"kind": "clip", "image_size": 224}, "image_size"),
    ],
)
def test_invalid_configuration_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageProcessor(**kwargs)


@pytest.mark.parametrize(
    "processor",
    [
        ImageProcessor.from_dict(VIP_LLAVA_CONFIG),
        ImageProcessor(kind="clip", do_pad=True, size=61, crop_size=[50, 70], resample=2, image_mean=0.5),
        ImageProcessor.from_dict(IDEFICS_CONFIG),
        ImageProcessor(kind="idefics", size={"height": 40, "width": 72}, resample=0, do_rescale=False),
    ],
    ids=["vip-llava", "llava pad", "idefics", "idefics non-square"],
)
def test_to_dict_loads_back_in_transformers(tmp_path: Path, processor: ImageProcessor) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor.to_dict()))
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert type(ref).__name__.endswith("Pil")
    images = [AWKWARD["RGBA 37x211 partial alpha"], AWKWARD["P with transparency"]]
    assert_same(processor.preprocess(images), reference_pixels(ref, images), type(ref).__name__)
    assert ImageProcessor.from_dict(processor.to_dict()) == processor


def test_preprocess_arguments() -> None:
    processor = ImageProcessor(kind="clip")
    assert processor.preprocess([]).shape == (0, 3, 224, 224)
    with pytest.raises(TypeError, match="list"):
        processor.preprocess(AWKWARD["RGB 1x1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="different sizes"):
        ImageProcessor(kind="clip", do_center_crop=False).preprocess(
            [AWKWARD["RGB 1x1"], AWKWARD["RGB 3x400"]]
        )
    with pytest.raises(ValueError, match="mode L"):
        ImageProcessor(kind="clip", do_convert_rgb=False).preprocess([AWKWARD["L 1x500"]])


def test_resized_image_is_bounded_by_max_pixels() -> None:
    # A 1x1000 image passes a 5,000 pixel limit but would be resized to 224x224000.
    with pytest.raises(ValueError, match=r"resized image of 1x1000 .* above the limit of 5,000"):
        ImageProcessor(kind="clip").preprocess([Image.new("RGB", (1, 1000))], max_pixels=5_000)


# -- load_image --------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height and no pixel data: costs nothing to build."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture
def rgb() -> Image.Image:
    return Image.fromarray(noise(20, 10))


def test_load_image_from_every_source(tmp_path: Path, rgb: Image.Image) -> None:
    path = tmp_path / "image.png"
    rgb.save(path)
    expected = np.asarray(rgb)
    assert load_image(rgb) is rgb
    for source in [str(path), path, path.read_bytes(), bytearray(path.read_bytes())]:
        assert np.array_equal(np.asarray(load_image(source)), expected), type(source)
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert np.array_equal(np.asarray(load_image(uri)), expected)
    assert np.array_equal(np.asarray(load_image(uri[:40] + "\n" + uri[40:])), expected)  # wrapped base64


def test_load_image_from_arrays() -> None:
    hwc = noise(20, 10)
    assert load_image(hwc).mode == "RGB" and np.array_equal(np.asarray(load_image(hwc)), hwc)
    assert load_image(hwc[..., 0]).mode == "L"
    assert load_image(hwc[..., :1]).mode == "L"
    assert load_image(noise(20, 10, 4)).mode == "RGBA"
    floats = np.array([[0.0, 0.5, 1.0, 0.2 / 255]], dtype=np.float32)
    assert np.asarray(load_image(floats)).tolist() == [[0, 128, 255, 0]]
    assert load_image(np.full((3, 4), 7, dtype=np.int64)).getpixel((0, 0)) == 7
    for bad, message in [
        (floats * 2, r"\[0, 1\]"),
        (np.full((2, 2), np.nan), r"\[0, 1\]"),
        (np.full((2, 2), 300), r"\[0, 255\]"),
        (np.zeros((2, 2, 5), np.uint8), "channels last"),
        (np.zeros((2,), np.uint8), "channels last"),
        (np.zeros((2, 2), bool), "dtype"),
        (np.zeros((0, 5), np.uint8), "no pixels"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            load_image(bad)
        assert "numpy array" in str(info.value)


def test_remote_sources_need_allow_remote(monkeypatch: pytest.MonkeyPatch, rgb: Image.Image) -> None:
    url = "https://example.com/cat.png"
    with pytest.raises(ValueError, match=r"https://example.com/cat.png.*allow_remote=True"):
        load_image(url)
    with pytest.raises(ValueError, match="allow_remote=True"):
        ImageProcessor(kind="clip").preprocess(["HTTP://example.com/cat.png"])

    class FakeResponse(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fetched = []

    class FakeOpener:
        def open(self, u, timeout):
            fetched.append(u)
            return FakeResponse(png_bytes(rgb))

    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 443))]
    monkeypatch.setattr("socket.getaddrinfo", lambda *a, **k: public)
    monkeypatch.setattr("urllib.request.build_opener", lambda *handlers: FakeOpener())
    assert np.array_equal(np.asarray(load_image(url, allow_remote=True)), np.asarray(rgb))
    assert fetched == [url]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/x.png",
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://192.168.0.1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.png",
        "http://[fe80::1]/x.png",
    ],
)
def test_remote_pictures_come_from_public_addresses_only(url: str) -> None:
    """Nothing is fetched from the server's own machine or network, directly or through a redirect."""
    from vlmkit.images import _PublicRedirects

    with pytest.raises(ValueError, match="not a public address"):
        load_image(url, allow_remote=True)
    with pytest.raises(ValueError, match="not a public address"):
        _PublicRedirects().redirect_request(None, None, 302, "Found", {}, url)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    for source in (str(missing), missing):
        with pytest.raises(FileNotFoundError, match="nope.png"):
            load_image(source)
    with pytest.raises(FileNotFoundError, match="iVBOR"):
        load_image("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk")  # bare base64 is no path
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="no image"):  # a name no file can have
        load_image("picture\0.png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    with pytest.raises(ValueError, match="notes.txt.*not an image") as info:
        load_image(text)
    assert info.value.__cause__ is not None


def test_corrupt_and_truncated_data(tmp_path: Path) -> None:
    data = png_bytes(Image.fromarray(noise(64, 64)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.png.*corrupt or truncated") as info:
        load_image(truncated)
    assert info.value.__cause__ is not None
    with pytest.raises(ValueError, match=r"bytes \(9 B\)"):
        load_image(b"garbage!!")
    with pytest.raises(ValueError, match=rf"bytes \({len(data) // 2} B\)"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ValueError, match="data: URI.*base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ValueError, match="data: URI.*not an image"):
        load_image("data:image/png;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(ValueError, match="data: URI.*','"):
        load_image("data:image/png;base64")
    with pytest.raises(TypeError, match="int"):
        load_image(42)  # type: ignore[arg-type]


def test_size_limits_and_decompression_bombs(rgb: Image.Image) -> None:
    with pytest.raises(ValueError, match=r"20x10 = 200 pixels, above the limit of 199"):
        load_image(png_bytes(rgb), max_pixels=199)
    with pytest.raises(ValueError, match=r"PIL image \(RGB, 20x10\) is 20x10 = 200 pixels.*199"):
        load_image(rgb, max_pixels=199)
    with pytest.raises(ValueError, match=r"numpy array.*200 pixels.*199"):
        load_image(np.asarray(rgb), max_pixels=199)
    assert load_image(png_bytes(rgb), max_pixels=200).size == (20, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        # Above Pillow's soft limit, below its hard one: refused by max_pixels from the header alone.
        with pytest.raises(
            ValueError, match=rf"10000x10000 = 100,000,000 pixels, above the limit of {DEFAULT_MAX_PIXELS:,}"
        ):
            load_image(png_header_only(10_000, 10_000))
        # Above Pillow's hard limit: Pillow refuses while reading the header.
        with pytest.raises(ValueError, match=r"bytes .* 10,000,000,000 pixels.*decompression-bomb") as info:
            load_image(png_header_only(100_000, 100_000))
        assert isinstance(info.value.__cause__, Image.DecompressionBombError)
