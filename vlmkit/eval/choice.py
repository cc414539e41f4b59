"""Multiple choice: Visual7W (telling, and pointing with its candidate boxes drawn as visual prompts, as the
ViP-LLaVA paper evaluates it), ScienceQA-IMG and MMBench (with its circular evaluation). The chosen letter
is taken from the answer as MMBench's evaluation takes it: a lone option letter, else the one option whose
text the answer contains; anything else is a wrong answer."""

from __future__ import annotations

import base64
import binascii
import csv
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from vlmkit.eval.data import (
    LETTERS,
    DataError,
    Sample,
    field_of,
    find_file,
    image_path,
    read_json,
)
from vlmkit.visual_prompts import COLORS

SEPARATORS = ".()[],:;!*#{}"


def extract_choice(answer: str, options: list[str]) -> str | None:
    """The option letter an answer picks, or None: "B", "(B) a cat", "The answer is B." -> "B"; else the
    single option whose text appears in the answer ("a cat" -> the option "cat"); never a guess."""
    letters = LETTERS[: len(options)]
    words = answer
    for c in SEPARATORS:
        words = words.replace(c, " ")
    found = [x for x in letters if x in words.split()]
    if len(found) == 1:
        return found[0]
    if found:
        return None
    lowered = answer.lower()
    texts = [x for x, option in zip(letters, options, strict=False) if str(option).lower() in lowered]
    return texts[0] if len(texts) == 1 else None


def score_choice(samples: list[Sample], outputs: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy (in %) over the questions as published (the first pass of a circular set), by category, and
    with circular passes the circular accuracy: a question counts only when every rotation of its options is
    answered right."""
    per = []
    for s, out in zip(samples, outputs, strict=True):
        choice = extract_choice(out, s.options)
        per.append({"score": float(choice == s.target), "choice": choice})
    first = [(s, p) for s, p in zip(samples, per, strict=True) if s.meta.get("pass", 0) == 0]
    metrics: dict[str, Any] = {"accuracy": 100 * sum(p["score"] for _, p in first) / max(len(first), 1)}
    by_category: dict[str, list[float]] = defaultdict(list)
    for s, p in first:
        if s.meta.get("category"):
            by_category[s.meta["category"]].append(p["score"])
    if by_category:
        metrics["by_category"] = {k: 100 * sum(v) / len(v) for k, v in sorted(by_category.items())}
    groups: dict[str, list[float]] = defaultdict(list)
    for s, p in zip(samples, per, strict=True):
        if "group" in s.meta:
            groups[s.meta["group"]].append(p["score"])
    if groups:
        metrics["circular_accuracy"] = 100 * sum(all(v) for v in groups.values()) / len(groups)
    return metrics, per


VISUAL7W_LAYOUT = """  visual7w/
    dataset_v7w_telling.json    {"images": [{"image_id", "filename", "split", "qa_pairs": [{"qa_id", "question", "answer", "multiple_choices": [3], "type"}]}]}
    dataset_v7w_pointing.json   the same, with answer and multiple_choices as box ids, and {"boxes": [{"box_id", "x", "y", "width", "height"}]}
    images/v7w_2354786.jpg      (or --images DIR)"""


def pointing_colors(qa_id: Any, n: int) -> list[str]:
    """n distinct colours of the ViP-LLaVA release for one question's candidate boxes (fixed per question)."""
    return random.Random(f"v7w-{qa_id}").sample(list(COLORS), n)


def read_visual7w(
    data: Path, images: Path | None = None, task: str = "visual7w", split: str = "test"
) -> list[Sample]:
    """Telling: the answer and its three wrong choices as text options. Pointing: the four candidate boxes
    drawn in four colours, the options naming them ("The object within the red rectangle"). Options are
    shuffled with a fixed seed per question, so every run asks the same."""
    path = find_file(data, ("dataset_v7w_*.json",), task, VISUAL7W_LAYOUT)
    raw = read_json(path, task, VISUAL7W_LAYOUT)
    entries = field_of(raw, "images", str(path), task)
    boxes = {b["box_id"]: b for b in raw.get("boxes", []) if isinstance(b, dict) and "box_id" in b}
    root = images or path.parent
    samples = []
    for entry in entries:
        if entry.get("split", split) != split:
            continue
        name = field_of(entry, "filename", f"{path} image {entry.get('image_id')}", task)
        picture = image_path(root, [f"images/{name}", name])
        for qa in field_of(entry, "qa_pairs", f"{path} image {name}", task):
            where = f"{path} question {qa.get('qa_id')}"
            qa_id = field_of(qa, "qa_id", where, task)
            candidates = [field_of(qa, "answer", where, task), *field_of(qa, "multiple_choices", where, task)]
            random.Random(f"v7w-{qa_id}").shuffle(candidates)
            answer = qa["answer"]
            prompts: list[dict[str, Any]] = []
            if boxes:  # pointing: the candidates are boxes
                missing = [b for b in candidates if b not in boxes]
                if missing:
                    raise DataError(f"{task}: {where} names box ids {missing} that {path} does not list")
                colors = pointing_colors(qa_id, len(candidates))
                for box_id, color in zip(candidates, colors, strict=True):
                    b = boxes[box_id]
                    box = [b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
                    prompts.append({"type": "rectangle", "box": box, "color": color})
                options = [f"The object within the {c} rectangle" for c in colors]
            else:
                options = [str(c) for c in candidates]
            letter = LETTERS[candidates.index(answer)]
            samples.append(
                Sample(
                    id=str(qa_id),
                    images=[picture],
                    question=field_of(qa, "question", where, task),
                    options=options,
                    target=letter,
                    answer=letter,
                    visual_prompts=prompts,
                    meta={"category": qa.get("type", "")},
                )
            )
    if not samples:
        raise DataError(f"{task}: {path} has no questions of split {split!r}")
    return samples


SCIENCEQA_LAYOUT = """  scienceqa/
    problems.json               {"<pid>": {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png" | null, "subject", "split"}}
    pid_splits.json             {"test": ["<pid>", ...], ...}
    images/test/<pid>/image.png (or test/<pid>/image.png, or --images DIR)"""


def read_scienceqa(
    data: Path, images: Path | None = None, task: str = "scienceqa", split: str = "test"
) -> list[Sample]:
    """ScienceQA-IMG: the questions of the split that have a picture, the hint as context."""
    path = find_file(data, ("problems.json",), task, SCIENCEQA_LAYOUT)
    problems = read_json(path, task, SCIENCEQA_LAYOUT)
    splits_file = path.with_name("pid_splits.json")
    if splits_file.is_file():
        splits = read_json(splits_file, task, SCIENCEQA_LAYOUT)
        if split not in splits:
            raise DataError(f"{task}: {splits_file} has no split {split!r} (it has {sorted(splits)})")
        pids = [str(p) for p in splits[split]]
    else:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
    root = images or path.parent
    samples = []
    for pid in pids:
        if pid not in problems:
            raise DataError(f"{task}: {splits_file} lists problem {pid}, which {path} does not have")
        p = problems[pid]
        if not p.get("image"):
            continue
        where = f"{path} problem {pid}"
        choices = [str(c) for c in field_of(p, "choices", where, task)]
        answer = int(field_of(p, "answer", where, task))
        if not 0 <= answer < len(choices):
            raise DataError(f"{task}: {where} has answer {answer} for {len(choices)} choices")
        question = field_of(p, "question", where, task)
        hint = (p.get("hint") or "").strip()
        image = p["image"]
        samples.append(
            Sample(
                id=pid,
                images=[image_path(root, [f"images/{split}/{pid}/{image}", f"{split}/{pid}/{image}"])],
                question=f"Context: {hint}\n{question}" if hint else question,
                options=choices,
                target=LETTERS[answer],
                answer=LETTERS[answer],
                meta={"category": p.get("subject", "")},
            )
        )
    return samples


MMBENCH_LAYOUT = """  mmbench/
    mmbench_dev_20230712.tsv    tab-separated, a header row: index, question, hint, A, B, C, D, answer, category, image (base64), ...
                                (an image cell holding another row's index reuses that row's picture)"""


def present(value: str | None) -> bool:
    return value is not None and value.strip() != "" and value.strip().lower() != "nan"


def read_mmbench(
    data: Path, images: Path | None = None, task: str = "mmbench", circular: bool = True
) -> list[Sample]:
    """MMBench-style TSV: the hint before the question, options A.. as present; with circular, each question
    is asked once per rotation of its options (MMBench's CircularEval)."""
    path = find_file(data, ("*.tsv",), task, MMBENCH_LAYOUT)
    csv.field_size_limit(sys.maxsize)  # pictures are base64 inside the cells
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise DataError(f"{task}: {path} has no rows")
    for needed in ("index", "question", "image", "A", "B"):
        if needed not in rows[0]:
            raise DataError(f"{task}: {path} has no {needed!r} column (columns: {list(rows[0])})")
    if "answer" not in rows[0]:
        raise DataError(
            f"{task}: {path} has no 'answer' column: its answers are hidden (test split); evaluate dev"
        )
    pictures = {r["index"]: r["image"] for r in rows}
    samples = []
    for r in rows:
        where = f"{path} row {r['index']}"
        options = [r[x] for x in LETTERS if x in r and present(r[x])]
        cell = r["image"]
        if len(cell) <= 64 and cell in pictures:
            cell = pictures[cell]
        try:
            picture = base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(
                f"{task}: {where}: the image cell is not base64 (nor another row's index)"
            ) from None
        answer = r["answer"].strip()
        if answer not in LETTERS[: len(options)]:
            raise DataError(f"{task}: {where} has answer {answer!r} for options {LETTERS[: len(options)]}")
        hint = r.get("hint")
        question = f"{hint}\n{r['question']}" if present(hint) else r["question"]
        passes = len(options) if circular else 1
        for k in range(passes):
            rotated = options[k:] + options[:k]
            letter = LETTERS[(LETTERS.index(answer) - k) % len(options)]
            meta = {"category": r.get("category", ""), "pass": k}
            if circular:
                meta["group"] = r["index"]
            samples.append(
                Sample(
                    id=r["index"] if k == 0 else f"{r['index']}-c{k}",
                    images=[picture],
                    question=question,
                    options=rotated,
                    target=letter,
                    answer=letter,
                    meta=meta,
                )
            )
    return samples
