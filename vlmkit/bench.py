"""`vlmkit bench`: load time, time to first token, decode speed and peak memory of greedy generation.

from vlmkit.bench import bench_command
bench_command("demo", batch_size=8, new_tokens=32)["decode_tok_s"]
"""

from __future__ import annotations

from typing import Any

from vlmkit.models import DEFAULT_MODEL


def bench_command(
    model: str = DEFAULT_MODEL,
    *,
    batch_size: int = 1,
    new_tokens: int = 32,
    prompt: str = "Describe the image.",
    image: str | None = None,
    repeats: int = 3,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_parts: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load time, time to first token, decode speed and peak memory of greedy generation: `batch_size`
    copies of one prompt and image, exactly `new_tokens` new tokens each, the median of `repeats` runs."""
    import resource
    import time

    import torch

    from vlmkit.vlm import VLM

    if batch_size < 1 or new_tokens < 2 or repeats < 1:
        raise ValueError(
            f"need batch_size >= 1, new_tokens >= 2 and repeats >= 1, got {batch_size}, {new_tokens}, {repeats}"
        )
    start = time.perf_counter()
    vlm = VLM.load(
        model,
        dtype=dtype,
        device=device,
        progress=True,
        quantize=quantize,
        group_size=group_size,
        quantize_parts=quantize_parts,
    )
    load_s = time.perf_counter() - start
    one = vlm.inputs(prompt, [picture(image)])
    inputs = {k: v.repeat(batch_size, *([1] * (v.dim() - 1))) for k, v in one.items()}
    ttft_s, decode_tok_s = time_generation(vlm, inputs, new_tokens, repeats)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "model": model,
        "model_type": vlm.model.config.to_hf()["model_type"],
        "parameters": sum(p.numel() for p in vlm.model.parameters()),
        "dtype": str(next(vlm.model.parameters()).dtype).removeprefix("torch."),
        "quantization": vlm.model.quantization.describe() if vlm.model.quantization else None,
        "device": str(vlm.device),
        "batch_size": batch_size,
        "prompt_tokens": int(one["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "load_s": load_s,
        "ttft_s": ttft_s,
        "decode_tok_s": decode_tok_s,
        "peak_rss_gb": rss / 1e9,
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / 1e9 if vlm.device.type == "cuda" else None,
    }


def picture(path: str | None) -> Any:
    """The image at `path`, or a shapes-world scene (any picture costs the same)."""
    import random

    from vlmkit.demo.shapes import random_scene, render
    from vlmkit.images import load_image

    return load_image(path) if path is not None else render(random_scene(random.Random(0), 336, 3), 336)


def time_generation(vlm: Any, inputs: dict, new_tokens: int, repeats: int) -> tuple[float, float]:
    """The medians over `repeats` runs of the first token's time (s) and decode speed (tokens/s, all rows)."""
    import statistics
    import time

    import torch

    settings = vlm._settings({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    rows = int(inputs["input_ids"].shape[0])
    cuda = vlm.device.type == "cuda"
    ttft, decode = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        times = []
        for _tokens in vlm.model.stream_tokens(**inputs, **settings):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
        ttft.append(times[0] - t0)
        decode.append(rows * (len(times) - 1) / (times[-1] - times[0]))
    return statistics.median(ttft), statistics.median(decode)
