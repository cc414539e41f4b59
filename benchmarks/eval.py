"""Evaluation throughput: `vlmkit eval` at batch 16 (the continuous-batching engine) against a one-at-a-time
loop with transformers' `generate`, on the same demo model, task and questions, in one run.

The task (`--task`) is VQAv2 (its published layout, written from the shapes world: the 200 counting
questions the demo model's known accuracy is measured on; one-word answers) or COCO captions (Karpathy's
split file: 200 pictures, each described in a sentence, scored by CIDEr), for the ViP-LLaVA demo or the
IDEFICS one (`--family`); both sides build each prompt with vlmkit's processor through the checkpoint's chat
template (tensors equal to transformers' processor's), answer greedily with the task's budget and the same
end tokens, and are scored with the task's metric. Samples/s counts reading the task and its pictures,
answering and scoring: the model is loaded before the clock starts on both sides, and each side first
answers the first `--warmup` questions untimed (the first calls of a process pay for kernel set-up and
template compilation; `--warmup 0 --repeats 1` times a cold start). Each side then answers the whole task
`--repeats` times, the two sides taking turns, and the median pass of each side counts (one pass of the
batched side takes under a second, so a single pass moved by several percent with the machine's speed).

With `--per-picture K` the VQAv2 task asks K counting questions about each of n / K pictures, consecutive, as
the real set does (5.4 questions per picture on average): the engine runs a picture's shared start once and
its other questions from the prefix cache (their accuracy is not the demo's known one, but both sides answer
the same questions).

`--body LAYERSxWIDTH` puts the demo's processor on a bigger random model (CLIP-B/16 at 224 px: 196 picture
tokens, and a LLaMA of that shape) for prompts of realistic length; its answers are noise, the same on both
sides, and run to the task's answer budget.

    .venv/bin/python benchmarks/eval.py [--family vipllava|idefics] [--task vqav2|coco] [--n 200]
        [--batch-size 16] [--threads 2] [--warmup 16] [--repeats 3] [--per-picture 1] [--body 12x768]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlmkit.eval import evaluate, get_task
from vlmkit.eval.run import messages_for
from vlmkit.eval.shapes import counting_rounds, known_examples, write_captions, write_vqav2
from vlmkit.models import builtin_model, family_of, stop_token_ids
from vlmkit.vlm import VLM

# the demo models were trained on the bare question, and on this request for a description
PROMPTS = {"vqav2": "{question}", "coco": "Describe the image."}
KINDS = {"vqav2": "count", "coco": "caption"}  # the demo's question types each task is written from
NAMES = {"vipllava": "demo", "idefics": "demo-idefics"}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def write_task(task: str, folder: Path, family: str, n: int, per_picture: int = 1) -> None:
    examples = known_examples(family, KINDS[task], 200)[:n]
    if per_picture > 1:  # VQAv2 as it is: several questions per picture
        if task != "vqav2" or n % per_picture:
            raise SystemExit("--per-picture takes --task vqav2 and an --n it divides")
        examples = counting_rounds(n // per_picture, per_picture)
    if task == "vqav2":
        write_vqav2(folder, examples)
    else:
        write_captions(folder, examples)


def body_checkpoint(folder: Path, family: str, body: str) -> Path:
    """The demo model's processor files on a bigger random body (`benchmarks/serve.py`'s: CLIP-B/16 at 224
    px, 196 picture tokens; a LLaMA of LAYERSxWIDTH), written to `folder`."""
    layers, width = (int(x) for x in body.lower().split("x"))
    spec = importlib.util.spec_from_file_location("serve_benchmark", Path(__file__).with_name("serve.py"))
    serve_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_benchmark)
    folder.mkdir(parents=True, exist_ok=True)
    serve_benchmark.build(folder, family, layers, width)
    return folder


def transformers_loop(
    data: Path, warmup: int, family: str, task_name: str, source: str | Path
) -> Callable[[], tuple[float, list[str], dict]]:
    """Transformers' side, loaded and with the first `warmup` questions answered untimed: a function that
    answers and scores every question one at a time with transformers' generate and returns the seconds that
    took, the answers and the scores."""
    from transformers import IdeficsForVisionText2Text, VipLlavaForConditionalGeneration

    classes = {"vipllava": VipLlavaForConditionalGeneration, "idefics": IdeficsForVisionText2Text}
    folder = builtin_model(source) if isinstance(source, str) else source
    # transformers' IDEFICS cannot initialise "normal" alphas (torch.normal with an int size) before it loads
    # the checkpoint's own values over them
    init = {"alpha_initializer": "zeros"} if family == "idefics" else {}
    model = classes[family].from_pretrained(folder, dtype=torch.float32, **init).eval()
    vlm = VLM.load(source)  # its processor only: the same prompts and pixels as vlmkit's side
    eos = stop_token_ids(vlm.tokenizer, family_of(vlm.model))
    task = get_task(task_name)

    def answer(s: object) -> str:
        inputs = vlm.chat_inputs(messages_for(s, PROMPTS[task_name], []))
        out = model.generate(
            **inputs,
            max_new_tokens=task.max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=vlm.tokenizer.pad_token_id,
        )
        new = out[0, inputs["input_ids"].shape[1] :]
        return vlm.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()

    with torch.inference_mode():
        for s in task.samples(data)[:warmup]:
            answer(s)

    def run() -> tuple[float, list[str], dict]:
        with torch.inference_mode():
            start = time.perf_counter()  # the task's files are read on the clock, as `evaluate` reads them
            samples = task.samples(data)
            answers = [answer(s) for s in samples]
            scores, _ = task.score(samples, answers)
        return time.perf_counter() - start, answers, scores

    return run


def runs(side: dict) -> str:
    return " / ".join(f"{x:.1f}" for x in side["runs_samples_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(NAMES), default="vipllava")
    ap.add_argument("--task", choices=sorted(PROMPTS), default="vqav2")
    ap.add_argument(
        "--n", type=int, default=200, help="samples (of the demo's known questions of the task's type)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=16, help="questions each side answers before the clock")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed passes per side, taking turns; the median of each counts",
    )
    ap.add_argument(
        "--per-picture",
        type=int,
        default=1,
        help="VQAv2 questions per picture (the real set averages 5.4; default 1: the demo's known questions, "
        "whose accuracy is known)",
    )
    ap.add_argument(
        "--body",
        default=None,
        help="LAYERSxWIDTH: the demo's processor on a bigger random model (CLIP-B/16 at 224 px, a LLaMA of that "
        "shape) instead of the demo, for prompts of realistic length (answers are noise, the same on both sides)",
    )
    ap.add_argument("--output", type=Path, default=None, help="default: build/bench/eval-FAMILY-TASK.json")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / args.task
        write_task(args.task, data, args.family, args.n, args.per_picture)
        source = (
            NAMES[args.family]
            if args.body is None
            else body_checkpoint(Path(tmp) / "body", args.family, args.body)
        )
        vlm = VLM.load(source)  # as `vlmkit eval` loads it
        if args.warmup:
            evaluate(
                args.task,
                data,
                vlm,
                prompt=PROMPTS[args.task],
                limit=args.warmup,
                batch_size=args.batch_size,
                progress=False,
            )
        transformers_run = transformers_loop(data, args.warmup, args.family, args.task, source)
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeats):  # the sides take turns, so a drift in the machine's speed hits both
            start = time.perf_counter()
            ours = evaluate(
                args.task, data, vlm, prompt=PROMPTS[args.task], batch_size=args.batch_size, progress=False
            )
            ours_runs.append(time.perf_counter() - start)
            theirs_s, theirs, theirs_scores = transformers_run()
            theirs_runs.append(theirs_s)
        ours_s, theirs_s = statistics.median(ours_runs), statistics.median(theirs_runs)
    same = sum(r["output"] == t for r, t in zip(ours.samples, theirs, strict=True))
    metric = "accuracy" if args.task == "vqav2" else "cider"  # the task's headline score
    result = {
        "cpu": cpu_name(),
        "model": NAMES[args.family] if args.body is None else f"random {args.body} body",
        "task": args.task,
        "per_picture": args.per_picture,
        "threads": args.threads,
        "samples": args.n,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "vlmkit": {"batch_size": args.batch_size, "seconds": ours_s, "samples_per_s": args.n / ours_s,
                   "runs_samples_per_s": [args.n / t for t in ours_runs], metric: ours.scores[metric]},
        "transformers": {"batch_size": 1, "seconds": theirs_s, "samples_per_s": args.n / theirs_s,
                         "runs_samples_per_s": [args.n / t for t in theirs_runs], metric: theirs_scores[metric]},
        "speedup": theirs_s / ours_s,
        "same_answers": same,
    }  # fmt: skip
    layout = {"vqav2": "VQAv2-layout questions", "coco": "COCO-layout pictures to caption"}[args.task]
    if args.per_picture > 1:
        layout += f" ({args.per_picture} per picture)"
    print(
        f"{result['cpu']}, {args.threads} threads, {args.n} {layout}, {result['model']}, "
        f"{args.warmup} answered first untimed, median of {args.repeats} timed passes per side\n"
        f"  vlmkit eval, batch {args.batch_size}: {result['vlmkit']['samples_per_s']:.1f} samples/s "
        f"({metric} {ours.scores[metric]:.1f}; passes {runs(result['vlmkit'])})\n"
        f"  transformers, one at a time: {result['transformers']['samples_per_s']:.1f} samples/s "
        f"({metric} {theirs_scores[metric]:.1f}; passes {runs(result['transformers'])})\n"
        f"  speed-up {result['speedup']:.2f}x; identical answers {same}/{args.n}"
    )
    suffix = f"-{args.per_picture}per" if args.per_picture > 1 else ""
    output = args.output or Path(f"build/bench/eval-{args.family}-{args.task}{suffix}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
