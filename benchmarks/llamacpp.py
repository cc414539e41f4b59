"""llama.cpp as a baseline for benchmarks/quantized.py: build it, write a GGUF, quantize it, run llama-bench.

The llama.cpp sources are the ones vendored in the llama-cpp-python source distribution (the version pinned
below), built once with cmake into `<root>/build/bin` (only `llama-bench` and `llama-quantize`); a second
call finds the binaries and skips the build.

`write_gguf` writes the LLaMA half of a LLaVA checkpoint (keys `language_model.model.*` and
`language_model.lm_head.weight`, read from the safetensors shards one tensor at a time) as an F16 GGUF of
arch `llama`, with a vocabulary of type "none" (llama.cpp then adds `vocab_size` dummy tokens): enough for
llama-bench, which feeds random token ids. q/k rows are reordered from the rotate-half rotary layout of
the checkpoint to the interleaved pairs llama.cpp rotates (as llama.cpp's own converter does), so the GGUF
holds the same text model; not checked numerically here, as the speeds do not depend on it.
llama-quantize keeps its defaults: Q4_0 and Q8_0 leave output.weight (the LM head) in Q6_K / Q8_0.

Needs the `gguf` package (benchmark-only, not a vlmkit dependency): `.venv/bin/pip install gguf`.

Peak RSS of each llama.cpp process is read from `os.wait4`, i.e. the kernel's own accounting for that child.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
SDIST_CACHE = Path("/tmp/pkgs") / f"{SDIST_NAME}.tar.gz"
TARGETS = ("llama-bench", "llama-quantize")
CMAKE_FLAGS = (
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)

# checkpoint key (layer number as {}) -> GGUF tensor name
GGUF_NAMES = {
    "language_model.model.embed_tokens.weight": "token_embd.weight",
    "language_model.model.norm.weight": "output_norm.weight",
    "language_model.lm_head.weight": "output.weight",
    "language_model.model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "language_model.model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "language_model.model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "language_model.model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "language_model.model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "language_model.model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "language_model.model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "language_model.model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "language_model.model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}
LAYER = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def source_dir(root: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist, extracted under `root` (downloaded with pip
    when /tmp/pkgs does not hold it)."""
    src = root / SDIST_NAME / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = SDIST_CACHE
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
            + ["--no-binary", ":all:", "--no-deps", "-d", str(root)],
            check=True,
        )
        sdist = root / sdist.name
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return src


def ensure_built(root: Path, jobs: int = 2) -> tuple[Path, float | None]:
    """The folder holding llama-bench and llama-quantize, and the build's seconds (None: already built)."""
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir, None
    src = source_dir(root)
    start = time.perf_counter()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"), *generator, *CMAKE_FLAGS], check=True)
    subprocess.run(
        ["cmake", "--build", str(root / "build"), "--target", *TARGETS, f"-j{jobs}"],
        check=True,
    )
    return bin_dir, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------


def gguf_name(key: str) -> str | None:
    """The GGUF name of a checkpoint key of the text model; None for the vision tower and the projector."""
    if not key.startswith("language_model."):
        return None
    match = LAYER.search(key)
    pattern = LAYER.sub(".layers.{}.", key, count=1) if match else key
    if pattern not in GGUF_NAMES:
        raise KeyError(f"no GGUF name for text-model key {key!r}")
    return GGUF_NAMES[pattern].format(match.group(1)) if match else GGUF_NAMES[pattern]


def to_interleaved_rotary(weight: Any, heads: int) -> Any:
    """Rows of a q/k projection reordered per head from halves (x_i, x_{i+D/2}) to adjacent pairs."""
    out, inp = weight.shape
    head_dim = out // heads
    return weight.reshape(heads, 2, head_dim // 2, inp).transpose(1, 2).reshape(out, inp)


def write_gguf(folder: Path, out: Path, text: dict[str, Any]) -> Path:
    """Write the text model of the LLaVA checkpoint in `folder` to `out` as an F16 GGUF (norms in F32),
    one tensor in memory at a time. `text` is config.json's text_config."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    keys = [k for k in index if gguf_name(k) is not None]
    order = {name: i for i, name in enumerate(GGUF_NAMES)}

    def position(key: str) -> tuple[int, int]:
        match = LAYER.search(key)
        layer = int(match.group(1)) if match else (-1 if "embed" in key else 1 << 30)
        return layer, order[LAYER.sub(".layers.{}.", key, count=1)]

    keys.sort(key=position)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads

    def read(key: str) -> np.ndarray:
        with safe_open(str(folder / index[key]), framework="pt") as f:
            t = f.get_tensor(key)
        if key.endswith("q_proj.weight"):
            t = to_interleaved_rotary(t, heads)
        elif key.endswith("k_proj.weight"):
            t = to_interleaved_rotary(t, kv_heads)
        # llama.cpp keeps 1-D tensors (norms) in F32 and quantizes only matrices
        return t.to(torch.float32 if t.dim() == 1 else torch.float16).contiguous().numpy()

    # written under another name and renamed when complete, so a crash leaves nothing a rerun would reuse
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name("vlmkit-benchmark-random-llama")
    writer.add_context_length(text.get("max_position_embeddings", 4096))
    writer.add_embedding_length(text["hidden_size"])
    writer.add_block_count(text["num_hidden_layers"])
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(text["hidden_size"] // heads)
    writer.add_rope_freq_base(float(text.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(text.get("rms_norm_eps", 1e-5))
    writer.add_vocab_size(text["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("none")  # no tokenizer: llama.cpp adds vocab_size dummy tokens
    for key in keys:
        with safe_open(str(folder / index[key]), framework="pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        dtype = np.float32 if len(shape) == 1 else np.float16
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name(key), shape, np.dtype(dtype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key in keys:
        writer.write_tensor_data(read(key))
    writer.close()
    partial.replace(out)
    return out


# ---------------------------------------------------------------------------------------------
# Running the tools
# ---------------------------------------------------------------------------------------------


def run_measured(command: list[str], log: Path) -> tuple[str, float, float]:
    """Run `command` with stdout captured and stderr to `log`; its stdout, wall seconds and peak RSS (GB)."""
    out_path = log.with_suffix(".stdout")
    start = time.perf_counter()
    with open(out_path, "w") as out, open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; tell Popen
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed with exit code {proc.returncode}:\n{tail}")
    return out_path.read_text(), wall, usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB


def quantize(bin_dir: Path, src: Path, dst: Path, kind: str, threads: int = 2) -> float:
    """llama-quantize `src` to `kind` ("Q8_0", "Q4_0", ...); its wall seconds."""
    partial = dst.with_name(dst.name + ".partial")
    command = [str(bin_dir / "llama-quantize"), str(src), str(partial), kind, str(threads)]
    _, wall, _ = run_measured(command, dst.with_suffix(".log"))
    partial.replace(dst)
    return wall


def bench(
    bin_dir: Path, model: Path, *, threads: int = 2, prompt: int = 617, gen: int = 32, repeats: int = 2
) -> dict[str, Any]:
    """llama-bench's prompt (pp) and generation (tg) speeds in tokens/s, with its file size and peak RSS."""
    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads)]
    command += ["-p", str(prompt), "-n", str(gen), "-r", str(repeats), "-o", "json"]
    stdout, wall, rss = run_measured(command, model.with_suffix(".bench.log"))
    result: dict[str, Any] = {
        "file_gb": model.stat().st_size / 1e9,
        "peak_rss_gb": rss,
        "wall_s": wall,
        "threads": threads,
    }
    for test in json.loads(stdout):
        name = "pp" if test["n_prompt"] else "tg"
        result[f"{name}_tok_s"] = test["avg_ts"]
        result[f"{name}_stddev"] = test["stddev_ts"]
        result[f"{name}_tokens"] = test["n_prompt"] or test["n_gen"]
        result["build_commit"] = test.get("build_commit")
        result["model_type"] = test.get("model_type")
    return result
