"""The `vlmkit` command line. Every command is also a typed Python function (see the imports)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO


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
    for name in (
        "lora_r",
        "lora_alpha",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "warmup_steps",
        "max_length",
        "seed",
        "save_every",
        "eval_every",
        "init_seed",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lora_dropout", "lr", "weight_decay", "min_lr_ratio", "max_grad_norm"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--eval-data")
    p.add_argument("--on-bad-sample", choices=("skip", "error"), default=defaults.on_bad_sample)
    p.add_argument("--gradient-checkpointing", action="store_true")
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


def sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, help="for sampling")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--device", default=None)


def sampling(args: argparse.Namespace) -> dict:
    import torch

    settings = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        if args.seed is not None:
            settings["generator"] = torch.Generator().manual_seed(args.seed)
    return settings


def prompted_images(paths: Sequence[str], prompts: Sequence[str]) -> list:
    """Load the images; draw the visual prompts (JSON specs) on the first one."""
    from vlmkit.images import load_image
    from vlmkit.vipllava.visual_prompts import draw_visual_prompts

    if prompts and not paths:
        raise ValueError("--visual-prompt needs an --image to draw on")
    images = [load_image(p) for p in paths]
    for spec in prompts:
        images[0] = draw_visual_prompts(images[0], spec)
    return images


def generate_command(
    model: str,
    prompt: str,
    *,
    images: Sequence[str] = (),
    visual_prompts: Sequence[str] = (),
    dtype: str | None = None,
    device: str | None = None,
    **settings: Any,
) -> str:
    """The answer of `model` to `prompt` about `images` (visual prompts drawn on the first image)."""
    from vlmkit.vlm import VLM

    pictures = prompted_images(images, visual_prompts)
    vlm = VLM.load(model, dtype=dtype, device=device)
    return vlm.generate(prompt, images=pictures, **settings)


def generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt about one or more images")
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--image", action="append", default=[], help="an image path (repeat for several)")
    p.add_argument(
        "--visual-prompt",
        action="append",
        default=[],
        help='JSON drawn on the first image, e.g. {"type": "rectangle", "box": [10, 10, 90, 90]}',
    )
    sampling_arguments(p)

    def run(args: argparse.Namespace) -> int:
        print(
            generate_command(
                args.model,
                args.prompt,
                images=args.image,
                visual_prompts=args.visual_prompt,
                dtype=args.dtype,
                device=args.device,
                **sampling(args),
            )
        )
        return 0

    p.set_defaults(run=run)


def chat_loop(vlm: Any, settings: dict, stdin: TextIO, stdout: TextIO) -> None:
    """The REPL of `vlmkit chat`: OpenAI-style messages through the model's chat template, streamed.
    /image PATH and /prompt JSON attach to the next message; /reset; /quit."""
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
                content = [{"type": "image", "image": p} for p in pictures] + [{"type": "text", "text": line}]
                messages.append({"role": "user", "content": content})
                answer = ""
                for delta in vlm.stream_chat(messages, **settings):
                    answer += delta
                    stdout.write(delta)
                    stdout.flush()
                stdout.write("\n")
                messages.append({"role": "assistant", "content": answer})
        except (ValueError, FileNotFoundError) as e:
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
    p.add_argument("--model", required=True)
    sampling_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from vlmkit.vlm import VLM

        chat_loop(
            VLM.load(args.model, dtype=args.dtype, device=args.device), sampling(args), sys.stdin, sys.stdout
        )
        return 0

    p.set_defaults(run=run)


def info_command(model: str) -> dict[str, Any]:
    """Family, parameter counts per part, dtype and files of a checkpoint."""
    from vlmkit.models import load_model
    from vlmkit.weights import read_config, resolve_checkpoint

    folder = resolve_checkpoint(model)
    raw = read_config(folder)
    m = load_model(folder)
    owner = m.model if hasattr(m, "model") else m
    prefix = "model." if owner is not m else ""
    parts = {
        prefix + name: sum(p.numel() for p in child.parameters()) for name, child in owner.named_children()
    }
    if owner is not m:
        parts |= {
            name: sum(p.numel() for p in c.parameters()) for name, c in m.named_children() if name != "model"
        }
    return {
        "model_type": raw["model_type"],
        "parameters": sum(p.numel() for p in m.parameters()),
        "parts": parts,
        "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
        "folder": str(folder),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
    }


def info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="family, parameter counts, dtype and files of a checkpoint")
    p.add_argument("model")

    def run(args: argparse.Namespace) -> int:
        info = info_command(args.model)
        print(
            f"{info['folder']}\n  family: {info['model_type']}\n  dtype: {info['dtype']}\n"
            f"  parameters: {info['parameters']:,}"
        )
        for name, n in info["parts"].items():
            print(f"    {name}: {n:,}")
        print("  files: " + ", ".join(info["files"]))
        return 0

    p.set_defaults(run=run)


def convert_command(model: str, output_dir: str, *, dtype: str | None = None) -> str:
    """Re-save a checkpoint (any accepted layout, .bin included) as safetensors in the published layout,
    with its processor files."""
    from vlmkit.models import load_model
    from vlmkit.train.finetune import copy_processor_files
    from vlmkit.weights import resolve_checkpoint

    folder = resolve_checkpoint(model)
    load_model(folder, dtype=dtype).save_pretrained(output_dir)
    copy_processor_files(folder, Path(output_dir))
    return output_dir


def convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="re-save a checkpoint as safetensors (optionally in another dtype)")
    p.add_argument("model")
    p.add_argument("output_dir")
    p.add_argument("--dtype")

    def run(args: argparse.Namespace) -> int:
        print(f"written to {convert_command(args.model, args.output_dir, dtype=args.dtype)}")
        return 0

    p.set_defaults(run=run)


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
        merge_lora_parser,
    ):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:  # one readable line instead of a traceback, unless asked for
        if args.debug:
            raise
        print(f"vlmkit {args.command}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
