"""JSON from outside (request bodies, training rows) parsed with bounds: nesting depth, the length of a
number, no NaN/Infinity, no lone UTF-16 surrogates in strings. A violation is a ValueError that says what was
wrong, never a RecursionError, a 5000-digit int conversion or a string that breaks the tokenizer later."""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # objects and arrays nested deeper are refused (a real request nests about 6 deep)
MAX_NUMBER_CHARS = 64  # a number written with more characters is refused (seeds need 19 digits)


def _number(text: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number has {len(text)} characters; at most {MAX_NUMBER_CHARS} are accepted")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; only strict JSON is accepted")


def depth(raw: bytes) -> int:
    """The deepest nesting of objects and arrays in a JSON text (brackets inside strings not counted)."""
    level = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            level += 1
            deepest = max(deepest, level)
        elif byte in (0x5D, 0x7D):
            level -= 1
    return deepest


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads within the bounds above; ValueError (a json.JSONDecodeError for bad syntax) otherwise."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(raw) > max_depth:
        raise ValueError(f"objects and arrays are nested more than {max_depth} levels deep")
    try:
        data = json.loads(raw, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except RecursionError:
        raise ValueError("objects and arrays are nested too deeply") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        ) from None
    return data
