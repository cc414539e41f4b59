"""Image loading: `load_image` turns any supported source (a PIL image, a path, bytes, an array, a data:
URI, an http(s) URL when allowed) into a PIL image, refusing oversized and corrupt inputs with a
`ValueError` that names the source. Preprocessing is `vlmkit.image_processor.ImageProcessor`."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
ImageInput = Image.Image | str | os.PathLike | bytes | np.ndarray

_MAX_DOWNLOAD_BYTES = 256 * 2**20
_DOWNLOAD_TIMEOUT_S = 30.0

# -- loading ---------------------------------------------------------------------------------------


def load_image(
    source: ImageInput, *, allow_remote: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load one image from a PIL image, a file path, encoded bytes, a `data:` URI, a numpy array or (with
    `allow_remote=True`) an http(s) URL.

    PIL images come back as they are; decoded files are turned upright by their EXIF orientation, as the
    reference loader does. Images of more than `max_pixels` pixels are refused before they are decoded.
    Errors are `ValueError` (corrupt, truncated or oversized data), `FileNotFoundError` or `TypeError`,
    each naming the source.

        >>> load_image("data:image/png;base64,iVBORw0KGgo...").size
        (1, 1)
    """
    if isinstance(source, Image.Image):
        return _checked_pil(source, max_pixels)
    if isinstance(source, np.ndarray):
        return _array_to_image(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(data, f"bytes ({len(data)} B)", max_pixels)
    if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
        what = f"URL {_shorten(source)}"
        if not allow_remote:
            raise ValueError(f"{what} is remote; pass allow_remote=True to download it")
        return _decode(_download(source, what), what, max_pixels)
    if isinstance(source, str) and source[:5].lower() == "data:":
        what = f"data: URI ({len(source)} chars)"
        return _decode(_data_uri_payload(source, what), what, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), max_pixels)
    raise TypeError(
        f"cannot load an image from {type(source).__name__}; expected a PIL image, a path, bytes, "
        "a data: URI, an http(s) URL or a numpy array"
    )


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_image_size(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"{what} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(max_pixels); pass a larger max_pixels to allow it"
        )


def _checked_pil(image: Image.Image, max_pixels: int) -> Image.Image:
    what = f"PIL image ({image.mode}, {image.width}x{image.height})"
    check_image_size(image.width, image.height, max_pixels, what)
    try:
        image.load()  # a lazily opened image decodes here, so its errors surface here too
    except Exception as e:
        raise ValueError(f"{what} could not be decoded: {e}") from e
    return image


def _array_to_image(array: np.ndarray, max_pixels: int) -> Image.Image:
    what = f"numpy array (shape {array.shape}, {array.dtype})"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ValueError(f"{what}: expected (H, W) or (H, W, C) with C in 1..4 (channels last)")
    check_image_size(array.shape[1], array.shape[0], max_pixels, what)
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{what}: float images must hold values in [0, 1]")
        data = np.round(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{what}: integer images must hold values in [0, 255]")
        data = array.astype(np.uint8)
    else:
        raise ValueError(f"{what}: unsupported dtype; use uint8, or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(data))  # L, LA, RGB or RGBA by the channel count


def _load_file(path: Path, max_pixels: int) -> Image.Image:
    what = f"file {str(path)!r}"
    try:
        data = path.read_bytes()
    except (FileNotFoundError, ValueError):  # ValueError: a name no file can have (a NUL byte in it)
        raise FileNotFoundError(
            f"no image {what}: a str source must be an existing file, an http(s) URL or a data: URI"
        ) from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} is a directory, not an image file") from None
    return _decode(data, what, max_pixels)


def _data_uri_payload(uri: str, what: str) -> bytes:
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ValueError(f"{what} has no ',' between its header and its data")
    if not header.lower().endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid base64: {e}") from e


def public_address_only(url: str) -> None:
    """Refuse a URL whose host resolves to anything but public addresses (loopback, private, link-local,
    multicast, reserved): a server fetching pictures for its clients must not reach its own network."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{_shorten(url)}: only http(s) URLs with a host name are fetched")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"{_shorten(url)}: cannot resolve {parsed.hostname}: {e}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise ValueError(
                f"{_shorten(url)}: {parsed.hostname} is {address}, not a public address; remote pictures are "
                "fetched from public addresses only"
            )


class _PublicRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a public address (a public URL may redirect to an internal one)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        public_address_only(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, what: str) -> bytes:
    """The URL's bytes: public addresses only (also after redirects), at most _MAX_DOWNLOAD_BYTES, and the
    whole transfer within _DOWNLOAD_TIMEOUT_S (not only each read)."""
    public_address_only(url)
    opener = urllib.request.build_opener(_PublicRedirects)
    deadline = time.monotonic() + _DOWNLOAD_TIMEOUT_S
    chunks, size = [], 0
    try:
        with opener.open(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(65536):
                size += len(chunk)
                if size > _MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"{what} is larger than {_MAX_DOWNLOAD_BYTES:,} bytes")
                if time.monotonic() > deadline:
                    raise ValueError(f"{what} took longer than {_DOWNLOAD_TIMEOUT_S:.0f} s to download")
                chunks.append(chunk)
    except OSError as e:
        raise ValueError(f"could not download {what}: {e}") from e
    return b"".join(chunks)


def _decode(data: bytes, what: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's soft one; its hard limit still raises here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ValueError(
            f"{what} has {pixels}, above Pillow's decompression-bomb limit of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} (max_pixels={max_pixels:,})"
        ) from e
    except UnidentifiedImageError as e:
        raise ValueError(f"{what} is not an image Pillow can read") from e
    except Exception as e:
        raise ValueError(f"{what} could not be decoded: {e}") from e
    check_image_size(image.width, image.height, max_pixels, what)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # a no-op without an EXIF orientation (no copy)
        return image
    except Exception as e:
        raise ValueError(f"{what} is corrupt or truncated: {e}") from e


def is_encoded(source: ImageInput) -> bool:
    return isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview))
