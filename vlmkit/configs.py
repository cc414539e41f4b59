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


def checked_feature_layers(layers: Any, tower_layers: int) -> int | list[int]:
    """`vision_feature_layer` as an int or a non-empty list of ints, each the index of a hidden state of a
    vision tower of `tower_layers` layers (0: the embeddings; negative: from the end)."""
    if isinstance(layers, (list, tuple)):
        if not layers:
            raise ValueError("vision_feature_layer is an empty list")
        layers = [int(i) for i in layers]
    n = tower_layers + 1
    for i in [layers] if isinstance(layers, int) else layers:
        if not -n <= i < n:
            raise ValueError(
                f"vision_feature_layer {i} is out of range for a vision tower of "
                f"{n - 1} layers (valid: {-n}..{n - 1})"
            )
    return layers
