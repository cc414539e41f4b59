"""Helpers for reading Hugging Face `config.json` dictionaries into small dataclasses."""

from __future__ import annotations

import dataclasses
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
