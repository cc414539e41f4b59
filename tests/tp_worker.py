"""What the tensor-parallel tests run in every process: `python -m torch.distributed.run --nproc_per_node=N
tests/tp_worker.py OUT FOLDER...` loads each checkpoint split over the N processes and, on rank 0, saves
the results of `checks` (the same function the test runs in one process) to OUT."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import vlmkit
from vlmkit.models import family_of
from vlmkit.tensor_parallel import local_bytes


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def batch(vlm: vlmkit.VLM) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, left-padded, each with a picture."""
    a, b = picture(0, (40, 52)), picture(1, (30, 60))
    proc = vlm.processor
    proc.tokenizer.padding_side = "left"
    if family_of(proc).name == "idefics":
        return proc(text=[[a, "Describe the picture."], [b, "What is in it, and what colour is it?"]])
    return proc(
        text=["<image>\nDescribe the picture.", "<image>\nWhat is in it, and what colour is it?"],
        images=[a, b],
        padding=True,
    )


def checks(vlm: vlmkit.VLM) -> dict[str, torch.Tensor]:
    """Forward logits, greedy, beam and seeded-sampling tokens on one left-padded batch, and the bytes of the
    weights this process holds."""
    inputs = batch(vlm)
    model = vlm.model
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["logits"] = model(**inputs).logits
    ids = inputs.pop("input_ids")
    out["greedy"] = model.generate(ids, **inputs, max_new_tokens=6, do_sample=False)
    out["beams"] = model.generate(ids, **inputs, max_new_tokens=5, num_beams=3, do_sample=False)
    out["sampled"] = model.generate(
        ids,
        **inputs,
        max_new_tokens=6,
        do_sample=True,
        top_k=20,
        temperature=1.3,
        generator=torch.Generator().manual_seed(7),
    )
    out["bytes"] = torch.tensor(local_bytes(model))
    return out


def main(out: str, folders: list[str]) -> None:
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for folder in folders:
        vlm = vlmkit.VLM.load(folder, dtype=torch.float32, tp=world)
        results[folder] = checks(vlm)
        sizes = [None] * world
        dist.all_gather_object(sizes, int(results[folder]["bytes"]))
        results[folder]["rank_bytes"] = torch.tensor(sizes)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()  # leave together: a process tearing gloo down while its peer still talks may abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
