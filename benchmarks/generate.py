"""Generation speed and memory: vlmkit vs transformers on the same random-weight checkpoint, in one run.

For a ViP-LLaVA-shaped model (311M: CLIP-B/14 at 336 px, 12-layer 1024-wide LLaMA, vocab 32064; one image +
40 text tokens = 617-token prompt) and an IDEFICS-shaped one of the same scale, each implementation runs in
its own process (so peak RSS is its own), alternating, greedy, fp32:
- time to first token: from the call to the first new token (transformers: its streamer's first `put` of new
  tokens; vlmkit: the first step of `stream_tokens`)
- decode tokens/s over all rows: batch * (N - 1) / (time of token N - time of token 1), N forced with
  min_new_tokens
- peak RSS of the process

    .venv/bin/python benchmarks/generate.py [--family vipllava idefics] [--batches 1 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import build_checkpoint, make_inputs, run_worker  # noqa: E402


class Clock:
    """A transformers streamer that only notes when each put (the prompt, then every step) happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def worker(impl: str, folder: str, family: str, batch: int, new_tokens: int) -> None:
    torch.set_num_threads(2)
    if impl == "vlmkit":
        import vlmkit

        model = vlmkit.load_model(folder)
    else:
        from transformers import AutoModelForImageTextToText, IdeficsForVisionText2Text

        cls = IdeficsForVisionText2Text if family == "idefics" else AutoModelForImageTextToText
        model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = make_inputs(family, batch)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run() -> tuple[list[float], list[list[int]]]:
        """Token times (first new token .. last) and the new tokens."""
        start = time.perf_counter()
        if impl == "vlmkit":
            steps, times = [], []
            for tokens in model.stream_tokens(**inputs, **settings):
                times.append(time.perf_counter())
                steps.append(tokens)
            new = torch.stack(steps, dim=1)
        else:
            clock = Clock()
            with torch.inference_mode():
                out = model.generate(**inputs, streamer=clock, **settings)
            times = clock.times[1:-1]  # drop the prompt's put and the end
            new = out[:, -new_tokens:]
        return [start, *times], new.tolist()

    run()  # warm-up
    times, tokens = run()
    print(
        json.dumps(
            {
                "ttft_s": times[1] - times[0],
                "decode_tok_s": batch * (new_tokens - 1) / (times[-1] - times[1]),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "tokens": tokens,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", nargs="+", default=["vipllava", "idefics"], choices=["vipllava", "idefics"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--worker", choices=["vlmkit", "transformers"])
    ap.add_argument("--folder")
    ap.add_argument("--batch", type=int)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args.family[0], args.batch, args.new_tokens)
        return
    rows = []
    for family in args.family:
        with tempfile.TemporaryDirectory() as tmp:
            build_checkpoint(Path(tmp), family)
            for batch in args.batches:
                res = {}
                for impl in ("transformers", "vlmkit"):
                    res[impl] = run_worker(
                        __file__, impl, folder=tmp, family=family, batch=batch, new_tokens=args.new_tokens
                    )
                same = res["transformers"]["tokens"] == res["vlmkit"]["tokens"]
                rows.append((family, batch, res["transformers"], res["vlmkit"], same))
                print_row(*rows[-1])
    print(
        "\n| model | batch | TTFT transformers | TTFT vlmkit | decode tok/s transformers | decode tok/s vlmkit "
        "| decode ratio | peak RSS transformers | peak RSS vlmkit | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family, batch, ref, ours, same in rows:
        print(
            f"| {family} | {batch} | {ref['ttft_s']:.2f} s | {ours['ttft_s']:.2f} s | {ref['decode_tok_s']:.1f} | "
            f"{ours['decode_tok_s']:.1f} | {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x | "
            f"{ref['peak_rss_gb']:.2f} GB | {ours['peak_rss_gb']:.2f} GB | {'yes' if same else 'NO'} |"
        )


def print_row(family: str, batch: int, ref: dict, ours: dict, same: bool) -> None:
    print(
        f"{family} batch {batch}: TTFT {ref['ttft_s']:.2f} s -> {ours['ttft_s']:.2f} s "
        f"({ref['ttft_s'] / ours['ttft_s']:.2f}x), decode {ref['decode_tok_s']:.1f} -> {ours['decode_tok_s']:.1f} "
        f"tok/s ({ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x), peak RSS {ref['peak_rss_gb']:.2f} -> "
        f"{ours['peak_rss_gb']:.2f} GB, same tokens: {same}",
        flush=True,
    )


if __name__ == "__main__":
    main()
