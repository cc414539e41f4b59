"""Weight-only quantization at real 7B scale: vlmkit bf16 / int8 / int4 against llama.cpp F16 / Q8_0 / Q4_0 and
transformers bf16, on one random-weight LLaVA-1.5-7B-shaped checkpoint, in one run on the CPU.

    .venv/bin/python benchmarks/quantized.py [--workdir build/bench/q7b] [--tiny] [--new-tokens 16]
        [--schemes bf16 int8 int4] [--batches 1 4] [--group-size 64] [--skip-transformers] [--skip-llamacpp]
        [--output build/bench/quantized.json] [--keep]

The checkpoint: CLIP ViT-L/14 at 336 px (24 x 1024), the 2-layer GELU projector, LLaMA 32 x 4096 (11008,
32 heads, vocab 32064), image token 32000, in the published llava-hf key layout. Its tensors are drawn with
torch (bf16; normal(0, 0.02) matrices and embeddings, unit norms, zero biases) and written shard by shard
(~2 GB each), so the whole model is never in memory; --tiny (LLaMA 2 x 256, CLIP 2 x 64) takes the same code
path in seconds. Before anything else a tiny checkpoint of several shards is loaded with transformers'
LlavaForConditionalGeneration, which must report no missing, unexpected or mismatched keys.

The prompt: BOS, 576 image tokens (one 336-px picture, random pixels), 40 random text tokens = 617 tokens.
Measured, each implementation in its own process (so peak RSS is its own), 2 threads:
- vlmkit, per scheme (`load_model(folder, dtype=torch.bfloat16, quantize=...)`): load time; the prompt's
  logits at every position (one forward; also the warm-up); time to first token and decode tokens/s for
  each batch (rows * (N - 1) / (time of token N - time of token 1), N forced with min_new_tokens, greedy,
  `stream_tokens`); peak RSS; the bytes of its parameters and buffers. Against bf16, each scheme's mean
  KL(bf16 || scheme) over the 617 positions and the fraction of positions whose argmax agrees.
- transformers bf16: the same at batch 1 (its generate streamer times the tokens); its logits against
  vlmkit bf16 (a parity check: KL near 0).
- llama.cpp (the version vendored in llama-cpp-python 0.3.36, built here once with GGML_NATIVE): the LLaMA
  half of the same tensors as an F16 GGUF, llama-quantize'd to Q8_0 and Q4_0; `llama-bench -t 2 -p 617
  -n 32 -r 2`: prompt (pp) and generation (tg) tokens/s, file size, peak RSS. See benchmarks/llamacpp.py.

Read the ratios with care: llama.cpp runs the text model only (no vision tower, no image features) and its
tg is at an empty context, while vlmkit decodes after the 617-token prompt; random weights make the KL
figures a check of the arithmetic, not of the quality a trained model keeps. On 2 cores any background job
halves every figure; the load average is recorded.

Disk for the 7B run: checkpoint 14.1 GB + GGUF F16 13.5 + Q8_0 7.2 + Q4_0 3.8 = about 39 GB, deleted at the
end unless --keep (a kept checkpoint and its GGUFs are reused by the next run). Benchmark-only dependency:
the `gguf` package (`.venv/bin/pip install gguf`).
"""

from __future__ import annotations

import argparse
import inspect
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

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import llamacpp  # noqa: E402
from forward import run_worker  # noqa: E402
from generate import Clock  # noqa: E402

SHAPES = {
    "7b": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    ),
    "tiny": dict(
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    ),
}
VOCAB = 32064
IMAGE_TOKEN = 32000
BOS = 1
IMAGE_SIZE, PATCH = 336, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 576; the class token is dropped ("default" strategy)
TEXT_TOKENS = 40
PROMPT_TOKENS = 1 + IMAGE_TOKENS + TEXT_TOKENS
SHARD_BYTES = 2 * 10**9
THREADS = 2
LLAMACPP_FORMATS = ("F16", "Q8_0", "Q4_0")
MATCHING = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # vlmkit scheme -> llama.cpp format
MARKER = "bench-complete.json"
STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the seconds since the start (a 7B run takes the better part of an hour)."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------


def llava_config(shape: str) -> dict[str, Any]:
    """config.json of a LLaVA-1.5 checkpoint of the given shape, in the published form."""
    text, vision = SHAPES[shape]["text"], SHAPES[shape]["vision"]
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": IMAGE_TOKEN,
        "image_seq_length": IMAGE_TOKENS,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "pad_token_id": 32001,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama",
            **text,
            "num_key_value_heads": text["num_attention_heads"],
            "vocab_size": VOCAB,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "bos_token_id": BOS,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **vision,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    }


def tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, init) of every tensor, init being "normal", "ones" or "zeros", in checkpoint order."""
    specs: list[tuple[str, tuple[int, ...], str]] = []

    def linear(name: str, inp: int, out: int, bias: bool = True) -> None:
        specs.append((f"{name}.weight", (out, inp), "normal"))
        if bias:
            specs.append((f"{name}.bias", (out,), "zeros"))

    def layer_norm(name: str, dim: int) -> None:
        specs.extend([(f"{name}.weight", (dim,), "ones"), (f"{name}.bias", (dim,), "zeros")])

    v, t = config["vision_config"], config["text_config"]
    C, inner = v["hidden_size"], v["intermediate_size"]
    tower = "vision_tower.vision_model"
    specs.append((f"{tower}.embeddings.class_embedding", (C,), "normal"))
    specs.append((f"{tower}.embeddings.patch_embedding.weight", (C, 3, PATCH, PATCH), "normal"))
    specs.append((f"{tower}.embeddings.position_embedding.weight", (IMAGE_TOKENS + 1, C), "normal"))
    layer_norm(f"{tower}.pre_layrnorm", C)  # sic: the reference's spelling
    for i in range(v["num_hidden_layers"]):
        layer = f"{tower}.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(f"{layer}.self_attn.{proj}", C, C)
        layer_norm(f"{layer}.layer_norm1", C)
        linear(f"{layer}.mlp.fc1", C, inner)
        linear(f"{layer}.mlp.fc2", inner, C)
        layer_norm(f"{layer}.layer_norm2", C)
    layer_norm(f"{tower}.post_layernorm", C)

    H, inner, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = H // t["num_attention_heads"] * t["num_key_value_heads"]
    linear("multi_modal_projector.linear_1", C, H)
    linear("multi_modal_projector.linear_2", H, H)
    specs.append(("language_model.model.embed_tokens.weight", (V, H), "normal"))
    for i in range(t["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}"
        for proj, out in (("q_proj", H), ("k_proj", kv), ("v_proj", kv), ("o_proj", H)):
            linear(f"{layer}.self_attn.{proj}", H, out, bias=False)
        for proj, inp, out in (("gate_proj", H, inner), ("up_proj", H, inner), ("down_proj", inner, H)):
            linear(f"{layer}.mlp.{proj}", inp, out, bias=False)
        specs.append((f"{layer}.input_layernorm.weight", (H,), "ones"))
        specs.append((f"{layer}.post_attention_layernorm.weight", (H,), "ones"))
    specs.append(("language_model.model.norm.weight", (H,), "ones"))
    specs.append(("language_model.lm_head.weight", (V, H), "normal"))
    return specs


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(
    folder: Path, config: dict[str, Any], *, seed: int = 0, shard_bytes: int = SHARD_BYTES
) -> int:
    """Write config.json, the bf16 shards and their index into `folder`, one shard in memory at a time;
    the bytes of weights written. A folder already holding this config (marker file) is kept as it is."""
    marker = folder / MARKER
    specs = tensor_specs(config)
    total = sum(2 * numel(shape) for _, shape, _ in specs)
    if marker.is_file() and json.loads(marker.read_text()) == config:
        return total
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, _) in enumerate(specs):
        nbytes = 2 * numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes

    from safetensors.torch import save_file

    weight_map = {}
    for s, members in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in members:
            key, shape, init = specs[i]
            if init == "normal":
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                tensors[key] = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            else:
                tensors[key] = (torch.ones if init == "ones" else torch.zeros)(shape, dtype=torch.bfloat16)
            weight_map[key] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(config))
    return total


def verify_layout(folder: Path) -> None:
    """Write a tiny checkpoint of several shards with `write_checkpoint` and load it with transformers:
    every key and shape must be what LlavaForConditionalGeneration expects."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config("tiny")
    write_checkpoint(folder, config, shard_bytes=8 * 10**6)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"the benchmark's checkpoint layout does not match transformers': {problems}")
    expected = sum(numel(shape) for _, shape, _ in tensor_specs(config))
    if sum(p.numel() for p in model.parameters()) != expected:
        raise RuntimeError("transformers' model has parameters the benchmark's checkpoint does not write")
    shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ---------------------------------------------------------------------------------------------


def make_inputs(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """BOS, 576 image tokens, 40 random text tokens; random pixels for one 336-px picture per row."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 31000, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([torch.tensor([BOS]), torch.full((IMAGE_TOKENS,), IMAGE_TOKEN), text])[None]  # (1, T)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(torch.bfloat16)
    ids, pixels = ids.repeat(rows, 1), pixels.repeat(rows, 1, 1, 1)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


def memory_gb(model: torch.nn.Module) -> float:
    """Bytes held by the model's parameters and buffers (shared storages once), in GB."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def vlmkit_worker(
    folder: str, scheme: str, new_tokens: int, rows: str, logits: str, group_size: int | None
) -> dict:
    import vlmkit

    torch.set_num_threads(THREADS)
    options: dict[str, Any] = {}
    if scheme != "bf16":
        if "quantize" not in inspect.signature(vlmkit.load_model).parameters:
            raise SystemExit(f"this vlmkit's load_model has no quantize= argument; cannot run {scheme}")
        options = {
            "quantize": scheme,
            **({"group_size": group_size} if group_size and scheme == "int4" else {}),
        }
    start = time.perf_counter()
    model = vlmkit.load_model(folder, dtype=torch.bfloat16, **options)
    result: dict[str, Any] = {
        "load_s": time.perf_counter() - start,
        "weights_gb": memory_gb(model),
        **options,
    }
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(**make_inputs(1)).logits[0].float()  # (T, V)
        result["prompt_forward_s"] = time.perf_counter() - start
    torch.save(out, logits)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for batch in (int(r) for r in rows.split(",")):
        start = time.perf_counter()
        times, steps = [], []
        for tokens in model.stream_tokens(**make_inputs(batch), **settings):
            times.append(time.perf_counter())
            steps.append(tokens)
        result[f"ttft_s_b{batch}"] = times[0] - start
        result[f"decode_tok_s_b{batch}"] = batch * (len(times) - 1) / (times[-1] - times[0])
        if batch == 1:
            result["tokens"] = torch.stack(steps, dim=1)[0].tolist()
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def transformers_worker(folder: str, new_tokens: int, logits: str) -> dict:
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "weights_gb": memory_gb(model)}
    inputs = make_inputs(1)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(**inputs).logits[0].float()  # (T, V)
        result["prompt_forward_s"] = time.perf_counter() - start
        torch.save(out, logits)
        clock = Clock()
        start = time.perf_counter()
        generated = model.generate(
            **inputs, streamer=clock, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    times = clock.times[1:-1]  # drop the prompt's put and the end
    result["ttft_s_b1"] = times[0] - start
    result["decode_tok_s_b1"] = (len(times) - 1) / (times[-1] - times[0])
    result["tokens"] = generated[0, -new_tokens:].tolist()
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def run_isolated(impl: str, **flags: object) -> dict:
    """A worker's results, or {"error": ...} when it fails (the run goes on without it)."""
    try:
        return run_worker(__file__, impl, **flags)
    except subprocess.CalledProcessError as e:
        return {"error": (e.stderr or "").strip()[-3000:] or f"exit code {e.returncode}"}


def agreement(reference: Path, other: Path) -> dict[str, float]:
    """Mean KL(reference || other) over the prompt's positions and the fraction with the same argmax."""
    ref, out = torch.load(reference), torch.load(other)
    log_p, log_q = ref.log_softmax(-1), out.log_softmax(-1)  # (T, V)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"kl": float(kl.mean()), "top1": float((ref.argmax(-1) == out.argmax(-1)).float().mean())}


# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------


def run_llamacpp(root: Path, checkpoint: Path, gguf_dir: Path, text: dict[str, Any]) -> dict[str, Any]:
    say("llama.cpp: build (skipped when built)")
    bin_dir, build_s = llamacpp.ensure_built(root)
    result: dict[str, Any] = {"build_s": build_s, "version": f"llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON}"}
    gguf_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: gguf_dir / f"llama-{kind}.gguf" for kind in LLAMACPP_FORMATS}
    if not files["F16"].is_file():
        say("llama.cpp: writing the F16 GGUF")
        start = time.perf_counter()
        llamacpp.write_gguf(checkpoint, files["F16"], text)
        result["gguf_write_s"] = time.perf_counter() - start
    result["quantize_s"] = {}
    for kind in LLAMACPP_FORMATS[1:]:
        if not files[kind].is_file():
            say(f"llama.cpp: quantizing to {kind}")
            result["quantize_s"][kind] = llamacpp.quantize(bin_dir, files["F16"], files[kind], kind, THREADS)
    result["formats"] = {}
    for kind, path in files.items():
        say(f"llama.cpp: llama-bench {kind}")
        try:
            result["formats"][kind] = llamacpp.bench(bin_dir, path, threads=THREADS, prompt=PROMPT_TOKENS)
        except RuntimeError as e:
            result["formats"][kind] = {"error": str(e)}
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }


def fmt(value: Any, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\nCPU: {m['cpu']}, {m['cores']} cores, flags: {' '.join(m['flags'])}, load {m['load_average'][0]:.2f}"
    )
    print(
        f"shape {results['shape']}, prompt {PROMPT_TOKENS} tokens, {results['new_tokens']} new tokens, {THREADS} threads\n"
    )
    b4 = max(results["batches"])
    print(
        f"| implementation | format | weights GB | load s | peak RSS GB | TTFT s | decode tok/s b1 | decode tok/s b{b4} "
        "| llama.cpp pp tok/s | llama.cpp tg tok/s | KL vs bf16 | top-1 vs bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("vlmkit", s, r) for s, r in results["vlmkit"].items()]
    if results.get("transformers"):
        rows.append(("transformers", "bf16", results["transformers"]))
    for impl, fmt_name, r in rows:
        if "error" in r:
            print(f"| {impl} | {fmt_name} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        print(
            f"| {impl} | {fmt_name} | {fmt(r['weights_gb'])} | {fmt(r['load_s'], '.1f')} | {fmt(r['peak_rss_gb'])} "
            f"| {fmt(r.get('ttft_s_b1'))} | {fmt(r.get('decode_tok_s_b1'))} | {fmt(r.get(f'decode_tok_s_b{b4}'))} "
            f"| — | — | {fmt(r.get('kl'), '.2e')} | {fmt(r.get('top1'), '.3f')} |"
        )
    for kind, r in (results.get("llamacpp") or {}).get("formats", {}).items():
        if "error" in r:
            print(f"| llama.cpp | {kind} | failed: {r['error'].splitlines()[0][:80]} |")
            continue
        print(
            f"| llama.cpp | {kind} | {fmt(r['file_gb'])} (file) | — | {fmt(r['peak_rss_gb'])} | — | — | — "
            f"| {fmt(r.get('pp_tok_s'), '.1f')} | {fmt(r.get('tg_tok_s'))} | — | — |"
        )
    print("\nRatios (vlmkit / llama.cpp; llama.cpp is text-only, tg at an empty context):")
    for name, value in results["ratios"].items():
        print(f"  {name}: {fmt(value)}x")


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    formats = (results.get("llamacpp") or {}).get("formats", {})
    out: dict[str, float | None] = {}
    for scheme, kind in MATCHING.items():
        ours, theirs = results["vlmkit"].get(scheme, {}), formats.get(kind, {})
        if "decode_tok_s_b1" in ours and "tg_tok_s" in theirs:
            out[f"decode b1: vlmkit {scheme} / {kind} tg"] = ours["decode_tok_s_b1"] / theirs["tg_tok_s"]
        if "ttft_s_b1" in ours and "pp_tok_s" in theirs:
            # llama.cpp's time for the same number of prompt tokens over vlmkit's TTFT (which adds the tower)
            out[f"prefill: {kind} prompt time / vlmkit {scheme} TTFT"] = (
                PROMPT_TOKENS / theirs["pp_tok_s"] / ours["ttft_s_b1"]
            )
    ref = results.get("transformers") or {}
    ours = results["vlmkit"].get("bf16", {})
    if "decode_tok_s_b1" in ref and "decode_tok_s_b1" in ours:
        out["decode b1: vlmkit bf16 / transformers bf16"] = ours["decode_tok_s_b1"] / ref["decode_tok_s_b1"]
    return out


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench" / "q7b")
    ap.add_argument("--llamacpp-dir", type=Path, default=ROOT / "build" / "bench" / "llamacpp")
    ap.add_argument("--output", type=Path, default=ROOT / "build" / "bench" / "quantized.json")
    ap.add_argument(
        "--tiny", action="store_true", help="LLaMA 2 x 256, CLIP 2 x 64: the same path in seconds"
    )
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4"], choices=list(MATCHING))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--group-size", type=int, help="int4 group size (default: vlmkit's)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument(
        "--keep", action="store_true", help="keep the checkpoint and GGUF files (reused next run)"
    )
    # worker-only flags
    ap.add_argument("--worker", choices=["vlmkit", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.new_tokens < 2 or 1 not in args.batches:
        ap.error("need --new-tokens >= 2 and batch 1 among --batches")
    return args


def main() -> None:
    args = parse_args()
    if args.worker == "vlmkit":
        result = vlmkit_worker(
            args.folder, args.scheme, args.new_tokens, args.rows, args.logits, args.group_size
        )
        print(json.dumps(result))
        return
    if args.worker == "transformers":
        print(json.dumps(transformers_worker(args.folder, args.new_tokens, args.logits)))
        return

    shape = "tiny" if args.tiny else "7b"
    config = llava_config(shape)
    checkpoint, gguf_dir = args.workdir / f"checkpoint-{shape}", args.workdir / f"gguf-{shape}"
    logits_dir = args.workdir / f"logits-{shape}"
    logits_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "shape": shape,
        "config": config,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "batches": sorted(set(args.batches)),
        "threads": THREADS,
        "vlmkit": {},
    }
    load = results["machine"]["load_average"][0]
    if load > 0.5:
        say(f"warning: load average {load:.2f} on {os.cpu_count()} cores; other jobs will lower every figure")
    try:
        say("checking the key layout against transformers (tiny checkpoint)")
        verify_layout(args.workdir / "layout-check")
        results["layout_check"] = "transformers loads it: no missing, unexpected or mismatched keys"
        say(f"writing the {shape} checkpoint to {checkpoint}")
        start = time.perf_counter()
        if (checkpoint / MARKER).is_file() and json.loads((checkpoint / MARKER).read_text()) != config:
            shutil.rmtree(gguf_dir, ignore_errors=True)  # GGUFs of another checkpoint
        size = write_checkpoint(checkpoint, config)
        results["checkpoint"] = {"gb": size / 1e9, "write_s": time.perf_counter() - start}

        if not args.skip_llamacpp:
            results["llamacpp"] = run_llamacpp(args.llamacpp_dir, checkpoint, gguf_dir, config["text_config"])

        rows = ",".join(str(b) for b in sorted(set(args.batches)))
        for scheme in args.schemes:
            say(f"vlmkit {scheme}")
            flags: dict[str, object] = dict(
                folder=checkpoint, scheme=scheme, new_tokens=args.new_tokens, rows=rows
            )
            if args.group_size:
                flags["group_size"] = args.group_size
            results["vlmkit"][scheme] = run_isolated("vlmkit", logits=logits_dir / f"{scheme}.pt", **flags)
        if not args.skip_transformers:
            say("transformers bf16")
            results["transformers"] = run_isolated(
                "transformers",
                folder=checkpoint,
                new_tokens=args.new_tokens,
                logits=logits_dir / "transformers.pt",
            )

        reference = logits_dir / "bf16.pt"
        if "error" not in results["vlmkit"].get("bf16", {"error": ""}):
            named = [(results["vlmkit"][s], logits_dir / f"{s}.pt") for s in results["vlmkit"]]
            if results.get("transformers"):
                named.append((results["transformers"], logits_dir / "transformers.pt"))
            for r, path in named:
                if "error" not in r:
                    r.update(agreement(reference, path))
            if "tokens" in (results.get("transformers") or {}):
                results["same_tokens_as_transformers"] = (
                    results["transformers"]["tokens"] == results["vlmkit"]["bf16"]["tokens"]
                )
        results["ratios"] = ratios(results)
        results["total_s"] = time.perf_counter() - STARTED
    finally:
        shutil.rmtree(logits_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(gguf_dir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print_report(results)
    if "same_tokens_as_transformers" in results:
        print(
            f"  vlmkit bf16 and transformers bf16 chose the same tokens: {results['same_tokens_as_transformers']}"
        )
    print(f"\nresults: {args.output}; total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
