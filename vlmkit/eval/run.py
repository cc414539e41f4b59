"""`evaluate()`: a benchmark's questions through the continuous-batching engine, scored by the task's metric,
with every answer kept next to the scores, and resumable from a partial results file.

    from vlmkit.eval import evaluate
    result = evaluate("vqav2", "data/vqav2", model="llava-hf/vip-llava-7b-hf", batch_size=16,
                      output="results.json")
    result.scores  # {"accuracy": 78.3, "by_answer_type": {...}}

Answers are greedy, and the engine gives each request the answer the model gives it alone, so batch size,
arrival order and resuming do not change them: a rerun gives the same numbers. Requests are submitted as
their pictures are prepared (the engine decodes meanwhile), a bounded number ahead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.eval.batching import Job, engine_answers
from vlmkit.eval.data import Sample, check_images, options_text
from vlmkit.eval.fewshot import SELECTIONS, picture_features, random_demonstrations, rices_demonstrations
from vlmkit.eval.tasks import Task, get_task
from vlmkit.eval.vipbench import answers_for_evaluator, judge_one, openai_judge, score_vipbench
from vlmkit.models import DEFAULT_MODEL

SAVE_EVERY_S = 5.0  # how often a running evaluation rewrites its partial results file


@dataclass
class EvalResult:
    """The scores, one record per sample (its prompt, the model's answer, the target and its score), and the
    run's speed; `path` is the results file when one was written."""

    task: str
    model: str
    scores: dict[str, Any]
    samples: list[dict[str, Any]]
    seconds: float
    answered: int  # samples answered by this run (the rest came from the results file)
    errors: int
    path: Path | None = None
    extra_files: list[Path] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def render_prompt(template: str, sample: Sample) -> str:
    try:
        return template.format(question=sample.question, options=options_text(sample.options))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"the prompt template {template!r} does not format ({e!r}): it may use {{question}} and {{options}}; "
            "write other braces doubled"
        ) from None


def pictures(sample: Sample) -> list[Any]:
    """The sample's pictures, loaded, with its visual prompts drawn on the first."""
    from vlmkit.images import load_image
    from vlmkit.visual_prompts import draw_visual_prompts

    loaded = [load_image(p) for p in sample.images]
    if sample.visual_prompts:
        loaded[0] = draw_visual_prompts(loaded[0], sample.visual_prompts)
    return loaded


def messages_for(sample: Sample, template: str, demonstrations: list[Sample]) -> list[dict[str, Any]]:
    """The conversation asked: each demonstration as a user turn and its reference answer, then the query."""
    from vlmkit.vlm import user_turn

    out: list[dict[str, Any]] = []
    for d in demonstrations:
        out.append(user_turn(render_prompt(template, d), pictures(d)))
        out.append({"role": "assistant", "content": d.answer or ""})
    out.append(user_turn(render_prompt(template, sample), pictures(sample)))
    return out


def limit_samples(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` questions (a circular MMBench question keeps all its passes)."""
    if limit is None:
        return samples
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    groups: list[str] = []
    out = []
    for s in samples:
        g = str(s.meta.get("group", s.id))
        if g not in groups:
            if len(groups) == limit:
                break
            groups.append(g)
        out.append(s)
    return out


def load_results(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The answered samples of an earlier run of the same evaluation, by id; an error when the file was
    written by a different one (task, model, data or settings)."""
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a vlmkit eval results file ({e}); pass another --output") from None
    if not isinstance(old, dict) or "samples" not in old:
        raise ValueError(f"{path} is not a vlmkit eval results file; pass another --output")
    for key, value in header.items():
        if old.get(key) != value:
            raise ValueError(
                f"{path} holds another evaluation ({key}: {old.get(key)!r}, this run: {value!r}); pass another "
                "--output, or remove the file to start over"
            )
    return {r["id"]: r for r in old["samples"] if "output" in r}


def write_json(path: Path, content: Any) -> None:
    """Written to a temporary file, then renamed: a kill leaves the previous version whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def evaluate(
    task: str,
    data: str | os.PathLike,
    model: Any = DEFAULT_MODEL,
    *,
    images: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    shots: int = 0,
    shot_selection: str = "random",
    support: str | os.PathLike | None = None,
    seed: int = 0,
    split: str | None = None,
    circular: bool | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_workers: int = 4,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_parts: tuple[str, ...] | list[str] = (),
    max_seq_len: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `model` (a checkpoint folder, hub id, built-in demo name, or a loaded `vlmkit.VLM`) on `task`
    (see `vlmkit.eval.TASKS`) with the benchmark's files at `data` (pictures there or under `images`).

    limit: the first N questions; batch_size: requests decoded together; prompt: the user text template
    ({question}, {options}; default: the task's); shots: in-context examples per question (VQA and
    captioning tasks), `shot_selection` "random" or "rices", drawn from `support` (files in the task's layout;
    default: the evaluated data, never the question itself); judge_url / judge_model: an OpenAI-compatible
    judge for ViP-Bench; output: the results file, resumed when it holds a partial run of this evaluation."""
    from vlmkit.vlm import VLM

    started = time.perf_counter()
    t = get_task(task)
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and not t.fewshot:
        raise ValueError(f"task {task} is not evaluated few-shot; shots work for VQA and captioning tasks")
    if shot_selection not in SELECTIONS:
        raise ValueError(f"shot_selection must be one of {SELECTIONS}, got {shot_selection!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if (judge_url is None) != (judge_model is None):
        raise ValueError("a judge needs both --judge-url and --judge-model")
    if judge_url is not None and t.score is not None:
        raise ValueError(f"task {task} is scored by its own metric, not by a judge")
    samples = limit_samples(t.samples(data, images, split=split, circular=circular), limit)
    check_images(samples, task, t.layout)
    template = prompt if prompt is not None else t.prompt
    budget = max_new_tokens if max_new_tokens is not None else t.max_new_tokens
    support_samples: list[Sample] = []
    if shots:
        support_samples = t.samples(support, images, split=split) if support is not None else samples
        check_images(support_samples, task, t.layout)
    name = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
    header = {
        "task": task,
        "model": str(name),
        "data": str(Path(data).resolve()),
        "settings": {
            "prompt": template,
            "max_new_tokens": budget,
            "shots": shots,
            "shot_selection": shot_selection if shots else None,
            "support": str(Path(support).resolve()) if support is not None else None,
            "seed": seed,
            "split": split,
            "circular": circular,
            "dtype": dtype,
            "quantize": quantize,
            "group_size": group_size,
            "quantize_parts": list(quantize_parts),
        },
    }
    path = Path(output) if output is not None else None
    done = load_results(path, header) if path is not None and path.exists() else {}
    records: list[dict[str, Any] | None] = [done.get(s.id) for s in samples]
    todo = [i for i, r in enumerate(records) if r is None]

    def save(scores: dict[str, Any] | None) -> None:
        if path is not None:
            write_json(path, results_file(header, t, scores, samples, records))

    answered = 0
    if todo:
        vlm = model if isinstance(model, VLM) else None
        if vlm is None:  # the default (one-row) CPU layout: with the prompts joining one prefill, the
            # batched layout measured no faster on the demo's evaluation (2026-12-07, AMD EPYC)
            vlm = VLM.load(
                model,
                dtype=dtype,
                device=device,
                progress=progress,
                quantize=quantize,
                group_size=group_size,
                quantize_parts=quantize_parts,
            )
        demos = demonstrations(vlm, [samples[i] for i in todo], support_samples, shots, shot_selection, seed)
        try:
            answered = answer_all(
                vlm, samples, todo, demos, support_samples, template, budget, batch_size, max_seq_len,
                records, save, progress, task,
            )  # fmt: skip
        finally:
            save(None)
    outputs = [r["output"] if r is not None else "" for r in records]
    extra: list[Path] = []
    if t.score is not None:
        scores, per = t.score(samples, outputs)
        for r, p in zip(records, per, strict=True):
            r.update(p)
    else:
        if judge_url is not None:
            judge_all(samples, records, openai_judge(judge_url, judge_model), judge_workers, save, progress)
        scores = score_vipbench(samples, [r.get("judge") for r in records])
        if path is not None:  # the answers as the benchmark's evaluator script and server take them
            extra.append(path.with_name(path.stem + "-answers.json"))
            write_json(extra[-1], answers_for_evaluator(samples, outputs))
    save(scores)
    errors_total = sum("error" in r for r in records)
    if errors_total:
        print(
            f"vlmkit eval: {errors_total} request(s) failed and count as wrong answers; see 'error' in the results",
            file=sys.stderr,
        )
    return EvalResult(
        task=task,
        model=str(name),
        scores=scores,
        samples=records,
        seconds=time.perf_counter() - started,
        answered=answered,
        errors=errors_total,
        path=path,
        extra_files=extra,
    )


def demonstrations(
    vlm: Any, queries: list[Sample], support: list[Sample], shots: int, selection: str, seed: int
) -> list[list[int]]:
    if not shots:
        return [[] for _ in queries]
    if selection == "random":
        return random_demonstrations(queries, support, shots, seed)
    return rices_demonstrations(
        queries, support, shots, lambda group: picture_features(vlm, [pictures(s)[0] for s in group])
    )


def picture_order(samples: list[Sample]) -> list[int]:
    """Positions of `samples` with the questions about one picture (the same first picture and visual prompts)
    next to each other, pictures in order of first appearance: the engine then computes a picture's start of
    the prompt once and its other questions take it from the prefix cache while it is fresh."""
    groups: dict[Any, list[int]] = {}
    for k, s in enumerate(samples):
        first = s.images[0] if s.images else None
        if isinstance(first, os.PathLike):
            first = str(first)
        elif not isinstance(first, (str, bytes, type(None))):  # a picture object: itself only
            first = id(first)
        key = (first, json.dumps(s.visual_prompts, sort_keys=True))
        groups.setdefault(key, []).append(k)
    return [k for members in groups.values() for k in members]


def answer_all(
    vlm: Any,
    samples: list[Sample],
    todo: list[int],
    demos: list[list[int]],
    support: list[Sample],
    template: str,
    budget: int,
    batch_size: int,
    max_seq_len: int | None,
    records: list[dict[str, Any] | None],
    save: Callable[[dict[str, Any] | None], None],
    progress: bool,
    task: str,
) -> int:
    """Answer the samples at `todo` through the engine; each answer goes into `records` as it arrives, and the
    partial results are saved every few seconds. Returns how many were answered."""
    import torch
    from tqdm.auto import tqdm

    from vlmkit.serve.engine import SamplingParams

    torch.manual_seed(0)

    def job(i: int, shot_ids: list[int]) -> Job:
        shown = [support[j] for j in shot_ids]
        return Job(
            key=(i, shot_ids),
            inputs=lambda: vlm.chat_inputs(messages_for(samples[i], template, shown)),
            params=SamplingParams(max_tokens=budget),
        )

    order = picture_order([samples[i] for i in todo])
    jobs = (job(todo[k], demos[k]) for k in order)
    last_save = time.monotonic()
    answered = 0
    with tqdm(total=len(todo), desc=task, unit="q", disable=not progress, file=sys.stderr) as bar:
        for a in engine_answers(vlm, jobs, batch_size=batch_size, max_seq_len=max_seq_len):
            i, shot_ids = a.key
            s = samples[i]
            record: dict[str, Any] = {"id": s.id, "prompt": render_prompt(template, s), "target": s.target}
            if shot_ids:
                record["shots"] = [support[j].id for j in shot_ids]
            record.update(output=a.text.strip(), finish_reason=a.finish_reason)
            if a.error is not None:
                record["error"] = a.error
            records[i] = record
            answered += 1
            bar.update(1)
            if time.monotonic() - last_save > SAVE_EVERY_S:
                save(None)
                last_save = time.monotonic()
    return answered


def judge_all(
    samples: list[Sample],
    records: list[dict[str, Any]],
    ask: Any,
    workers: int,
    save: Any,
    progress: bool,
) -> None:
    """Grade every answer not graded yet (a resumed run keeps earlier grades), `workers` at a time."""
    from tqdm.auto import tqdm

    pending = [i for i, r in enumerate(records) if "judge" not in r]
    if not pending:
        return
    bar = tqdm(total=len(pending), desc="judge", unit="q", disable=not progress, file=sys.stderr)
    last_save = time.monotonic()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {
            pool.submit(judge_one, ask, samples[i].question, str(samples[i].target), records[i]["output"]): i
            for i in pending
        }
        try:
            for future in futures:
                records[futures[future]]["judge"] = future.result()
                bar.update(1)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    save(None)
                    last_save = time.monotonic()
        finally:
            bar.close()
            for future in futures:
                future.cancel()


def results_file(
    header: dict[str, Any],
    task: Task,
    scores: dict[str, Any] | None,
    samples: list[Sample],
    records: list[dict[str, Any] | None],
) -> dict[str, Any]:
    done = [r for r in records if r is not None]
    return {
        **header,
        "metric": task.metric,
        "scores": scores,
        "complete": scores is not None,
        "answered": len(done),
        "total": len(samples),
        "samples": done,
    }
