"""Tensor parallelism on the CPU: one mid-size model split over 2 processes against the same model in one,
in one run, for what it costs in memory and communication (2 cores cannot make 2 processes faster).

    .venv/bin/python benchmarks/distributed.py [--workdir build/bench/tp] [--layers 16] [--hidden 2048]
        [--new-tokens 16] [--batches 1 4] [--output build/bench/distributed.json] [--keep]

The checkpoint: a ViP-LLaVA with a LLaMA of `--layers` x `--hidden` (intermediate 2.75x, 16 heads, vocab
32064; about 1.1 B parameters by default) and a small CLIP tower, random bf16 weights, written once with
vlmkit's own `save_pretrained`. Three runs, each in its own processes so peak RSS is their own:
- one process with 2 threads; one process with 1 thread (`load_model(folder, dtype=bfloat16)`);
- two processes with 1 thread each under torchrun (`load_model(..., tp=2)`, gloo).
Each: load time, peak RSS and the bytes of the weights it holds; time to first token and decode tokens/s
(rows * (N - 1) / (time of token N - time of token 1), N forced with min_new_tokens, greedy,
`stream_tokens`) after a 128-token text prompt, per batch size. The split run also times its collectives
alone: an all-reduce of one step's hidden states (batch x 1 x hidden, bf16), done twice per layer, and the
LM head's all-gather of the logits, so the note can say what share of a step is communication, and what the
same count of collectives costs over NVLink.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_checkpoint(folder: Path, layers: int, hidden: int) -> None:
    from vlmkit.models import init_model

    demo = json.loads((ROOT / "vlmkit/demo/models/vipllava/config.json").read_text())
    demo["text_config"].update(
        vocab_size=32064,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=hidden // 16,
        max_position_embeddings=2048,
    )
    demo["image_token_index"] = 32000
    demo["dtype"] = "bfloat16"
    torch.manual_seed(0)
    model = init_model(demo).to(torch.bfloat16)
    model.save_pretrained(folder)


def timed_decode(model: Any, batch: int, prompt: int, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of greedy `stream_tokens` on random text."""
    ids = torch.randint(10, 30000, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    stamps = []
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in model.stream_tokens(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        ):
            stamps.append(time.perf_counter())
    return stamps[0] - start, batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def time_collectives(model: Any, batches: list[int], repeats: int = 200) -> dict[str, float]:
    """Microseconds per all-reduce of one decode step's hidden states and per all-gather of its logits."""
    import torch.distributed as dist

    config = model.config.text_config
    out = {}
    for b in batches:
        hidden = torch.randn(b, 1, config.hidden_size, dtype=torch.bfloat16)
        local = torch.randn(b, config.vocab_size // dist.get_world_size(), dtype=torch.bfloat16)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        for name, op in (
            ("all_reduce", lambda h=hidden: dist.all_reduce(h)),
            ("all_gather", lambda g=gathered, x=local: dist.all_gather(g, x)),
        ):
            for _ in range(20):
                op()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                op()
            out[f"{name}_us_b{b}"] = (time.perf_counter() - start) / repeats * 1e6
    return out


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: a child forked from a big parent
    (the one that built the checkpoint) inherits the parent's high-water mark there."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def worker(folder: str, threads: int, batches: list[int], new_tokens: int) -> None:
    torch.set_num_threads(threads)
    import vlmkit
    from vlmkit.tensor_parallel import is_main_process, local_bytes

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    started = time.perf_counter()
    model = vlmkit.load_model(folder, dtype=torch.bfloat16, tp=tp)
    result: dict[str, Any] = {"processes": tp, "threads": threads, "load_s": time.perf_counter() - started}
    result["weight_gb"] = local_bytes(model) / 1e9
    timed_decode(model, 1, 16, 3)  # warm-up
    for b in batches:
        ttft, tok_s = timed_decode(model, b, 128, new_tokens)
        result[f"ttft_s_b{b}"], result[f"decode_tok_s_b{b}"] = ttft, tok_s
    if tp > 1:
        result |= time_collectives(model, batches)
        result["collectives_per_step"] = 2 * model.config.text_config.num_hidden_layers + 1  # + 1 gather
    result["peak_rss_gb"] = peak_rss_gb()
    import torch.distributed as dist

    if tp > 1:
        peaks = [None] * tp
        dist.all_gather_object(peaks, result["peak_rss_gb"])
        result["peak_rss_gb_per_rank"] = peaks
        weights = [None] * tp
        dist.all_gather_object(weights, result["weight_gb"])
        result["weight_gb_per_rank"] = weights
    if is_main_process():
        print("RESULT " + json.dumps(result), flush=True)


def run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "build/bench/tp"))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--output", default=str(ROOT / "build/bench/distributed.json"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("FOLDER", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.batches, args.new_tokens)
        return
    folder = Path(args.workdir) / f"vipllava-{args.layers}x{args.hidden}"
    if not (folder / "config.json").is_file():
        build_checkpoint(folder, args.layers, args.hidden)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    me = [__file__, "--batches", *map(str, args.batches), "--new-tokens", str(args.new_tokens)]
    runs = {
        "one process, 2 threads": run([sys.executable, *me, "--worker", str(folder), "2"], env),
        "one process, 1 thread": run([sys.executable, *me, "--worker", str(folder), "1"], env),
        "tp=2, 1 thread each": run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *me]
            + ["--worker", str(folder), "1"],
            env,
        ),
    }
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in x
        ),
        "unknown CPU",
    )
    report = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
        "model": folder.name,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    one, split = runs["one process, 1 thread"], runs["tp=2, 1 thread each"]
    print(f"{cpu}, {os.cpu_count()} cores; {folder.name}")
    for name, r in runs.items():
        figures = "  ".join(
            f"b{b}: ttft {r[f'ttft_s_b{b}']:.2f} s, {r[f'decode_tok_s_b{b}']:.2f} tok/s" for b in args.batches
        )
        print(
            f"  {name:24s} load {r['load_s']:.1f} s  weights {r['weight_gb']:.2f} GB  peak RSS {r['peak_rss_gb']:.2f} GB  {figures}"
        )
    print(
        f"  per-rank peak RSS {split['peak_rss_gb_per_rank']} GB vs {one['peak_rss_gb']:.2f} GB in one process"
    )
    for b in args.batches:
        step_ms = 1e3 * b / split[f"decode_tok_s_b{b}"]
        comm_ms = (
            split["collectives_per_step"] * split[f"all_reduce_us_b{b}"] + split[f"all_gather_us_b{b}"]
        ) / 1e3
        print(
            f"  b{b}: a split step {step_ms:.1f} ms, of which collectives {comm_ms:.2f} ms "
            f"({100 * comm_ms / step_ms:.1f}%): {split['collectives_per_step']} all-reduces of "
            f"{split[f'all_reduce_us_b{b}']:.0f} us + 1 all-gather of {split[f'all_gather_us_b{b}']:.0f} us"
        )
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
