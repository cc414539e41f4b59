"""The `vlmkit` command line. Every command is also a typed Python function (see the imports)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmkit", description="run, serve and fine-tune vision-language models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    finetune_parser(sub)
    merge_lora_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlmkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
