"""Supervised fine-tuning: what trains, the loop, checkpoints that survive a kill, and several processes.

`finetune(FinetuneConfig(...))` is the whole job; `vlmkit finetune` is the same from the command line, and
the same command under `torchrun --nproc_per_node=N` trains with DistributedDataParallel (gloo on CPU, nccl
on GPU). The loss of a step is the sum of token losses over the whole global batch (every process, every
accumulation micro-batch) divided by its number of labelled tokens, so one process and N processes on the
same global batch compute the same loss.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.llama import causal_lm_loss
from vlmkit.models import init_model, load_model, load_processor
from vlmkit.train.data import Sample, collate, load_conversations
from vlmkit.weights import read_config_file

TRAIN_MODES = ("config", "projector", "lora", "full")
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


@dataclass
class FinetuneConfig:
    data: str  # JSONL in the LLaVA conversation format
    output_dir: str
    model: str | None = None  # a checkpoint to start from (folder or hub id)
    init_config: str | None = None  # or: a config.json to start from random weights (small models)
    processor: str | None = None  # processor files (default: the model folder)
    train: str = "config"  # config (the checkpoint's freeze flags) | projector | lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    vision_lr: float | None = (
        None  # the vision tower's own rate (None: lr); from scratch it needs a lower one
    )
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: autocast to bf16 where the hardware runs it fast (CUDA with bf16)
    seed: int = 0
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    eval_data: str | None = None
    eval_every: int = 0
    on_bad_sample: str = "skip"  # skip | error
    resume: bool = False
    progress: bool = True
    init_seed: int = 0

    def validate(self) -> None:
        if (self.model is None) == (self.init_config is None):
            raise ValueError(
                "give exactly one of model (a checkpoint) or init_config (a config.json for random init)"
            )
        if self.train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {self.on_bad_sample!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, max_grad_norm and warmup_steps >= 0")
        if self.vision_lr is not None and self.vision_lr < 0:
            raise ValueError(f"vision_lr must be >= 0 (0 freezes the tower's updates), got {self.vision_lr}")
        if self.processor is None and self.model is None:
            raise ValueError(
                "with init_config, give processor= (a folder with the tokenizer and processor files)"
            )


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float]
    output_dir: str
    data_summary: str


# ---------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------


def select_trainable(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Set requires_grad for the mode; returns the model to train (a peft model for LoRA)."""
    if config.train == "full":
        model.requires_grad_(True)
    elif config.train == "projector":
        model.requires_grad_(False)
        for name in ("multi_modal_projector",):
            if hasattr(model, name):
                getattr(model, name).requires_grad_(True)
        base = getattr(model, "model", None)
        for name in ("perceiver_resampler", "gated_cross_attn_layers"):
            if base is not None and hasattr(base, name):
                getattr(base, name).requires_grad_(True)
        extra = [m for n, m in model.named_modules() if n.endswith(("additional_embedding", "additional_fc"))]
        for m in extra:  # IDEFICS's new-token rows always train
            m.requires_grad_(True)
    elif config.train == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        targets = "|".join(config.lora_targets)
        scope = r"(language_model|model\.layers|model\.gated_cross_attn_layers)"
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=rf".*{scope}.*\.({targets})$",
        )
        model = get_peft_model(model, lora)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train={config.train!r} leaves nothing to train in this model")
    return model


def param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: the vision tower at vision_lr when it is set (0 freezes
    it: no gradient is computed for it), the rest at lr. (Trained from random init at the text model's
    rate, the tower collapses to image-independent features before the text model learns to read them.)"""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.vision_lr is None:
        return [{"params": [p for _, p in trainable]}]
    in_tower = [("vision_tower." in n or "vision_model." in n) for n, _ in trainable]
    vision = [p for (_, p), t in zip(trainable, in_tower, strict=True) if t]
    rest = [p for (_, p), t in zip(trainable, in_tower, strict=True) if not t]
    if not vision:
        raise ValueError("vision_lr is set but no vision-tower parameter is trainable in this mode")
    if config.vision_lr == 0:
        for p in vision:
            p.requires_grad_(False)
        return [{"params": rest}]
    return [{"params": rest}, {"params": vision, "lr": config.vision_lr}]


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if hasattr(module, "self_attn") and hasattr(module, "mlp"):  # a decoder layer
            module.gradient_checkpointing = on


# ---------------------------------------------------------------------------------------------
# Schedule, batches, loss
# ---------------------------------------------------------------------------------------------


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to min_ratio of the peak at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool
) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    device_type = labels.device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**inputs).logits
    return causal_lm_loss(logits, labels, reduction="sum"), int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    processor_dir: Path | None,
) -> None:
    """Write weights (safetensors, or a peft adapter), optimizer/scheduler/RNG/data position, and the
    processor files into a temporary folder, fsync, then rename it into place: a kill at any moment leaves
    either the previous checkpoint or this one, never half of one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        copy_processor_files(processor_dir, tmp)
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        torch.save(trainer, tmp / "trainer_state.pt")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_processor_files(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(
        (int(p.name.split("-")[1]), p)
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.pt").is_file()
    )
    return found[-1][1] if found else None


def merge_lora(
    adapter_dir: str | os.PathLike, base_model: str | os.PathLike, output_dir: str | os.PathLike
) -> Path:
    """Fold a LoRA adapter (peft format) into its base model and write a full checkpoint that
    `vlmkit.load_model` and transformers both load."""
    from peft import PeftModel

    base = load_model(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(output_dir)
    merged.save_pretrained(out)
    base_dir = Path(base_model)
    copy_processor_files(base_dir if base_dir.is_dir() else None, out)
    return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> FinetuneResult:
    config.validate()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = (
        torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    try:
        return _train(config, rank, world, device, distributed)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: FinetuneConfig, rank: int, world: int, device: torch.device, distributed: bool
) -> FinetuneResult:
    output_dir = Path(config.output_dir)
    processor_dir = Path(config.processor or config.model)
    processor = load_processor(processor_dir)
    samples, report = load_conversations(
        config.data, processor, max_length=config.max_length, on_bad_sample=config.on_bad_sample
    )
    if not samples:
        raise ValueError(f"{config.data}: no usable training rows ({report.summary()})")
    eval_samples: list[Sample] = []
    if config.eval_data:
        eval_samples, _ = load_conversations(
            config.eval_data, processor, max_length=config.max_length, on_bad_sample=config.on_bad_sample
        )
    if rank == 0:
        print(f"data: {report.summary()}", flush=True)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.model is not None:
        model = load_model(config.model, dtype=torch.float32, device=device)
    else:
        model = init_model(read_config_file(Path(config.init_config)), seed=config.init_seed).to(device)
    model = select_trainable(model, config)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    model.train()
    pad_id = processor.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    autocast = (
        config.bf16 if config.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    )

    global_batch = config.batch_size * config.grad_accum * world
    steps_per_epoch = max(1, len(samples) // global_batch)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    groups = param_groups(model, config)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, warmup=config.warmup_steps, total=total_steps, min_ratio=config.min_lr_ratio),
    )
    step, losses = 0, []
    if config.resume and (ckpt := latest_checkpoint(output_dir)) is not None:
        step, losses = _resume(ckpt, model, optimizer, scheduler, config, device)
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}", flush=True)
    # parts of a model can sit out a step (tower layers past the deepest tap, the tower on text-only rows)
    train_model = (
        nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    )

    metrics = output_dir / "metrics.jsonl"
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step")
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(samples), config.seed, epoch)
        rows = order[index * global_batch : (index + 1) * global_batch]
        mine = rows[
            rank * config.batch_size * config.grad_accum : (rank + 1) * config.batch_size * config.grad_accum
        ]
        micro = [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
        started = time.perf_counter()
        batches = [_to(collate([samples[i] for i in m], pad_token_id=pad_id), device) for m in micro]
        n_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=device)
        if distributed:
            dist.all_reduce(n_tokens)
        denom = max(1, int(n_tokens))
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = train_model.no_sync() if distributed and not last else nullcontext()
            with sync:
                part, _ = batch_loss_sum(train_model, batch, autocast)
                (part * world / denom).backward()  # DDP averages gradients over the world
            loss_sum += part.detach().float()
        if distributed:
            dist.all_reduce(loss_sum)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = float(loss_sum) / denom
        losses.append(loss)
        elapsed = time.perf_counter() - started
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) * world
        record = {
            "step": step,
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / elapsed,
        }
        if eval_samples and config.eval_every and (step % config.eval_every == 0 or step == total_steps):
            record["eval_loss"] = evaluate(model, eval_samples, pad_id, config.batch_size, device, autocast)
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                save_checkpoint(
                    output_dir / f"checkpoint-{step}",
                    model,
                    optimizer,
                    scheduler,
                    {"step": step, "losses": losses, "config": asdict(config)},
                    processor_dir,
                )
        if distributed:
            dist.barrier()
    if bar is not None:
        bar.close()
    if rank == 0:
        final = output_dir / "final"
        save_checkpoint(
            final,
            model,
            optimizer,
            scheduler,
            {"step": step, "losses": losses, "config": asdict(config)},
            processor_dir,
        )
    return FinetuneResult(
        steps=step, losses=losses, output_dir=str(output_dir), data_summary=report.summary()
    )


def _resume(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: FinetuneConfig,
    device: torch.device,
) -> tuple[int, list[float]]:
    from vlmkit.weights import read_tensors, weight_files

    state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=True)
    if config.train == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    else:
        tensors = read_tensors(weight_files(ckpt))
        own = model.state_dict()
        with torch.no_grad():
            for name, ref in tensors.items():
                if name in own:
                    own[name].copy_(ref.load(device=device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(state["rng"]["python"])
    return int(state["step"]), list(state["losses"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: list[Sample],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: bool,
) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        part, n = batch_loss_sum(
            model, _to(collate(samples[i : i + batch_size], pad_token_id=pad_id), device), autocast
        )
        total, count = total + float(part), count + n
    model.train(was_training)
    return total / max(1, count)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
