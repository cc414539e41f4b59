"""Training throughput: tokens/s of a full fine-tuning step and of a LoRA step on a small LLaVA-shaped model
(~60M parameters: CLIP 384-wide x 6 layers at 224 px, LLaMA 512-wide x 8 layers), batch 4, fp32, this machine.

    .venv/bin/python benchmarks/finetune.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from checkpoints import build_llava_checkpoint  # noqa: E402

from vlmkit.train.finetune import FinetuneConfig, finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, _, _ = build_llava_checkpoint(
            tmp / "model",
            image_size=224,
            patch_size=16,
            text=dict(
                hidden_size=512,
                intermediate_size=1408,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=8,
            ),
            vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6),
        )
        rng = np.random.default_rng(0)
        rows = []
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
            rows.append(
                {
                    "image": f"{i}.png",
                    "conversations": [
                        {
                            "from": "human",
                            "value": "<image>\nDescribe the shapes in the picture in a few words.",
                        },
                        {
                            "from": "gpt",
                            "value": "A red circle left of a blue square, above a small green star.",
                        },
                    ],
                }
            )
        (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        for mode in ("full", "lora"):
            out = tmp / mode
            finetune(
                FinetuneConfig(
                    data=str(tmp / "train.jsonl"),
                    output_dir=str(out),
                    model=str(folder),
                    train=mode,
                    max_steps=args.steps,
                    batch_size=4,
                    lr=1e-4,
                    progress=False,
                )
            )
            records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            rate = np.median([r["tokens_per_s"] for r in records[1:]])
            print(
                f"{mode:5s}: {rate:8.0f} tokens/s (median of steps 2..{args.steps}), "
                f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
