"""The task registry: each benchmark's reader, its official metric, the prompt it is asked with and its answer
budget, in one entry. `vlmkit eval --task NAME` and `evaluate(task=NAME)` look tasks up here."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.eval import caption, choice, pope, vipbench, vqa
from vlmkit.eval.data import Sample

Scorer = Callable[[list[Sample], list[str]], tuple[dict[str, Any], list[dict[str, Any]]]]

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt
MULTIPLE_CHOICE = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Task:
    """A benchmark: `read(data, images, **options)` -> samples; `score(samples, answers)` -> (metrics, one
    record per sample), or None for a judged task (ViP-Bench); `prompt`: the user text, a template of
    {question} and {options}; `options`: the reader's keyword options (split, circular)."""

    name: str
    read: Callable[..., list[Sample]]
    score: Scorer | None
    metric: str
    prompt: str
    max_new_tokens: int
    layout: str
    fewshot: bool = False
    options: tuple[str, ...] = ()

    def samples(self, data: str | Path, images: str | Path | None = None, **options: Any) -> list[Sample]:
        unknown = sorted(k for k, v in options.items() if v is not None and k not in self.options)
        if unknown:
            raise ValueError(
                f"task {self.name} takes no {unknown} option (it takes {list(self.options) or 'none'})"
            )
        given = {k: v for k, v in options.items() if v is not None}
        return self.read(Path(data), None if images is None else Path(images), task=self.name, **given)


def registry() -> dict[str, Task]:
    vizwiz_prompt = (
        "{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )
    caption_prompt = "Provide a one-sentence caption for the provided image."
    vqa_metric = "VQA accuracy (VQAv2 normalisation, min(#humans/3, 1) over 10 answers)"
    choice_metric = "accuracy of the extracted option letter"
    tasks = [
        Task("vqav2", vqa.read_vqav2, vqa.score_vqa, vqa_metric, SHORT_ANSWER, 32, vqa.VQAV2_LAYOUT, True),
        Task("okvqa", vqa.read_vqav2, vqa.score_vqa, vqa_metric, SHORT_ANSWER, 32, vqa.VQAV2_LAYOUT, True),
        Task(
            "textvqa", vqa.read_textvqa, vqa.score_vqa, vqa_metric, SHORT_ANSWER, 32, vqa.TEXTVQA_LAYOUT, True
        ),
        Task(
            "vizwiz", vqa.read_vizwiz, vqa.score_vqa, vqa_metric, vizwiz_prompt, 32, vqa.VIZWIZ_LAYOUT, True
        ),
        Task(
            "visual7w",
            choice.read_visual7w,
            choice.score_choice,
            choice_metric,
            MULTIPLE_CHOICE,
            32,
            choice.VISUAL7W_LAYOUT,
            options=("split",),
        ),
        Task(
            "scienceqa",
            choice.read_scienceqa,
            choice.score_choice,
            choice_metric,
            MULTIPLE_CHOICE,
            32,
            choice.SCIENCEQA_LAYOUT,
            options=("split",),
        ),
        Task(
            "mmbench",
            choice.read_mmbench,
            choice.score_choice,
            choice_metric + "; circular accuracy (every rotation of the options right)",
            MULTIPLE_CHOICE,
            32,
            choice.MMBENCH_LAYOUT,
            options=("circular",),
        ),
        Task(
            "pope",
            pope.read_pope,
            pope.score_pope,
            "accuracy, precision, recall, F1 (yes positive), yes ratio",
            SHORT_ANSWER,
            32,
            pope.POPE_LAYOUT,
        ),
        Task(
            "coco",
            caption.read_captions,
            caption.score_captions,
            "CIDEr (pycocoevalcap, x 100)",
            caption_prompt,
            64,
            caption.CAPTION_LAYOUT,
            True,
            ("split",),
        ),
        Task(
            "flickr30k",
            caption.read_captions,
            caption.score_captions,
            "CIDEr (pycocoevalcap, x 100)",
            caption_prompt,
            64,
            caption.CAPTION_LAYOUT,
            True,
            ("split",),
        ),
    ]
    for split in ("bbox", "human"):
        tasks.append(
            Task(
                f"vipbench-{split}",
                functools.partial(vipbench.read_vipbench, split=split),
                None,
                "LLM-judge correctness x 100, total and per capability",
                "{question}",
                512,
                vipbench.VIPBENCH_LAYOUT,
            )
        )
    return {t.name: t for t in tasks}


TASKS = registry()


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
