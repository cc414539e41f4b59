"""POPE (object hallucination): yes/no questions about COCO pictures, scored as POPE's own evaluation scores
them: an answer is "no" when its first sentence holds the word "no" or "not" (or "No"), else "yes"; then
accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes" answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.eval.data import DataError, Sample, field_of, find_file, image_path, read_jsonl

POPE_LAYOUT = """  pope/
    coco_pope_random.json       one JSON object a line: {"question_id", "image": "COCO_val2014_000000310196.jpg", "text", "label": "yes" | "no"}
    coco_pope_popular.json, coco_pope_adversarial.json   (pass the one to evaluate as --data)
    val2014/COCO_val2014_000000310196.jpg                (or --images DIR: your COCO val2014 folder)"""


def read_pope(data: Path, images: Path | None = None, task: str = "pope") -> list[Sample]:
    path = find_file(data, ("coco_pope_*.json", "*pope*.json*"), task, POPE_LAYOUT)
    root = images or path.parent
    samples = []
    for n, row in enumerate(read_jsonl(path, task, POPE_LAYOUT), 1):
        where = f"{path} line {n}"
        label = str(field_of(row, "label", where, task)).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{task}: {where} has label {label!r}; POPE labels are 'yes' or 'no'")
        name = field_of(row, "image", where, task)
        samples.append(
            Sample(
                id=str(row.get("question_id", n)),
                images=[image_path(root, [f"val2014/{name}", name])],
                question=field_of(row, "text", where, task),
                target=label,
                answer=label,
            )
        )
    return samples


def yes_or_no(answer: str) -> str:
    """POPE's reading of an answer: its first sentence, commas dropped, "no" when it has the word No/no/not."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (in %, "yes" positive) and the share of yes answers."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100 * (tp + tn) / max(len(pairs), 1),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * (tp + fp) / max(len(pairs), 1),
    }


def score_pope(samples: list[Sample], outputs: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    predictions = [yes_or_no(o) for o in outputs]
    per = [
        {"score": float(p == s.target), "prediction": p} for s, p in zip(samples, predictions, strict=True)
    ]
    return pope_metrics(predictions, [s.target for s in samples]), per
