"""Helpers for reading Hugging Face `config.json` dictionaries into small dataclasses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

T = TypeVar("T")


def known_fields(cls: type[T], d: dict[str, Any]) -> dict[str, Any]:
    """The entries of `d` that name a field of dataclass `cls`; unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {k: v for k, v in d.items() if k in names}


def require_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def require_positive_numbers(config: object, *names: str) -> None:
    """Each named field a finite number > 0 (not a string, not a bool), or ValueError naming it."""
    for name in names:
        value = getattr(config, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{type(config).__name__}.{name} must be a finite number > 0, got {value!r}")


def section(d: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A nested section of config.json (`text_config`, `vision_config`, ...): None when absent (the reference
    defaults apply), a copy when it is an object, ValueError when it is anything else (null, a list)."""
    if key not in d:
        return None
    value = d[key]
    if not isinstance(value, dict):
        raise ValueError(
            f"config.json: {key!r} must be an object of settings, got {value!r:.60}; fix or remove it"
        )
    return dict(value)
