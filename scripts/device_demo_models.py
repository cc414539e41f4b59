"""The free-form demo models built on a CUDA machine, both families at once, under a deadline.

Each family runs `python -m vlmkit.demo.build` with the recipe of `make demo-models`: stage 1 on the GPU,
stages 2 and 3 there too (`finetune` trains on CUDA when there is one), pictures drawn by worker processes.
At the deadline whatever is unfinished is stopped and the most advanced weights (polished final, else the newest checkpoint) are kept. The results come back as one
archive of fp16 model folders plus each run's metrics:

    OUT=/tmp/out python scripts/device_demo_models.py --deadline 480 --workers 7
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # vlmkit from this working tree, as the builds' `python -m` finds it
FAMILIES = ("vipllava", "idefics")


def newest(folder: Path) -> Path | None:
    """folder/final when it is there, else its newest checkpoint-N."""
    if (folder / "final" / "model.safetensors").is_file():
        return folder / "final"
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=480, help="seconds for both builds together")
    ap.add_argument("--workers", type=int, default=7, help="picture-drawing processes per family")
    ap.add_argument("--rows", type=int, default=16000)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--polish-steps", type=int, default=3000)
    ap.add_argument("--tower-steps", type=int, default=1500)
    ap.add_argument("--root", type=Path, default=Path("build"), help="where demo-FAMILY/ are built")
    args = ap.parse_args()
    os.chdir(ROOT)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    runs = {}
    for family in FAMILIES:
        command = [
            sys.executable, "-m", "vlmkit.demo.build", str(args.root / f"demo-{family}"), "--family", family,
            "--world", "freeform", "--rows", str(args.rows), "--steps", str(args.steps),
            "--polish-steps", str(args.polish_steps), "--tower-steps", str(args.tower_steps), "--eval-rows", "0",
            "--workers", str(args.workers), "--device", "cuda" if torch.cuda.is_available() else "cpu",
        ]  # fmt: skip
        log = open(out / f"{family}.log", "w")  # noqa: SIM115 (closed with the process)
        runs[family] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    while any(p.poll() is None for p, _ in runs.values()) and time.perf_counter() - started < args.deadline:
        time.sleep(2)
    for family, (process, log) in runs.items():
        if process.poll() is None:
            process.kill()
            print(f"{family}: stopped at the deadline", flush=True)
        process.wait()
        log.close()
        print(f"{family}: exit {process.returncode} after {time.perf_counter() - started:.0f} s", flush=True)
    from vlmkit.models import load_model  # noqa: E402 - after this tree is on the path
    from vlmkit.train.checkpoints import copy_processor_files

    with tarfile.open(out / "models.tar", "w") as tar:
        for family in FAMILIES:
            root = args.root / f"demo-{family}"
            for stage in ("run", "run-polish"):
                if (root / stage / "metrics.jsonl").is_file():
                    tar.add(root / stage / "metrics.jsonl", f"{family}/{stage}-metrics.jsonl")
            best = newest(root / "run-polish") or newest(root / "run")
            if best is None:
                print(f"{family}: no weights", flush=True)
                continue
            print(f"{family}: keeping {best}", flush=True)
            target = args.root / f"pack-{family}"
            load_model(best).save_pretrained(target, storage_dtype=torch.float16)
            copy_processor_files(best, target)
            (target / "from.txt").write_text(str(best.relative_to(root)) + "\n")
            tar.add(target, family)
    print(f"packed in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
