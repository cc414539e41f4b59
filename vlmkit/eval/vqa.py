"""Open-ended VQA: VQAv2, OK-VQA, TextVQA and VizWiz, read from their published files and scored with the
VQA accuracy of the official evaluation: answers normalised as the VQA / EvalAI evaluation normalises them
(punctuation, number words to digits, articles dropped, contractions restored), then, for each of the ten
human answers left out in turn, min(#other humans who gave the answer / 3, 1), averaged over the ten."""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from vlmkit.eval.data import (
    DataError,
    Sample,
    field_of,
    find_file,
    image_path,
    read_json,
)

# The tables of the official VQA evaluation (vqaEval.py, as EvalAI and lmms-eval use them).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",")
PUNCTUATION += ("?", "!")
# The official pattern: a period not followed by a digit (its "(?!<=\d)" is a lookahead for "<=" + digit,
# kept as written so that "2.5" stays and "yes." loses its period exactly as the official code does).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


@functools.lru_cache(maxsize=2**16)  # the same human answers recur across questions ("yes", "2")
def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: "Two dogs." -> "2 dogs", "the cat" -> "cat",
    "isnt" -> "isn't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (usually ten): for each human
    left out in turn, min(#other humans who match / 3, 1), averaged."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred = normalize_answer(prediction)
    same = [normalize_answer(a) == pred for a in answers]
    matches = sum(same)  # the others who match, with human i left out: matches - same[i]
    return sum(min(1.0, (matches - s) / 3) for s in same) / len(same)


def score_vqa(samples: list[Sample], outputs: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Overall accuracy (in %) and by answer type, and each sample's accuracy and normalised answer."""
    per = [
        {"score": vqa_accuracy(out, s.target), "normalized": normalize_answer(out)}
        for s, out in zip(samples, outputs, strict=True)
    ]
    by_type: dict[str, list[float]] = defaultdict(list)
    for s, p in zip(samples, per, strict=True):
        if s.meta.get("answer_type"):
            by_type[s.meta["answer_type"]].append(p["score"])
    metrics: dict[str, Any] = {"accuracy": 100 * sum(p["score"] for p in per) / max(len(per), 1)}
    if by_type:
        metrics["by_answer_type"] = {k: 100 * sum(v) / len(v) for k, v in sorted(by_type.items())}
    return metrics, per


def most_common(answers: list[str]) -> str:
    """The demonstration answer of a question: its most frequent human answer (first seen on ties)."""
    return Counter(answers).most_common(1)[0][0]


VQAV2_LAYOUT = """  vqav2/                                       (OK-VQA: the same, without v2_)
    v2_OpenEnded_mscoco_val2014_questions.json   {"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}
    v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "answers": [{"answer": ...} x 10], "multiple_choice_answer", "answer_type"}]}
    val2014/COCO_val2014_000000000042.jpg        (or --images DIR holding val2014/ or the pictures)"""


def read_vqav2(data: Path, images: Path | None = None, task: str = "vqav2") -> list[Sample]:
    """VQAv2 or OK-VQA: a questions file (or the folder holding one) and its annotations file beside it."""
    questions_file = find_file(data, ("*OpenEnded*questions*.json", "*questions*.json"), task, VQAV2_LAYOUT)
    derived = questions_file.with_name(
        questions_file.name.replace("OpenEnded_", "").replace("questions", "annotations")
    )
    annotations_file = (
        derived
        if derived.is_file()
        else find_file(questions_file.parent, ("*annotations*.json",), task, VQAV2_LAYOUT)
    )
    qdata = read_json(questions_file, task, VQAV2_LAYOUT)
    adata = read_json(annotations_file, task, VQAV2_LAYOUT)
    questions = field_of(qdata, "questions", str(questions_file), task)
    annotations = {
        a["question_id"]: a
        for a in field_of(adata, "annotations", str(annotations_file), task)
        if isinstance(a, dict) and "question_id" in a
    }
    subtype = qdata.get("data_subtype", "val2014")
    root = images or questions_file.parent
    samples = []
    for i, q in enumerate(questions):
        where = f"{questions_file} question {i}"
        qid = field_of(q, "question_id", where, task)
        if qid not in annotations:
            raise DataError(
                f"{task}: question {qid} of {questions_file} has no entry in {annotations_file}; "
                "are both files of the same split?"
            )
        ann = annotations[qid]
        answers = [field_of(a, "answer", f"{annotations_file} question {qid}", task) for a in ann["answers"]]
        if not answers:
            raise DataError(f"{task}: question {qid} of {annotations_file} has no answers")
        image_id = int(field_of(q, "image_id", where, task))
        name = f"COCO_{subtype}_{image_id:012d}.jpg"
        samples.append(
            Sample(
                id=str(qid),
                images=[image_path(root, [f"{subtype}/{name}", name])],
                question=field_of(q, "question", where, task),
                target=answers,
                answer=ann.get("multiple_choice_answer") or most_common(answers),
                meta={
                    "answer_type": ann.get("answer_type", ""),
                    "question_type": ann.get("question_type", ""),
                },
            )
        )
    return samples


TEXTVQA_LAYOUT = """  textvqa/
    TextVQA_0.5.1_val.json                     {"data": [{"question_id", "image_id", "question", "answers": [10 strings]}]}
    train_images/0054c91397f2fe05.jpg          (the val pictures ship in train_images/; or --images DIR)"""


def read_textvqa(data: Path, images: Path | None = None, task: str = "textvqa") -> list[Sample]:
    path = find_file(data, ("TextVQA_*_val.json", "TextVQA_*.json"), task, TEXTVQA_LAYOUT)
    rows = field_of(read_json(path, task, TEXTVQA_LAYOUT), "data", str(path), task)
    root = images or path.parent
    samples = []
    for i, row in enumerate(rows):
        where = f"{path} entry {i}"
        answers = field_of(row, "answers", where, task)
        if not answers:
            raise DataError(f"{task}: {where} has no answers (the test split has none: evaluate val)")
        image_id = field_of(row, "image_id", where, task)
        samples.append(
            Sample(
                id=str(field_of(row, "question_id", where, task)),
                images=[image_path(root, [f"train_images/{image_id}.jpg", f"{image_id}.jpg"])],
                question=field_of(row, "question", where, task),
                target=list(answers),
                answer=most_common(answers),
            )
        )
    return samples


VIZWIZ_LAYOUT = """  vizwiz/
    Annotations/val.json                       [{"image", "question", "answers": [{"answer", "answer_confidence"} x 10], "answer_type"}]
    val/VizWiz_val_00000000.jpg                (or --images DIR)"""


def read_vizwiz(data: Path, images: Path | None = None, task: str = "vizwiz") -> list[Sample]:
    path = find_file(data, ("Annotations/val.json", "val.json"), task, VIZWIZ_LAYOUT)
    rows = read_json(path, task, VIZWIZ_LAYOUT)
    if not isinstance(rows, list):
        raise DataError(f"{task}: {path} should be a JSON list of questions, got {type(rows).__name__}")
    base = path.parent.parent if path.parent.name.lower() == "annotations" else path.parent
    root = images or base
    samples = []
    for i, row in enumerate(rows):
        where = f"{path} entry {i}"
        name = field_of(row, "image", where, task)
        answers = [field_of(a, "answer", where, task) for a in field_of(row, "answers", where, task)]
        if not answers:
            raise DataError(f"{task}: {where} has no answers (the test split has none: evaluate val)")
        split = name.split("_")[1] if name.count("_") >= 2 else "val"
        samples.append(
            Sample(
                id=Path(name).stem,
                images=[image_path(root, [f"{split}/{name}", name])],
                question=field_of(row, "question", where, task),
                target=answers,
                answer=most_common(answers),
                meta={"answer_type": row.get("answer_type", "")},
            )
        )
    return samples
