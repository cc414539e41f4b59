"""Fine-tuning data: a JSONL file of LLaVA-style conversations -> tokenized samples whose labels cover the
assistant turns only, and `collate`, which pads samples into a batch.

Each line is one object: `{"id": ..., "image": "a.png" | ["a.png", "b.png"] (optional), "conversations":
[{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}`. Image
paths are relative to the file's folder. A row with images but no `<image>` marker gets one marker per image
at the start of its first human turn, as LLaVA data means it.

The whole file is checked before anything is returned; bad rows are skipped and counted, or raise:

    >>> samples, report = load_conversations("train.jsonl", processor, max_length=2048)
    >>> print(report.summary())
    kept 97 of 100 rows; skipped 2 missing image (rows 4, 9), 1 too long (row 13)
    >>> batch = collate(samples[:8], pad_token_id=processor.tokenizer.pad_token_id)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit import safejson
from vlmkit.models import Family, family_named, family_of, registry
from vlmkit.tokenizer import ChatTemplateError

IGNORE_INDEX = -100  # the label of every token the loss skips
IMAGE_MARKER = "<image>"  # where an image goes in the data's text, by LLaVA's convention
POLICIES = ("skip", "error")
REASONS = (
    "invalid json",
    "empty conversation",
    "image count",
    "missing image",
    "bad image",
    "template error",
    "too long",
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Processor = Any  # a processor of a registered family (vlmkit.load_processor)


@dataclass
class Sample:
    """One training example, tokenized. labels are IGNORE_INDEX except on the tokens the model must learn."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long
    pixel_values: torch.Tensor | None  # (n_images, ...) as the processor gives them; None without images
    image_attention_mask: torch.Tensor | None  # IDEFICS: (T, n_images) long; None for the LLaVA family
    row: int  # 1-based line number in the JSONL file
    family: str = ""  # the registry name of the family whose processor built it (set by make_sample)
    # the family's per-picture inputs besides the pixels, (n_images, ...) each, which its `collate_images`
    # batches (LLaVA-NeXT: image_sizes (n_images, 2)); empty where the pixels say everything
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DataReport:
    """What `load_conversations` kept and skipped. skipped: reason -> row numbers; details: row -> why."""

    total: int = 0
    kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)
    details: dict[int, str] = field(default_factory=dict)

    def skip(self, row: int, reason: str, message: str) -> None:
        self.skipped.setdefault(reason, []).append(row)
        self.details[row] = f"{reason}: {message}"

    def summary(self, max_rows: int = 10) -> str:
        """One line, e.g. "kept 97 of 100 rows; skipped 2 missing image (rows 4, 9), 1 too long (row 13)"."""
        text = f"kept {self.kept} of {self.total} rows"
        parts = []
        for reason in sorted(self.skipped, key=lambda r: REASONS.index(r) if r in REASONS else len(REASONS)):
            rows = self.skipped[reason]
            listed = ", ".join(str(r) for r in rows[:max_rows])
            if len(rows) > max_rows:
                listed += f", ... ({len(rows) - max_rows} more)"
            parts.append(f"{len(rows)} {reason} ({'row' if len(rows) == 1 else 'rows'} {listed})")
        return f"{text}; skipped {', '.join(parts)}" if parts else text


class BadRow(Exception):
    """A row that cannot become a sample: `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class Conversation:
    """One parsed row: (role, text) turns with roles user/assistant/system, and its image files."""

    turns: list[tuple[str, str]]
    images: list[Path]


# -- loading ---------------------------------------------------------------------------------------


def load_conversations(
    path: str | Path,
    processor: Processor,
    *,
    max_length: int,
    on_bad_sample: str = "skip",
    limit: int | None = None,
) -> tuple[list[Sample], DataReport]:
    """Read and tokenize a conversation JSONL file for `processor`'s family (its `training_sample`).

    Every row is checked (JSON, turns, images on disk and decodable, `<image>` markers against images, the
    chat template, length <= max_length) before anything is returned. on_bad_sample="skip" leaves bad rows
    out and lists them in the report (when every row is bad, the list is empty: the caller decides); "error"
    raises ValueError naming the first bad row and why. `limit` stops reading once that many samples are
    kept (the rest of the file is not read).

        >>> samples, report = load_conversations("data/train.jsonl", processor, max_length=1024, limit=100)
    """
    if on_bad_sample not in POLICIES:
        raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {on_bad_sample!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    family = processor_family(processor)
    if (processor.chat_template or processor.tokenizer.chat_template) is None:
        raise ValueError("the processor has no chat template to render the conversations with")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no conversation file {path}")
    samples: list[Sample] = []
    report = DataReport()
    for row, line in read_lines(path):
        if limit is not None and len(samples) >= limit:
            break
        report.total += 1
        try:
            samples.append(make_sample(line, row, path.parent, processor, family, max_length=max_length))
        except BadRow as bad:
            if on_bad_sample == "error":
                raise ValueError(
                    f"{path}, row {row}: {bad.reason}: {bad.message} (on_bad_sample='skip' leaves such rows out)"
                ) from None
            report.skip(row, bad.reason, bad.message)
        except ValueError as e:  # not the row's fault (a template that cannot be used): stop
            raise ValueError(f"{path}, row {row}: {e}") from e
    report.kept = len(samples)
    return samples, report


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line; undecodable bytes come through as U+FFFD, so the
    row fails as JSON rather than the whole file."""
    with path.open("rb") as f:
        for row, raw in enumerate(f, start=1):
            line = raw.decode("utf-8-sig" if row == 1 else "utf-8", errors="replace")
            if line.strip():
                yield row, line


def processor_family(processor: Processor) -> Family:
    """The registry entry of the processor's family; TypeError for anything else."""
    classes = [family.processor_cls for family in registry()]
    if not isinstance(processor, tuple(classes)):
        names = " or ".join(f"{'an' if c.__name__[0] in 'AEIOU' else 'a'} {c.__name__}" for c in classes)
        raise TypeError(f"processor must be {names} (vlmkit.load_processor), got {type(processor).__name__}")
    return family_of(processor)


def make_sample(
    line: str, row: int, folder: Path, processor: Processor, family: Family, *, max_length: int
) -> Sample:
    """One JSONL line -> a Sample, or BadRow."""
    conversation = parse_row(line, folder)
    turns = place_markers(conversation.turns, len(conversation.images))
    messages = to_messages(turns)
    images = load_images(processor, conversation.images)
    text, spans = render_with_spans(processor, messages)
    mask = np.zeros(len(text), dtype=bool)  # True on the characters the model learns
    for start, end in spans:
        mask[start:end] = True
    sample = family.training_sample(processor, text, mask, images, row)
    sample.family = family.name
    if len(sample.input_ids) > max_length:
        raise BadRow("too long", f"{len(sample.input_ids)} tokens, above max_length={max_length}")
    return sample


# -- one row: parsing and checks ------------------------------------------------------------------


def parse_row(line: str, folder: Path) -> Conversation:
    try:
        obj = safejson.loads(line)  # bounded: deep nesting, huge numbers, lone surrogates are bad rows
    except ValueError as e:
        raise BadRow("invalid json", f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadRow("invalid json", f"expected a JSON object, got {type(obj).__name__}")
    conversations = obj.get("conversations")
    if not isinstance(conversations, list):
        raise BadRow("invalid json", '\'conversations\' must be a list of {"from": ..., "value": ...} turns')
    turns = [parse_turn(turn, i) for i, turn in enumerate(conversations)]
    if not any(role == "assistant" and text.strip() for role, text in turns):
        raise BadRow("empty conversation", "no gpt turn with text to learn from")
    return Conversation(turns, image_paths(obj.get("image"), folder))


def parse_turn(turn: Any, index: int) -> tuple[str, str]:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise BadRow("invalid json", f"turn {index} must be an object with a string 'value'")
    role = ROLES.get(turn.get("from"))
    if role is None:
        raise BadRow(
            "invalid json",
            f"turn {index}: 'from' must be 'human', 'gpt' or 'system', got {turn.get('from')!r}",
        )
    return role, turn["value"]


def image_paths(field_value: Any, folder: Path) -> list[Path]:
    """The row's "image": absent, one path or a list of paths; relative paths are under `folder`."""
    if field_value is None:
        return []
    names = [field_value] if isinstance(field_value, str) else field_value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise BadRow("invalid json", "'image' must be a file name or a list of file names")
    return [folder / name for name in names]  # an absolute name replaces the folder


def place_markers(turns: list[tuple[str, str]], n_images: int) -> list[tuple[str, str]]:
    """Check one `<image>` per image; a row with images and no markers gets them at the start of its first
    human turn."""
    n_markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if n_markers == n_images:
        return turns
    if n_markers == 0:
        first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first is None:
            raise BadRow("image count", f"{n_images} images but no human turn to show them in")
        role, text = turns[first]
        return [*turns[:first], (role, f"{IMAGE_MARKER}\n" * n_images + text), *turns[first + 1 :]]
    raise BadRow(
        "image count", f"{n_markers} {IMAGE_MARKER} markers in the turns but {n_images} images in 'image'"
    )


def to_messages(turns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Turns -> chat-template messages in the content-part form: a turn's images as image parts, then its
    text without the markers (stripped, as LLaVA's preprocessing does)."""
    messages = []
    for role, text in turns:
        n = text.count(IMAGE_MARKER)
        if n:
            text = text.replace(IMAGE_MARKER, "").strip()
        content = [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


def load_images(processor: Processor, images: list[Path]) -> dict[str, torch.Tensor]:
    """The processor's image entries for the row's files (its `image_inputs`: pixel_values, and whatever
    else the family reads per picture, such as LLaVA-NeXT's image_sizes); empty without images."""
    if not images:
        return {}
    for image in images:
        if not image.is_file():
            raise BadRow("missing image", f"no image file {image}")
    try:  # each file is loaded with vlmkit.images.load_image
        return processor.image_inputs(images)
    except (ValueError, OSError) as e:
        raise BadRow("bad image", str(e)) from None


# -- rendering and labels -------------------------------------------------------------------------


def render_with_spans(
    processor: Processor, messages: list[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each assistant turn, the characters it adds after the generation
    prompt: render(messages[:i], generation prompt) is a prefix of render(messages[:i + 1]), and the
    difference is the answer plus whatever the template closes the turn with (an end-of-turn token, eos)."""

    def render(part: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return processor.tokenizer.render_chat(
                part, chat_template=processor.chat_template, add_generation_prompt=add_generation_prompt
            )
        except ChatTemplateError as e:
            raise BadRow("template error", str(e)) from None

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not through.startswith(prefix) or not text.startswith(through):
            # A property of the template, not of the row: stop whatever the policy.
            raise ValueError(
                f"the chat template does not render a conversation as an extension of its first turns "
                f"(the prompt before assistant turn {i} is not a prefix of the conversation up to that turn, or "
                f"that is not a prefix of the whole), so the assistant's tokens cannot be located; "
                f"use a template that renders turns in order"
            )
        spans.append((len(prefix), len(through)))
    return text, spans


def label_tokens(
    ids: list[int], offsets: list[tuple[int, int]], text: str, mask: np.ndarray, skip_id: int
) -> torch.Tensor:
    """Which tokens of `text` are learned: those that start on a learned character, and those that straddle
    the start of an answer (the tokenizer merged the end of the generation prompt with it) when their
    learned part is more than whitespace: "▁A" after a prompt ending in a space is learned, ":▁" before an
    answer " A" is not. Tokens without characters (BOS) and `skip_id` (image tokens) never are."""
    visible = mask & ~np.fromiter((c.isspace() for c in text), dtype=bool, count=len(text))
    seen = np.concatenate([[0], np.cumsum(visible)])
    labels = [
        token
        if end > start and token != skip_id and (mask[start] or seen[end] > seen[start])
        else IGNORE_INDEX
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]
    return torch.tensor(labels, dtype=torch.long)


def count_rendered_images(text: str, marker: str, n_images: int) -> None:
    found = text.count(marker)
    if found != n_images:
        raise BadRow(
            "image count",
            f"the chat template wrote {found} {marker} markers for {n_images} images "
            f"(does it drop images outside human turns?)",
        )


# -- batching --------------------------------------------------------------------------------------


def collate(samples: list[Sample], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch: input_ids, attention_mask (1/0), labels (IGNORE_INDEX on padding).

    The images batch as the samples' family says (its `collate_images`). LLaVA family: pixel_values
    (N_total, 3, H, W), every sample's images in order; IDEFICS: pixel_values (B, N_max, 3, H, W) and
    image_attention_mask (B, T_max, N_max), zero-padded; LLaVA-NeXT: pixel_values (N_total, V_max, 3, h, w)
    and image_sizes (N_total, 2); all absent when no sample has an image.

        >>> batch = collate(samples[:4], pad_token_id=0)
        >>> model(**batch).loss
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    names = {s.family for s in samples}
    if len(names) > 1:
        titles = " and ".join(sorted(family_named(n).title for n in names))
        raise ValueError(f"the samples mix the {titles} families; a batch holds one family's samples")
    B, T = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        if s.labels.shape != s.input_ids.shape:
            raise ValueError(
                f"row {s.row}: labels {tuple(s.labels.shape)} != input_ids {tuple(s.input_ids.shape)}"
            )
        input_ids[b, :n] = s.input_ids
        attention_mask[b, :n] = 1
        labels[b, :n] = s.labels
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    batch.update(family_named(names.pop()).collate_images(samples, T))
    return batch
