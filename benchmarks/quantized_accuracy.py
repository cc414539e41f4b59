"""What quantization costs the built-in demo models: held-out accuracy per question type in full precision,
int8 and int4 (group sizes 32 and 64), on the same questions, in one run.

The questions are the ones `make demo-models` scores the models on (`vlmkit.demo.build.accuracy`: freshly
generated shapes-world scenes from a seed training never used, greedy answers, exact match), `--n` per type.

    .venv/bin/python benchmarks/quantized_accuracy.py [--n 200] [--output build/bench/quantized-accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from vlmkit.demo.build import accuracy

MODELS = {"vipllava": "demo", "idefics": "demo-idefics"}
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {},
    "int8": {"quantize": "int8"},
    "int4 g32": {"quantize": "int4", "group_size": 32},
    "int4 g64": {"quantize": "int4", "group_size": 64},
}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per (family, question type), accuracy in % per setting, the change from full in
    points after each quantized one; a mean row per family."""
    names = list(SETTINGS)
    head = "| model | question type | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for family, by_setting in results.items():
        kinds = list(by_setting["full"])
        rows = [(kind, {n: by_setting[n][kind] for n in names}) for kind in kinds]
        rows.append(("**mean**", {n: sum(by_setting[n].values()) / len(kinds) for n in names}))
        for kind, scores in rows:
            cells = []
            for n in names:
                cell = f"{100 * scores[n]:.1f}"
                if n != "full":
                    cell += f" ({100 * (scores[n] - scores['full']):+.1f})"
                cells.append(cell)
            lines.append(f"| {MODELS[family]} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="questions per type")
    ap.add_argument("--output", type=Path, default=Path("build/bench/quantized-accuracy.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    results: dict[str, dict[str, dict[str, float]]] = {}
    start = time.perf_counter()
    for family, name in MODELS.items():
        results[family] = {}
        for label, load in SETTINGS.items():
            results[family][label] = accuracy(name, family, n=args.n, **load)
            print(
                f"[{time.perf_counter() - start:6.0f} s] {name} {label}: {results[family][label]}", flush=True
            )
    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"n_per_type": args.n, "results": results}, indent=1))


if __name__ == "__main__":
    main()
