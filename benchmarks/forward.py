"""Load time, peak memory and prefill (forward) latency: vlmkit vs transformers on the same weights.

The mid-size ViP-LLaVA shape of ../shared/notes/reference-performance.md (311M parameters: CLIP-B/14 at
336 px, 12 layers; LLaMA 12 x 1024, vocab 32064), one image + 40 text tokens = 617-token prompt, fp32.
Each implementation runs in its own process so that peak RSS is its own.

    .venv/bin/python benchmarks/forward.py [--batch 1] [--repeats 3] [--family vipllava|idefics]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_checkpoint(folder: Path, family: str) -> None:
    from oracle import randomize_

    if family == "vipllava":
        from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

        cfg = VipLlavaConfig(
            text_config=dict(
                model_type="llama",
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=12,
                num_attention_heads=16,
                vocab_size=32064,
            ),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                image_size=336,
                patch_size=14,
            ),
            vision_feature_layers=[-2, -5, -8, -11, 6],
            image_token_index=32000,
        )
        model = VipLlavaForConditionalGeneration(cfg)
    else:
        from transformers import IdeficsConfig, IdeficsForVisionText2Text

        cfg = IdeficsConfig(
            vocab_size=32000,
            additional_vocab_size=2,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            cross_layer_interval=4,
            use_resampler=True,
            vision_config=dict(
                embed_dim=768,
                image_size=224,
                patch_size=14,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
            ),
            perceiver_config=dict(
                resampler_n_latents=64, resampler_depth=2, resampler_n_heads=12, resampler_head_dim=64
            ),
        )
        model = IdeficsForVisionText2Text(cfg)
    randomize_(model, seed=0, std=0.02)
    model.save_pretrained(folder)


def make_inputs(family: str, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if family == "vipllava":
        ids = torch.cat(
            [
                torch.randint(3, 31000, (batch, 20), generator=g),
                torch.full((batch, 576), 32000),
                torch.randint(3, 31000, (batch, 21), generator=g),
            ],
            dim=1,
        )
        return {
            "input_ids": ids,
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=g),
            "attention_mask": torch.ones_like(ids),
        }
    ids = torch.cat(
        [
            torch.randint(3, 31000, (batch, 20), generator=g),
            torch.tensor([[32000, 32001, 32000]] * batch),
            torch.randint(3, 31000, (batch, 577), generator=g),
        ],
        dim=1,
    )
    iam = torch.zeros(batch, ids.shape[1], 1, dtype=torch.long)
    iam[:, 20:] = 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "image_attention_mask": iam,
        "pixel_values": torch.randn(batch, 1, 3, 224, 224, generator=g),
    }


def worker(impl: str, folder: str, family: str, batch: int, repeats: int) -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if impl == "vlmkit":
        import vlmkit

        model = vlmkit.load_model(folder)
    else:
        from transformers import AutoModelForImageTextToText, IdeficsForVisionText2Text

        cls = IdeficsForVisionText2Text if family == "idefics" else AutoModelForImageTextToText
        model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    inputs = make_inputs(family, batch)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            logits = model(**inputs).logits
            times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "forward_s": min(times[1:]),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "checksum": float(logits[:, -1].float().sum()),
            }
        )
    )


def run_worker(script: str, impl: str, **flags: object) -> dict:
    """Run `script --worker impl --flag value ...` in a fresh process; return the JSON it prints last."""
    command = [sys.executable, script, "--worker", impl]
    for name, value in flags.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="vipllava", choices=["vipllava", "idefics"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["vlmkit", "transformers"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args.family, args.batch, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), args.family)
        results = {}
        for impl in ("transformers", "vlmkit"):
            results[impl] = run_worker(
                __file__, impl, folder=tmp, family=args.family, batch=args.batch, repeats=args.repeats
            )
    ref, ours = results["transformers"], results["vlmkit"]
    print(f"{args.family}, batch {args.batch}, fp32, 2 threads")
    print(f"{'':14s}{'transformers':>14s}{'vlmkit':>10s}{'ratio':>8s}")
    for key, label in (
        ("load_s", "load (s)"),
        ("forward_s", "prefill (s)"),
        ("peak_rss_gb", "peak RSS (GB)"),
    ):
        print(f"{label:14s}{ref[key]:14.2f}{ours[key]:10.2f}{ref[key] / ours[key]:7.2f}x")
    print(f"last-token logit checksum: transformers {ref['checksum']:.4f}, vlmkit {ours['checksum']:.4f}")


if __name__ == "__main__":
    main()
