"""Coverage-guided fuzz targets (atheris, libFuzzer's engine for Python) for the parts of vlmkit that take
bytes or structures from strangers: picture decoding, visual-prompt drawing, chat-template rendering and
the incremental decoder.

    python fuzz/targets.py picture [CORPUS_DIR ...] -max_total_time=60 -timeout=10
    python fuzz/targets.py draw -runs=1000000

A target returns normally for input it accepts or refuses the documented way: a ValueError (a TypeError
for a wrong Python type, a FileNotFoundError or IsADirectoryError for a path that is no picture) that
vlmkit raises itself, naming the problem (`refused`). Anything else is a finding: the same errors raised
from deep inside a library or an operation, other exceptions, a wrong result, a hang past -timeout, memory
past -rss_limit_mb. libFuzzer writes the input to crash-*/timeout-* and exits non-zero.
Long campaigns and their figures: fuzz/README.md.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["vlmkit", "PIL", "jinja2"]):
    from PIL import Image

    from vlmkit.images import load_image
    from vlmkit.models import builtin_model, load_processor
    from vlmkit.tokenizer import IncrementalDecoder, Tokenizer
    from vlmkit.visual_prompts import KINDS as VISUAL_PROMPT_KINDS
    from vlmkit.visual_prompts import draw_visual_prompts

PICTURE = Image.new("RGB", (20, 12), (10, 200, 10))
MAX_PIXELS = 4096 * 4096  # the server's default picture limit is lower; a fuzzer's input is bounded anyway
KINDS = [*VISUAL_PROMPT_KINDS, "nonsense"]
KEYS = ["type", "point", "box", "points", "polygon", "width", "color", "seed", "mask", "alpha", "radius"]


VLMKIT = str(Path(__file__).resolve().parent.parent / "vlmkit")


def refused(error: Exception) -> bool:
    """Whether `error` is a refusal vlmkit made on purpose: raised by a `raise` statement in vlmkit's own
    code (a library's error it wraps with a message arrives so, chained), not by an operation that failed
    on input nobody checked."""
    import traceback

    last = traceback.extract_tb(error.__traceback__)[-1]
    return last.filename.startswith(VLMKIT) and (last.line or "").lstrip().startswith("raise")


def fuzz_picture(data: bytes) -> None:
    """Any bytes: a picture within the pixel limit, or a ValueError that names the source."""
    try:
        image = load_image(data, max_pixels=MAX_PIXELS)
    except (ValueError, TypeError, OSError) as e:
        if not refused(e):
            raise
        return
    if not isinstance(image, Image.Image) or image.width * image.height > MAX_PIXELS:
        raise AssertionError(f"load_image gave {image!r} for {len(data)} bytes")
    image.convert("RGB")  # what the processors do next


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A JSON-like value leaning towards what visual-prompt specs hold: numbers of every size, short lists
    of numbers, strings, and now and then something else."""
    choice = fdp.ConsumeIntInRange(0, 9 if depth < 2 else 5)
    if choice == 0:
        return fdp.ConsumeInt(4)
    if choice == 1:
        return fdp.ConsumeRegularFloat()
    if choice == 2:
        return fdp.ConsumeFloat()  # inf, nan and subnormals too
    if choice == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if choice == 4:
        return fdp.ConsumeBool()
    if choice == 5:
        return None
    if choice <= 7:
        return [fdp.ConsumeIntInRange(-600, 1200) for _ in range(fdp.ConsumeIntInRange(0, 9))]
    if choice == 8:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {fdp.PickValueInList(KEYS): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def fuzz_draw(data: bytes) -> None:
    """Visual prompts as a person, a client or a file gives them: a spec list built from the input, or the
    input as JSON text; drawn on a picture of a size the input picks. A picture of the same size comes back,
    or a ValueError."""
    fdp = atheris.FuzzedDataProvider(data)
    size = (fdp.ConsumeIntInRange(1, 640), fdp.ConsumeIntInRange(1, 640))
    picture = Image.new("RGB", size, "white")
    if fdp.ConsumeBool():
        prompts: Any = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    else:
        prompts = []
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            spec = {"type": fdp.PickValueInList(KINDS)}
            for _ in range(fdp.ConsumeIntInRange(0, 5)):
                spec[fdp.PickValueInList(KEYS)] = _value(fdp)
            prompts.append(spec)
    try:
        out = draw_visual_prompts(picture, prompts, seed=0)
    except (ValueError, TypeError, OSError) as e:
        if not refused(e):
            raise
        return
    if out.size != size:
        raise AssertionError(f"drawing changed the picture's size from {size} to {out.size}")


def _conversation(fdp: atheris.FuzzedDataProvider) -> list[dict[str, Any]]:
    messages = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        role = fdp.PickValueInList(["user", "assistant", "system", "tool", "", "User"])
        if fdp.ConsumeBool():
            content: Any = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
        else:
            content = []
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                kind = fdp.PickValueInList(["text", "image", "image_url", "video", ""])
                part: dict[str, Any] = {"type": kind}
                if fdp.ConsumeBool():
                    part["text"] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20))
                if fdp.ConsumeBool():
                    part["image"] = PICTURE if fdp.ConsumeBool() else _value(fdp)
                content.append(part)
        messages.append({"role": role, "content": content})
    return messages


class ChatTemplates:
    """The built-in models' processors (their tokenizers' chat templates and image markers)."""

    def __init__(self) -> None:
        self.processors = [load_processor(builtin_model(name)) for name in ("demo", "demo-idefics")]


def fuzz_chat_template(data: bytes, templates: ChatTemplates) -> None:
    """Any conversation, as the server and `VLM.chat` pass it to the processor: its token ids (and
    pictures), or a ValueError (a ChatTemplateError among them) saying what is wrong with it."""
    fdp = atheris.FuzzedDataProvider(data)
    processor = templates.processors[fdp.ConsumeIntInRange(0, 1)]
    messages = _conversation(fdp)
    try:
        out = processor.apply_chat_template(messages, add_generation_prompt=fdp.ConsumeBool(), tokenize=True)
    except (ValueError, TypeError, OSError) as e:
        if not refused(e):
            raise
        return
    if out["input_ids"].ndim != 2 or out["input_ids"].shape[0] != 1:
        raise AssertionError(f"input_ids of shape {tuple(out['input_ids'].shape)}")


def fuzz_decoder(data: bytes, tokenizer: Tokenizer) -> None:
    """Any token ids, pushed one at a time: the deltas plus flush() equal decoding them all at once."""
    fdp = atheris.FuzzedDataProvider(data)
    ids = [fdp.ConsumeIntInRange(0, tokenizer.vocab_size - 1) for _ in range(fdp.ConsumeIntInRange(0, 64))]
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    if text != whole:
        raise AssertionError(f"incremental {text!r} != whole {whole!r} for ids {ids}")


def target(name: str) -> Callable[[bytes], None]:
    """The fuzz target called `name`, with what it needs loaded once."""
    if name == "picture":
        return fuzz_picture
    if name == "draw":
        return fuzz_draw
    if name == "chat_template":
        templates = ChatTemplates()
        return lambda data: fuzz_chat_template(data, templates)
    if name == "decoder":
        tokenizers = [Tokenizer.from_folder(builtin_model(n)) for n in ("demo", "demo-idefics")]
        return lambda data: fuzz_decoder(data[1:], tokenizers[data[0] % 2]) if data else None
    raise SystemExit(f"unknown target {name!r}; pick one of {', '.join(TARGETS)}")


TARGETS = ("picture", "draw", "chat_template", "decoder")


def seed_pictures(folder: str) -> None:
    """A small seed corpus for `picture`: one tiny file per format Pillow writes here, in a few modes."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", (5, 3), (200, 30, 30))
    for fmt, mode in [("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB")]:
        buf = io.BytesIO()
        picture.convert(mode).save(buf, format=fmt)
        (out / f"seed-{mode}.{fmt.lower()}").write_bytes(buf.getvalue())
    for fmt in ("WEBP", "TIFF", "ICO", "PPM"):
        buf = io.BytesIO()
        picture.save(buf, format=fmt)
        (out / f"seed.{fmt.lower()}").write_bytes(buf.getvalue())
    (out / "seed.json").write_text(json.dumps([{"type": "rectangle", "box": [1, 1, 4, 2]}]))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(
            f"usage: python fuzz/targets.py {{{','.join(TARGETS)}}} [libFuzzer flags and corpus]"
        )
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, target(name))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
