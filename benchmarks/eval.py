"""Evaluation throughput: `vlmkit eval` at batch 16 (the continuous-batching engine) against a one-at-a-time
loop with transformers' `generate`, on the same demo model, task and questions, in one run.

The task is VQAv2 (its published layout, written from the shapes world: the 200 counting questions the demo
model's known accuracy is measured on), for the ViP-LLaVA demo or the IDEFICS one (`--family`); both sides
build each prompt with vlmkit's processor through the checkpoint's chat template (tensors equal to
transformers' processor's), answer greedily with the same budget and end tokens, and are scored with the same
VQA metric. Samples/s counts reading the task and its pictures, answering and scoring: the model is loaded
before the clock starts on both sides, and each side first answers the first `--warmup` questions untimed
(the first calls of a process pay for kernel set-up and template compilation; `--warmup 0` times a cold
start).

    .venv/bin/python benchmarks/eval.py [--family vipllava|idefics] [--n 200] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from vlmkit.eval import evaluate, get_task
from vlmkit.eval.run import messages_for
from vlmkit.eval.shapes import known_examples, write_vqav2
from vlmkit.models import builtin_model, family_of, stop_token_ids
from vlmkit.vlm import VLM

PROMPT = "{question}"  # the demo model was trained on the bare question
BUDGET = 32  # the VQA tasks' answer budget
NAMES = {"vipllava": "demo", "idefics": "demo-idefics"}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def transformers_loop(data: Path, warmup: int, family: str) -> tuple[float, list[str], dict]:
    """Seconds to answer and score every question one at a time with transformers' generate (after
    answering the first `warmup` untimed), the answers and the scores."""
    from transformers import IdeficsForVisionText2Text, VipLlavaForConditionalGeneration

    classes = {"vipllava": VipLlavaForConditionalGeneration, "idefics": IdeficsForVisionText2Text}
    folder = builtin_model(NAMES[family])
    # transformers' IDEFICS cannot initialise "normal" alphas (torch.normal with an int size) before it loads
    # the checkpoint's own values over them
    init = {"alpha_initializer": "zeros"} if family == "idefics" else {}
    model = classes[family].from_pretrained(folder, dtype=torch.float32, **init).eval()
    vlm = VLM.load(NAMES[family])  # its processor only: the same prompts and pixels as vlmkit's side
    eos = stop_token_ids(vlm.tokenizer, family_of(vlm.model))
    task = get_task("vqav2")

    def answer(s: object) -> str:
        inputs = vlm.chat_inputs(messages_for(s, PROMPT, []))
        out = model.generate(
            **inputs,
            max_new_tokens=BUDGET,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=vlm.tokenizer.pad_token_id,
        )
        new = out[0, inputs["input_ids"].shape[1] :]
        return vlm.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()

    with torch.inference_mode():
        for s in task.samples(data)[:warmup]:
            answer(s)
        start = time.perf_counter()  # the task's files are read on the clock, as `evaluate` reads them
        samples = task.samples(data)
        answers = [answer(s) for s in samples]
        scores, _ = task.score(samples, answers)
    return time.perf_counter() - start, answers, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(NAMES), default="vipllava")
    ap.add_argument("--n", type=int, default=200, help="questions (the known counting questions of the demo)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=16, help="questions each side answers before the clock")
    ap.add_argument("--output", type=Path, default=Path("build/bench/eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "vqav2"
        write_vqav2(data, known_examples(args.family, "count", 200)[: args.n])
        vlm = VLM.load(NAMES[args.family])  # as `vlmkit eval` loads it
        if args.warmup:
            evaluate(
                "vqav2",
                data,
                vlm,
                prompt=PROMPT,
                limit=args.warmup,
                batch_size=args.batch_size,
                progress=False,
            )
        start = time.perf_counter()
        ours = evaluate("vqav2", data, vlm, prompt=PROMPT, batch_size=args.batch_size, progress=False)
        ours_s = time.perf_counter() - start
        theirs_s, theirs, theirs_scores = transformers_loop(data, args.warmup, args.family)
    same = sum(r["output"] == t for r, t in zip(ours.samples, theirs, strict=True))
    result = {
        "cpu": cpu_name(),
        "model": NAMES[args.family],
        "threads": args.threads,
        "questions": args.n,
        "warmup": args.warmup,
        "vlmkit": {"batch_size": args.batch_size, "seconds": ours_s, "samples_per_s": args.n / ours_s,
                   "accuracy": ours.scores["accuracy"]},
        "transformers": {"batch_size": 1, "seconds": theirs_s, "samples_per_s": args.n / theirs_s,
                         "accuracy": theirs_scores["accuracy"]},
        "speedup": theirs_s / ours_s,
        "same_answers": same,
    }  # fmt: skip
    print(
        f"{result['cpu']}, {args.threads} threads, {args.n} VQAv2-layout questions, {NAMES[args.family]}, "
        f"{args.warmup} answered first untimed\n"
        f"  vlmkit eval, batch {args.batch_size}: {result['vlmkit']['samples_per_s']:.1f} samples/s "
        f"(accuracy {ours.scores['accuracy']:.1f})\n"
        f"  transformers, one at a time: {result['transformers']['samples_per_s']:.1f} samples/s "
        f"(accuracy {theirs_scores['accuracy']:.1f})\n"
        f"  speed-up {result['speedup']:.1f}x; identical answers {same}/{args.n}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
