"""ViP-Bench: open questions about regions marked by visual prompts, graded by an LLM judge.

The bbox split's prompts are drawn here, from the box annotations of the source pictures, with
`vlmkit.visual_prompts` (a rectangle per `<obj>` of the question, named by its colour in the text); the
human split's pictures carry the prompts people drew, and are used as given. The judge is any
OpenAI-compatible endpoint, asked with the benchmark's own prompt (MM-Vet's format: a few graded examples,
then "question | ground truth | prediction | "), answering a correctness in [0, 1] that is read as the
benchmark's evaluator reads it; scores are reported x 100, in total and per capability."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmkit.eval.data import DataError, Sample, field_of, find_file, read_json, read_jsonl

VIPBENCH_LAYOUT = """  ViP-Bench/
    vip-bench-meta-data.json    {"v1_0": {"image_source": "v1_1.png", "image": "v1_1_0.png", "question": "... <obj> ...", "answer": "...", "capability": ["ocr", ...]}}
    source_image/v1_1.png, v1_1.json    the plain picture and its labelme annotation: {"shapes": [{"label": "obj", "points", "shape_type": "rectangle" | "polygon"}]}
    human/questions.jsonl       {"image": "v1_1_0.png", "text", "question_id"} a line
    human/images/v1_1_0.png     the picture with the prompts people drew"""

# The colours of the bbox split's rectangles, in the order of the question's <obj> markers.
BOX_COLORS = ("red", "blue", "lime", "yellow", "fuchsia", "aqua", "orange", "purple", "gold")
OBJ = re.compile(r"<(obj\d*)>")

JUDGE_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation within the yellow rectangle? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation within the yellow rectangle? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation within the yellow rectangle? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation within the red rectangle? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation within the orange rectangle? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme within the blue rectangle? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme within the blue rectangle? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
# the evaluator's temperatures: the first query, then the query with RETRY_SUFFIX at rising temperatures
JUDGE_TEMPERATURES = (0.0, 0.0, 0.5, 1.0, 1.5)


def read_vipbench(
    data: Path, images: Path | None = None, task: str = "vipbench-bbox", split: str = "bbox"
) -> list[Sample]:
    """The questions of one split, keyed by the meta-data's ids (v1_0, ...), which the benchmark's
    evaluator and its server key the answers by."""
    path = find_file(data, ("vip-bench-meta-data.json",), task, VIPBENCH_LAYOUT)
    meta = read_json(path, task, VIPBENCH_LAYOUT)
    if not isinstance(meta, dict):
        raise DataError(f"{task}: {path} should map question ids to questions, got {type(meta).__name__}")
    root = images or path.parent
    if split == "human":
        return human_samples(meta, root, path, task)
    if split != "bbox":
        raise ValueError(f"{task}: ViP-Bench splits are 'bbox' and 'human', got {split!r}")
    samples = []
    for key, entry in meta.items():
        where = f"{path} {key}"
        source = root / "source_image" / field_of(entry, "image_source", where, task)
        prompts, question = boxes_for(entry, source, where, task)
        samples.append(vip_sample(key, entry, source, question, prompts, where, task))
    return samples


def boxes_for(entry: dict[str, Any], source: Path, where: str, task: str) -> tuple[list[dict[str, Any]], str]:
    """The rectangles of the question's <obj> markers, from the source picture's labelme file, and the
    question with each marker replaced by "within the <colour> rectangle"."""
    question = field_of(entry, "question", where, task)
    labels = list(dict.fromkeys(OBJ.findall(question)))
    if not labels:
        return [], question
    annotation = source.with_suffix(".json")
    shapes = field_of(read_json(annotation, task, VIPBENCH_LAYOUT), "shapes", str(annotation), task)
    if len(labels) > len(BOX_COLORS):
        raise DataError(f"{task}: {where} marks {len(labels)} objects; at most {len(BOX_COLORS)} are drawn")
    prompts = []
    for label, color in zip(labels, BOX_COLORS, strict=False):
        shape = next((s for s in shapes if isinstance(s, dict) and s.get("label") == label), None)
        if shape is None:
            raise DataError(f"{task}: {where} asks about <{label}>, which {annotation} does not annotate")
        points = field_of(shape, "points", f"{annotation} shape {label}", task)
        if shape.get("shape_type", "rectangle") not in ("rectangle", "polygon") or len(points) < 2:
            raise DataError(f"{task}: {annotation} shape {label} is not a rectangle or polygon")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        prompts.append({"type": "rectangle", "box": [min(xs), min(ys), max(xs), max(ys)], "color": color})
        question = question.replace(f"<{label}>", f"within the {color} rectangle")
    return prompts, question


def human_samples(meta: dict[str, Any], root: Path, path: Path, task: str) -> list[Sample]:
    questions_file = root / "human" / "questions.jsonl"
    by_image = {field_of(v, "image", f"{path} {k}", task): k for k, v in meta.items()}
    samples = []
    for n, row in enumerate(read_jsonl(questions_file, task, VIPBENCH_LAYOUT), 1):
        where = f"{questions_file} line {n}"
        image = field_of(row, "image", where, task)
        if image not in by_image:
            raise DataError(f"{task}: {where} names picture {image!r}, which {path} does not list")
        key = by_image[image]
        picture = root / "human" / "images" / image
        samples.append(
            vip_sample(key, meta[key], picture, field_of(row, "text", where, task), [], where, task)
        )
    return samples


def vip_sample(
    key: str,
    entry: dict[str, Any],
    picture: Path,
    question: str,
    prompts: list[dict[str, Any]],
    where: str,
    task: str,
) -> Sample:
    capability = field_of(entry, "capability", where, task)
    return Sample(
        id=key,
        images=[picture],
        question=question,
        target=field_of(entry, "answer", where, task),
        visual_prompts=prompts,
        answer=str(entry["answer"]).split("<OR>")[0].split("<AND>")[0].strip(),
        meta={"capability": list(capability)},
    )


def judge_query(question: str, answer: str, prediction: str, *, retry: bool = False) -> str:
    """The benchmark's judge prompt for one answer (with the evaluator's suffix when asked again)."""
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    query = JUDGE_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])
    return query + RETRY_SUFFIX if retry else query


def parse_judge_score(content: str) -> float | None:
    """The evaluator's reading of a judge reply: its first word as a number in [0, 1], else None."""
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def judge_one(
    ask: Callable[[str, float], str], question: str, answer: str, prediction: str
) -> dict[str, Any]:
    """Grade one answer: the query, then the query asked again (up to four times, rising temperature) until
    the reply parses; 0.0 when none does, as the benchmark's evaluator scores it."""
    replies = []
    for attempt, temperature in enumerate(JUDGE_TEMPERATURES):
        content = ask(judge_query(question, answer, prediction, retry=attempt > 0), temperature)
        replies.append(content)
        score = parse_judge_score(content)
        if score is not None:
            return {"score": score, "replies": replies}
    return {"score": 0.0, "replies": replies}


def openai_judge(
    url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0
) -> Callable[[str, float], str]:
    """ask(prompt, temperature) -> the reply of `model` at an OpenAI-compatible endpoint (`url`: its base,
    such as http://host:8000/v1, or the full /chat/completions address), three tokens at most as the
    benchmark asks; the key from api_key or OPENAI_API_KEY when set."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    key = api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"

    def ask(prompt: str, temperature: float) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 3,
            "temperature": temperature,
        }
        request = urllib.request.Request(endpoint, json.dumps(body).encode(), headers, method="POST")
        for wait in (1, 2, 4, None):  # rate limits and restarts pass; a lasting failure is reported
            try:
                with urllib.request.urlopen(request, timeout=timeout) as r:
                    reply = json.loads(r.read())
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                if e.code not in (429, 500, 502, 503, 504) or wait is None:
                    detail = e.read()[:300].decode(errors="replace")
                    raise RuntimeError(f"the judge at {endpoint} answered {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if wait is None:
                    raise RuntimeError(
                        f"cannot reach the judge at {endpoint} ({e}); the answers are saved: run again to "
                        "resume the grading"
                    ) from None
            except (KeyError, IndexError, json.JSONDecodeError):
                raise RuntimeError(
                    f"the judge at {endpoint} did not answer as an OpenAI chat completion"
                ) from None
            time.sleep(wait)
        raise AssertionError("unreachable")

    return ask


def score_vipbench(samples: list[Sample], judged: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Total and per-capability scores (x 100) of the judged answers; without a judge, how many were
    answered (the answers wait in the results for later grading)."""
    grades = [(s, j["score"]) for s, j in zip(samples, judged, strict=True) if j is not None]
    if not grades:
        return {"answered": len(samples), "judged": 0}
    by_capability: dict[str, list[float]] = defaultdict(list)
    for s, score in grades:
        for c in set(s.meta.get("capability", [])):
            by_capability[c].append(score)
    return {
        "total": 100 * sum(score for _, score in grades) / len(grades),
        "by_capability": {k: 100 * sum(v) / len(v) for k, v in sorted(by_capability.items())},
        "answered": len(samples),
        "judged": len(grades),
    }


def answers_for_evaluator(samples: list[Sample], outputs: list[str]) -> dict[str, str]:
    """{"v1_0": answer, ...}: the file the benchmark's evaluator script and its evaluation server take."""
    return {s.id: out for s, out in zip(samples, outputs, strict=True)}
