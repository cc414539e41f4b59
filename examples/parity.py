"""Build tiny random ViP-LLaVA, LLaVA-1.5 and IDEFICS checkpoints with transformers, load them with vlmkit
(every key layout), and print the largest logit difference. Runs offline in a few seconds.

    python examples/parity.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from oracle import (  # noqa: E402
    hf_idefics_config,
    hf_idefics_model,
    hf_llava_config,
    hf_llava_model,
    idefics_inputs,
    llava_inputs,
    save_published_layout,
    save_state_dict_layout,
)

import vlmkit  # noqa: E402


def main() -> None:
    cases = {
        "vipllava": hf_llava_config(
            "vipllava", vision_feature_layers=[-2, -3, 0], text=dict(num_key_value_heads=2)
        ),
        "llava-1.5": hf_llava_config("llava", vision_feature_layer=-2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cases.items():
            hf = hf_llava_model(cfg, seed=0)
            root = Path(tmp) / name
            hf.save_pretrained(root / "transformers5")
            layouts = {
                "transformers 5 save_pretrained": root / "transformers5",
                "published hub layout": save_published_layout(root / "transformers5", root / "published"),
                "transformers 5 state_dict names": save_state_dict_layout(
                    hf, root / "sd", root / "transformers5"
                ),
            }
            inputs = llava_inputs(cfg, batch=2, shorter=(0, 3))
            mask = inputs["attention_mask"].bool()
            with torch.no_grad():
                ref = hf(**inputs).logits
                for layout, folder in layouts.items():
                    out = vlmkit.load_model(folder)(**inputs).logits
                    diff = (out - ref)[mask].abs().max().item()
                    print(f"{name:10s} {layout:32s} max |logit diff| vs transformers = {diff:.2e}")

        cfg = hf_idefics_config(use_resampler=True, qk_layer_norms=True)
        hf = hf_idefics_model(cfg, seed=0)  # gates randomised: zero gates would hide the cross-attention
        hf.save_pretrained(Path(tmp) / "idefics")
        # text before the first image, two images in one sample, one in the other, left padding
        inputs = idefics_inputs(cfg, [[3, "img", 4, "img", 2], ["img", 5]])
        mask = inputs["attention_mask"].bool()
        with torch.no_grad():
            ref = hf(**inputs).logits
            out = vlmkit.load_model(Path(tmp) / "idefics")(**inputs).logits
        diff = (out - ref)[mask].abs().max().item()
        print(
            f"{'idefics':10s} {'published = transformers 5 layout':32s} max |logit diff| vs transformers = {diff:.2e}"
        )


if __name__ == "__main__":
    main()
