"""Hypothesis strategies for what strangers send vlmkit: pictures (well-formed in every format and mode
Pillow writes, and malformed: truncated, bit-flipped, random, lying headers), visual-prompt specs (right
and wrong), OpenAI chat messages carrying both, and training-data rows.

They feed the property tests in tests/test_fuzz.py (the server, the CLI's functions and the training-data
reader) and the long campaign in fuzz/campaign.py.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from hypothesis import strategies as st
from PIL import Image

from vlmkit.visual_prompts import COLORS, KINDS

FORMATS = {"PNG": "RGBA", "JPEG": "RGB", "GIF": "P", "BMP": "RGB", "WEBP": "RGB", "TIFF": "RGB"}


@st.composite
def well_formed_pictures(draw: st.DrawFn, max_side: int = 96) -> bytes:
    """An encoded picture of any size up to `max_side`, in one of Pillow's formats and modes."""
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from([FORMATS[fmt], "L", "RGB"]))
    colour = draw(st.tuples(*[st.integers(0, 255)] * 3))
    picture = Image.new("RGB", (w, h), colour).convert(mode)
    buf = io.BytesIO()
    picture.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def malformed_pictures(draw: st.DrawFn) -> bytes:
    """A picture file cut short, with flipped bytes, with a header that lies about its size, or noise."""
    good = draw(well_formed_pictures(max_side=32))
    how = draw(st.sampled_from(["truncate", "flip", "noise", "empty", "huge_header"]))
    if how == "truncate":
        return good[: draw(st.integers(0, max(len(good) - 1, 0)))]
    if how == "flip":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "noise":
        return draw(st.binary(min_size=1, max_size=256))
    if how == "empty":
        return b""
    # a PNG header claiming 60000 x 60000 pixels, with no data behind it
    ihdr = (60000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + b"\0\0\0\0"


def pictures() -> st.SearchStrategy[bytes]:
    return st.one_of(well_formed_pictures(), malformed_pictures())


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


numbers = st.one_of(
    st.integers(-1000, 1000),
    st.floats(-1000, 1000, allow_nan=False),
    st.sampled_from([0, -1, 1e9, -1e9, 2**31, 10**18, 1e300, -1e300]),
)
json_numbers = numbers  # JSON has no NaN or infinity; the Python API gets them in `python_numbers`
python_numbers = st.one_of(numbers, st.sampled_from([float("nan"), float("inf"), -float("inf")]))
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=3))


@st.composite
def visual_prompts(draw: st.DrawFn, *, json_only: bool = True) -> dict[str, Any]:
    """A visual-prompt spec: mostly the shape of a real one (right keys, numbers anywhere), sometimes a
    wrong type, a missing or unknown key, or an unknown kind."""
    num = json_numbers if json_only else python_numbers
    kind = draw(st.sampled_from([*KINDS, "nonsense"]))
    point = st.lists(num, min_size=2, max_size=2)
    spec: dict[str, Any] = {"type": kind}
    if kind in ("rectangle", "ellipse", "mask", "mask_contour"):
        spec["box"] = draw(st.lists(num, min_size=4, max_size=4) | junk)
    elif kind == "point":
        spec["point"] = draw(point | junk)
    else:
        spec["points"] = draw(st.lists(point, min_size=0, max_size=5) | junk)
    if draw(st.booleans()):
        spec["width"] = draw(num | junk)
    if draw(st.booleans()):
        spec["color"] = draw(
            st.sampled_from(sorted(COLORS)) | st.lists(st.integers(-5, 300), max_size=4) | junk
        )
    if draw(st.booleans()):
        spec["alpha"] = draw(num | junk)
    if draw(st.booleans()):
        spec["seed"] = draw(st.integers(-(2**70), 2**70) | junk)
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.text(min_size=1, max_size=6))] = draw(junk)
    return spec


text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",)), max_size=40
)  # no lone surrogates: a JSON body cannot carry them (safejson refuses them; tested on their own)


@st.composite
def image_parts(draw: st.DrawFn) -> dict[str, Any]:
    picture = draw(pictures())
    image_url: dict[str, Any] = {"url": data_uri(picture)}
    if draw(st.booleans()):
        image_url["visual_prompts"] = draw(st.lists(visual_prompts(), max_size=3))
    return {"type": "image_url", "image_url": image_url}


@st.composite
def messages(draw: st.DrawFn, max_images: int = 2) -> list[dict[str, Any]]:
    """An OpenAI chat conversation: roles in any order, content as a string or as parts with pictures."""
    out = []
    images = 0
    for _ in range(draw(st.integers(1, 4))):
        role = draw(st.sampled_from(["user", "user", "assistant", "system"]))
        if draw(st.booleans()):
            content: Any = draw(text)
        else:
            content = []
            for _ in range(draw(st.integers(0, 3))):
                if images < max_images and draw(st.booleans()):
                    content.append(draw(image_parts()))
                    images += 1
                else:
                    content.append({"type": "text", "text": draw(text)})
        out.append({"role": role, "content": content})
    return out


@st.composite
def training_rows(draw: st.DrawFn, image_names: list[str]) -> str:
    """One JSONL line of training data: a conversation in the LLaVA layout (or something near it)."""
    turns = []
    for i in range(draw(st.integers(0, 4))):
        speaker = draw(st.sampled_from(["human", "gpt"] if draw(st.integers(0, 5)) else ["robot", "", 3]))
        value: Any = draw(text) if draw(st.integers(0, 5)) else draw(junk)
        if i == 0 and draw(st.booleans()):
            value = f"<image>\n{value}"
        turns.append({"from": speaker, "value": value})
    row: dict[str, Any] = {"conversations": turns}
    if draw(st.booleans()):
        row["image"] = draw(
            st.sampled_from(image_names) | st.lists(st.sampled_from(image_names), max_size=3) | junk
        )
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", "{", "[]", "null", '{"conversations": 5}', '"text"']))
    return json.dumps(row)
