"""The `vlmkit` command line. Every command is also a typed Python function (see the imports)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from vlmkit.bench import bench_command
from vlmkit.models import DEFAULT_MODEL


def finetune_parser(sub: argparse._SubParsersAction) -> None:
    from vlmkit.train.finetune import TRAIN_MODES, FinetuneConfig

    p = sub.add_parser(
        "finetune",
        help="supervised fine-tuning on a JSONL conversation dataset",
        description="Fine-tune on a JSONL dataset in the LLaVA conversation format. Runs as is on "
        "one process, or under `torchrun --nproc_per_node=N` on several.",
    )
    defaults = FinetuneConfig(data="", output_dir="")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", help="checkpoint folder or hub id to start from")
    p.add_argument("--init-config", help="config.json to start from random weights (small models)")
    p.add_argument("--processor", help="folder with the tokenizer/processor files (default: --model)")
    p.add_argument(
        "--train",
        choices=TRAIN_MODES,
        default=defaults.train,
        help="config: the checkpoint's freeze flags; projector: projector/resampler + cross-attention; "
        "lora: LoRA adapters (peft); full: everything",
    )
    p.add_argument("--lora-targets", nargs="+", default=defaults.lora_targets)
    quantize_arguments(p)  # with --train lora: QLoRA on a frozen quantized base
    integers = "lora_r lora_alpha epochs max_steps batch_size grad_accum warmup_steps max_length seed "
    for name in (integers + "save_every eval_every init_seed").split():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lora_dropout", "lr", "weight_decay", "min_lr_ratio", "max_grad_norm"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--vision-lr", type=float, help="the vision tower's learning rate (default: --lr)")
    p.add_argument("--eval-data")
    p.add_argument("--on-bad-sample", choices=("skip", "error"), default=defaults.on_bad_sample)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the processes (FSDP2, under torchrun); "
        "checkpoints are sharded (torch.distributed.checkpoint) and resume on any number of processes",
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")

    def run(args: argparse.Namespace) -> int:
        from vlmkit.train.finetune import finetune

        fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
        config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
        result = finetune(config)
        print(
            f"trained {result.steps} steps; final loss {result.losses[-1]:.4f}; saved in {result.output_dir}"
        )
        return 0

    p.set_defaults(run=run)


def merge_lora_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model (a full checkpoint)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--output-dir", required=True)

    def run(args: argparse.Namespace) -> int:
        from vlmkit.train.finetune import merge_lora

        print(f"merged checkpoint written to {merge_lora(args.adapter, args.base, args.output_dir)}")
        return 0

    p.set_defaults(run=run)


def export_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-checkpoint",
        help="turn a sharded --fsdp training checkpoint into a full one (safetensors, or the LoRA adapter)",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint-N folder of a finetune --fsdp run")
    p.add_argument("--output-dir", required=True)

    def run(args: argparse.Namespace) -> int:
        from vlmkit.train.fsdp import export_checkpoint

        print(f"exported to {export_checkpoint(args.checkpoint, args.output_dir)}")
        return 0

    p.set_defaults(run=run)


def quantize_arguments(p: argparse.ArgumentParser) -> None:
    from vlmkit.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES

    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="weight-only quantization of the language model's linear layers and LM head, done at load",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        help=f"int4: inputs per scale and zero (default {DEFAULT_GROUP_SIZE})",
    )
    p.add_argument(
        "--quantize-parts",
        nargs="+",
        choices=("vision", "projector"),
        default=[],
        help="quantize these too (the vision tower, the projector / resampler)",
    )


def tp_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="split the language model over N processes (tensor parallel); run the command under "
        "`torchrun --nproc-per-node N -m vlmkit ...`",
    )


def quantization(args: argparse.Namespace) -> dict[str, Any]:
    """The `quantize_arguments` as keyword arguments of `load_model` / `VLM.load`."""
    return {
        "quantize": args.quantize,
        "group_size": args.group_size,
        "quantize_parts": tuple(args.quantize_parts),
    }


def sampling_arguments(p: argparse.ArgumentParser) -> None:
    from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS

    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="with sampling")
    p.add_argument("--top-k", type=int, default=50, help="with sampling; 0: off")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 makes repeating a token less likely; 1: off",
    )
    p.add_argument("--seed", type=int, help="for sampling")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--device", default=None)
    quantize_arguments(p)


def sampling(args: argparse.Namespace) -> dict:
    import torch

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    settings = {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        if args.seed is not None:
            settings["generator"] = torch.Generator().manual_seed(args.seed)
    return settings


def prompted_images(paths: Sequence[str], prompts: Sequence[str]) -> list:
    """Load the images; draw the visual prompts (JSON specs) on the first one."""
    from vlmkit.images import load_image
    from vlmkit.visual_prompts import draw_visual_prompts

    if prompts and not paths:
        raise ValueError("--visual-prompt needs an --image to draw on")
    images = [load_image(p) for p in paths]
    for spec in prompts:
        images[0] = draw_visual_prompts(images[0], spec)
    return images


MODEL_HELP = "checkpoint folder, hub id, or built-in demo model: demo (ViP-LLaVA, the default), demo-idefics"


def generate_command(
    prompt: str,
    model: str = DEFAULT_MODEL,
    *,
    images: Sequence[str] = (),
    visual_prompts: Sequence[str] = (),
    dtype: str | None = None,
    device: str | None = None,
    raw: bool = False,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_parts: Sequence[str] = (),
    tp: int = 1,
    **settings: Any,
) -> str:
    """The answer of `model` to `prompt` about `images` (visual prompts drawn on the first image): one user
    turn through the checkpoint's chat template, or with raw=True the prompt as it is (`<image>` markers
    where the images go; none: images first). tp: split over this many processes, each running this call."""
    from vlmkit.tensor_parallel import is_main_process
    from vlmkit.vlm import VLM, user_turn

    pictures = prompted_images(images, visual_prompts)
    vlm = VLM.load(
        model,
        dtype=dtype,
        device=device,
        progress=is_main_process(),
        quantize=quantize,
        group_size=group_size,
        quantize_parts=quantize_parts,
        tp=tp,
    )
    if raw:
        return vlm.generate(prompt, images=pictures, **settings)
    return vlm.chat([user_turn(prompt, pictures)], **settings)


def generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt about one or more images")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--image", action="append", default=[], help="an image path (repeat for several)")
    p.add_argument(
        "--visual-prompt",
        action="append",
        default=[],
        help='JSON drawn on the first image, e.g. {"type": "rectangle", "box": [10, 10, 90, 90]}',
    )
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as it is instead of through the chat template"
    )
    sampling_arguments(p)
    tp_argument(p)

    def run(args: argparse.Namespace) -> int:
        from vlmkit.tensor_parallel import is_main_process

        answer = generate_command(
            args.prompt,
            args.model,
            images=args.image,
            visual_prompts=args.visual_prompt,
            dtype=args.dtype,
            device=args.device,
            raw=args.raw,
            tp=args.tp,
            **quantization(args),
            **sampling(args),
        )
        if is_main_process():  # every process of a split model computes the same answer
            print(answer.strip())  # without the space a chat template leaves before it
        return 0

    p.set_defaults(run=run)


def chat_loop(vlm: Any, settings: dict, stdin: TextIO, stdout: TextIO) -> None:
    """The REPL of `vlmkit chat`: OpenAI-style messages through the model's chat template, streamed.
    /image PATH and /prompt JSON attach to the next message; /reset; /quit."""
    from vlmkit.vlm import user_turn

    messages: list[dict] = []
    images: list[str] = []
    prompts: list[str] = []
    stdout.write("> ")
    stdout.flush()
    for raw in stdin:
        line = raw.strip()
        if line in ("/quit", "/exit"):
            return
        try:
            if line == "/reset":
                messages, images, prompts = [], [], []
            elif line.startswith("/image "):
                images.append(line.removeprefix("/image ").strip())
            elif line.startswith("/prompt "):
                prompts.append(line.removeprefix("/prompt ").strip())
            elif line:
                pictures = prompted_images(images, prompts)
                images, prompts = [], []
                messages.append(user_turn(line, pictures))
                answer = ""
                for delta in vlm.stream_chat(messages, **settings):
                    answer += delta
                    stdout.write(delta)
                    stdout.flush()
                stdout.write("\n")
                messages.append({"role": "assistant", "content": answer})
        except (ValueError, TypeError, OSError) as e:  # a bad file, folder or /prompt: say so, keep chatting
            images, prompts = [], []
            stdout.write(f"error: {e}\n")
        stdout.write("> ")
        stdout.flush()


def chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="an interactive chat that streams its answers",
        description="Type a message and press enter. /image PATH attaches an image to the next "
        "message, /prompt JSON draws a visual prompt on it, /reset forgets the "
        "conversation, /quit ends.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    sampling_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from vlmkit.vlm import VLM

        chat_loop(
            VLM.load(args.model, dtype=args.dtype, device=args.device, progress=True, **quantization(args)),
            sampling(args),
            sys.stdin,
            sys.stdout,
        )
        return 0

    p.set_defaults(run=run)


def info_command(
    model: str,
    *,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_parts: Sequence[str] = (),
    batch_size: int = 1,
    length: int | None = None,
    tp: int = 1,
) -> dict[str, Any]:
    """Family, parameter counts per part, dtype, quantization and files of a checkpoint, and its memory plan
    (weights and KV cache at `batch_size` rows of `length` tokens, quantized as asked, per process when split
    over `tp`), from config.json and the file headers: no weight is read."""
    from vlmkit.models import resolve_model
    from vlmkit.plan import memory_plan, meta_model
    from vlmkit.weights import read_config

    folder = resolve_model(model)
    raw = read_config(folder)
    plan = memory_plan(
        folder,
        quantize=quantize,
        group_size=group_size,
        quantize_parts=tuple(quantize_parts),
        batch_size=batch_size,
        length=length,
        tp=tp,
    )
    m, _ = meta_model(raw, str(folder / "config.json"))
    owner = m.model if hasattr(m, "model") else m
    # the parts: each child of the model (of its `model` when it wraps one) and each parameter that the model
    # holds itself (LLaVA-NeXT's image_newline); a parameter shared by two parts counts in the first
    counted: set[int] = set()

    def size(held: Any) -> int:
        new = [p for p in held if id(p) not in counted]
        counted.update(id(p) for p in new)
        return sum(p.numel() for p in new)

    parts: dict[str, int] = {}
    levels = [(owner, "model."), (m, "")] if owner is not m else [(m, "")]
    for module, at in levels:
        for name, child in module.named_children():
            if child is not owner:
                parts[at + name] = size(child.parameters())
        for name, p in module.named_parameters(recurse=False):
            parts[at + name] = size([p])
    return {
        "model_type": raw["model_type"],
        "parameters": sum(p.numel() for p in m.parameters()),
        "parts": parts,
        "dtype": plan.dtype,
        "quantization": plan.quantization,
        "memory": plan.as_dict(),
        "folder": str(folder),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
    }


def info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="family, parameter counts, dtype, files and the memory a checkpoint needs (reads no weights)",
    )
    p.add_argument("model")
    quantize_arguments(p)
    p.add_argument("--batch-size", type=int, default=1, help="rows for the KV-cache estimate")
    p.add_argument("--length", type=int, help="tokens per row (default: the model's max_position_embeddings)")
    p.add_argument("--tp", type=int, default=1, help="the plan of each of N processes (tensor parallel)")
    p.add_argument(
        "--device-memory", type=float, help="GB per device: say whether the plan fits and what is left"
    )

    def run(args: argparse.Namespace) -> int:
        info = info_command(
            args.model, batch_size=args.batch_size, length=args.length, tp=args.tp, **quantization(args)
        )
        mem = info["memory"]
        print(
            f"{info['folder']}\n  family: {info['model_type']}\n  dtype: {info['dtype']}\n"
            f"  quantization: {info['quantization'] or 'none'}\n  parameters: {info['parameters']:,}"
        )
        for name, n in info["parts"].items():
            print(f"    {name}: {n:,}")
        split = f", per process of tp={mem['tp']}" if mem["tp"] > 1 else ""
        print(f"  memory ({mem['quantization'] or mem['dtype']}{split}):")
        for name, n in mem["parts"].items():
            print(f"    {name}: {n / 1e9:.2f} GB")
        print(
            f"    weights {mem['weight_bytes'] / 1e9:.2f} GB + KV cache {mem['kv_cache_bytes'] / 1e9:.2f} GB "
            f"(batch {mem['batch_size']} x {mem['length']} tokens) = {mem['total_bytes'] / 1e9:.2f} GB"
        )
        if args.device_memory is not None:
            left = args.device_memory - mem["total_bytes"] / 1e9
            devices = (
                f"{mem['tp']} x {args.device_memory:g} GB" if mem["tp"] > 1 else f"{args.device_memory:g} GB"
            )
            verdict = (
                f"fits, {left:.2f} GB left per device" if left > 0 else f"does not fit, {-left:.2f} GB short"
            )
            print(f"  on {devices}: {verdict} (activations need some of what is left)")
        print("  files: " + ", ".join(info["files"]))
        return 0

    p.set_defaults(run=run)


def convert_command(
    model: str,
    output_dir: str,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_parts: Sequence[str] = (),
) -> str:
    """Re-save a checkpoint (any accepted layout, .bin included) as safetensors in the published layout,
    with its processor files; quantize: write int8 / int4 weights (quantized one layer at a time as the
    source is read), which `load_model` reads back as they are."""
    from vlmkit.models import load_model, resolve_model
    from vlmkit.quant import stored_quantization
    from vlmkit.train.finetune import copy_processor_files
    from vlmkit.weights import read_config

    folder = resolve_model(model)
    stored = stored_quantization(read_config(folder), str(folder / "config.json"))
    if quantize is not None and stored is not None:
        raise ValueError(
            f"{folder} is already quantized ({stored.describe()}); quantize the full-precision checkpoint instead"
        )
    loaded = load_model(
        folder,
        dtype=dtype,
        quantize=quantize,
        group_size=group_size,
        quantize_parts=tuple(quantize_parts),
        inference=False,
    )
    loaded.save_pretrained(output_dir)
    copy_processor_files(folder, Path(output_dir))
    return output_dir


def convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="re-save a checkpoint as safetensors (optionally in another dtype, or quantized)"
    )
    p.add_argument("model")
    p.add_argument("output_dir")
    p.add_argument("--dtype")
    quantize_arguments(p)

    def run(args: argparse.Namespace) -> int:
        print(
            f"written to {convert_command(args.model, args.output_dir, dtype=args.dtype, **quantization(args))}"
        )
        return 0

    p.set_defaults(run=run)


def bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time to first token, decode tokens/s and peak memory of generation")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--image", help="an image path (default: a generated picture)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    quantize_arguments(p)

    def run(args: argparse.Namespace) -> int:
        r = bench_command(
            args.model,
            batch_size=args.batch_size,
            new_tokens=args.new_tokens,
            prompt=args.prompt,
            image=args.image,
            repeats=args.repeats,
            dtype=args.dtype,
            device=args.device,
            **quantization(args),
        )
        if args.json:
            print(json.dumps(r))
            return 0
        print(
            f"{r['model']} ({r['model_type']}, {r['parameters']:,} parameters, {r['dtype']}, {r['device']}"
            + (f", {r['quantization']}" if r["quantization"] else "")
            + ")\n"
            f"  batch {r['batch_size']}, {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens\n"
            f"  load {r['load_s']:.2f} s   first token {r['ttft_s'] * 1000:.1f} ms   "
            f"decode {r['decode_tok_s']:.1f} tok/s   peak RSS {r['peak_rss_gb']:.2f} GB"
            + (f"   peak CUDA {r['peak_cuda_gb']:.2f} GB" if r["peak_cuda_gb"] is not None else "")
        )
        return 0

    p.set_defaults(run=run)


def serve_parser(sub: argparse._SubParsersAction) -> None:
    from vlmkit.serve.config import EngineConfig, ServerConfig, add_flags, from_args

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching",
        description="POST /v1/chat/completions and /v1/completions (stream: true for server-sent events), "
        "GET /v1/models, /health, /metrics, and a page at / to chat and draw visual prompts.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    add_flags(p, ServerConfig)
    add_flags(p, EngineConfig)
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    quantize_arguments(p)
    tp_argument(p)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (peft folder) under NAME; a request picks it by `model` (repeat for several)",
    )
    p.add_argument(
        "--max-loras", type=int, default=4, help="adapters held in memory at once (least recently used out)"
    )

    def run(args: argparse.Namespace) -> int:
        import logging

        from vlmkit.serve.server import serve

        logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(name)s: %(message)s")
        engine, server = from_args(EngineConfig, args), from_args(ServerConfig, args)
        serve(
            args.model,
            engine=engine,
            server=server,
            dtype=args.dtype,
            device=args.device,
            tp=args.tp,
            lora=lora_arguments(args.lora),
            max_loras=args.max_loras,
            **quantization(args),
        )
        return 0

    p.set_defaults(run=run)


def eval_parser(sub: argparse._SubParsersAction) -> None:
    from vlmkit.eval.fewshot import SELECTIONS
    from vlmkit.eval.tasks import TASKS

    p = sub.add_parser(
        "eval",
        help="score a model on a benchmark from its published files (VQAv2, POPE, MMBench, ViP-Bench, ...)",
        description="Answer a benchmark's questions in batches through the continuous-batching engine (greedy: "
        "a rerun gives the same numbers), score them with the benchmark's metric, and write the scores with "
        "every answer to --output, which a rerun resumes. Tasks: "
        + "; ".join(f"{t.name}: {t.metric}" for t in TASKS.values()),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="the benchmark's main file, or the folder holding it")
    p.add_argument("--images", help="the pictures' folder, when not where the published layout puts them")
    p.add_argument("--output", help="results JSON: scores and every answer; a partial one is resumed")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--batch-size", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-new-tokens", type=int, help="answer budget (default: the task's)")
    p.add_argument("--prompt", help="user text template with {question} and {options} (default: the task's)")
    p.add_argument("--shots", type=int, default=0, help="in-context examples per question (VQA, captioning)")
    p.add_argument(
        "--shot-selection", choices=SELECTIONS, default="random", help="rices: most similar pictures"
    )
    p.add_argument("--support", help="where the examples come from (default: the evaluated data)")
    p.add_argument("--seed", type=int, default=0, help="for random examples")
    p.add_argument("--split", help="the split to read (Visual7W, ScienceQA, captions; default test)")
    p.add_argument(
        "--no-circular", dest="circular", action="store_false", default=None, help="MMBench: one pass"
    )
    p.add_argument("--judge-url", help="ViP-Bench: an OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", help="ViP-Bench: the judge model's name")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="prompt + answer tokens per request (default: the model's context, at most 2048)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    quantize_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from vlmkit.eval.run import evaluate

        result = evaluate(
            args.task,
            args.data,
            args.model,
            images=args.images,
            output=args.output,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            prompt=args.prompt,
            shots=args.shots,
            shot_selection=args.shot_selection,
            support=args.support,
            seed=args.seed,
            split=args.split,
            circular=args.circular,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            dtype=args.dtype,
            device=args.device,
            max_seq_len=args.max_seq_len,
            progress=args.progress,
            **quantization(args),
        )
        if args.json:
            print(json.dumps(result.scores))
            return 0
        speed = (
            f", {result.samples_per_second:.1f} q/s" if result.answered else " (all from the results file)"
        )
        saved = f" -> {result.path}" if result.path is not None else ""
        print(f"{result.task} ({result.model}): {len(result.samples)} questions{speed}{saved}")
        for name, value in result.scores.items():
            if isinstance(value, dict):
                print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items()))
            else:
                print(f"  {name}: {value:.2f}" if isinstance(value, float) else f"  {name}: {value}")
        for extra in result.extra_files:
            print(f"  answers for the benchmark's evaluator: {extra}")
        return 0

    p.set_defaults(run=run)


def lora_arguments(pairs: Sequence[str]) -> dict[str, str]:
    """--lora NAME=PATH values as {name: path}; ValueError for a malformed or repeated one."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH, got {pair!r}")
        if name in out:
            raise ValueError(f"--lora names {name!r} twice")
        out[name] = path
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmkit", description="run, serve and fine-tune vision-language models"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        generate_parser,
        chat_parser,
        info_parser,
        convert_parser,
        finetune_parser,
        export_checkpoint_parser,
        merge_lora_parser,
        bench_parser,
        serve_parser,
        eval_parser,
    ):
        add(sub)
    args = parser.parse_args(argv)
    finished = False
    try:
        code = args.run(args)
        finished = True
        return code
    except Exception as e:  # one readable line instead of a traceback, unless asked for
        if args.debug:
            raise
        print(f"vlmkit {args.command}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        end_process_group(together=finished)


def end_process_group(*, together: bool) -> None:
    """Leave the process group a split model (tp) or a training run started, if one is still up; together:
    wait for every process first (one tearing gloo down while a peer still talks to it may abort), which
    only a process that finished its work may do (a failed peer would never arrive)."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def entry() -> None:
    """The `vlmkit` command (and `python -m vlmkit`): main(), then exit with its code. A process of a
    torchrun group leaves without the interpreter's teardown: its work and its process group are done, and
    gloo's C++ threads, destroyed at interpreter exit, abort the process now and then ("terminate called
    without an active exception", about 1 run in 20 on 2 cores), which torchrun reports as a failed run."""
    code = main()
    if "torch.distributed" in sys.modules and "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
