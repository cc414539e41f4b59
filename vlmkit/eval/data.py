"""What every task reader gives the runner: `Sample`s, and the helpers the readers share to open a benchmark's
published files with errors that name the file, what is wrong and what layout was expected."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A benchmark file that is missing or not in its published layout."""


@dataclass
class Sample:
    """One question of a benchmark.

    images: file paths or encoded bytes (MMBench keeps its pictures inside its TSV);
    visual_prompts: `vlmkit.visual_prompts` specs drawn on the first image before it is sent;
    question: the text the task's prompt template puts at {question};
    options: the choices of a multiple-choice question, lettered A, B, ... at {options};
    target: what the task's metric compares the answer with (JSON);
    answer: the reference answer a few-shot demonstration shows;
    meta: what the scores are broken down by (answer type, category, capability)."""

    id: str
    images: list[Any]
    question: str
    target: Any
    options: list[str] = field(default_factory=list)
    visual_prompts: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def options_text(options: list[str]) -> str:
    """ "A. first\\nB. second ..." as the LLaVA and MMBench prompts list choices."""
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def find_file(data: Path, names: tuple[str, ...], task: str, layout: str) -> Path:
    """`data` itself when it is a file, else the first of `names` (glob patterns) inside the folder `data`."""
    if data.is_file():
        return data
    if not data.is_dir():
        raise DataError(f"{task}: no file or folder {data}; expected the published layout:\n{layout}")
    for pattern in names:
        found = sorted(data.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(
                f"{task}: {data} holds several files matching {pattern!r} "
                f"({', '.join(p.name for p in found[:4])}); pass the one to evaluate as --data"
            )
    raise DataError(f"{task}: {data} holds none of {list(names)}; expected the published layout:\n{layout}")


def read_json(path: Path, task: str, layout: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{task}: no file {path}; expected the published layout:\n{layout}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{task}: {path} is not valid JSON ({e}); is it the benchmark's own file?") from None


def read_jsonl(path: Path, task: str, layout: str) -> list[dict[str, Any]]:
    """JSON lines (POPE's and ViP-Bench's .json/.jsonl files); a broken line is named by its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{task}: no file {path}; expected the published layout:\n{layout}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{task}: {path} line {n} is not a JSON object ({e}); one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{task}: {path} line {n} is not a JSON object; one object per line")
        rows.append(row)
    return rows


def field_of(row: Any, key: str, where: str, task: str) -> Any:
    """row[key], or a DataError that names the entry and the missing field."""
    if not isinstance(row, dict):
        raise DataError(f"{task}: {where} should be a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{task}: {where} has no {key!r} field (fields: {sorted(row)[:12]})")
    return row[key]


def image_path(root: Path, candidates: list[str]) -> Path:
    """The first of the relative paths `candidates` that exists under root (the benchmark's folder or
    --images); the first one when none does, which `check_images` then reports."""
    for c in candidates:
        if (root / c).is_file():
            return root / c
    return root / candidates[0]


def check_images(samples: list[Sample], task: str, layout: str) -> None:
    """Every picture path of the samples exists; else one error with the count and the first few."""
    missing = [str(p) for s in samples for p in s.images if isinstance(p, Path) and not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise DataError(
            f"{task}: {len(missing)} picture(s) not found, e.g.\n  {shown}\n"
            f"put them where the published layout has them (or pass their folder as --images):\n{layout}"
        )
