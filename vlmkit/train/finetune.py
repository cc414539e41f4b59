"""Supervised fine-tuning: what trains, the loop, checkpoints that survive a kill, and several processes.

`finetune(FinetuneConfig(...))` is the whole job; `vlmkit finetune` is the same from the command line, and
the same command under `torchrun --nproc_per_node=N` trains with DistributedDataParallel (gloo on CPU, nccl
on GPU), or, with fsdp=True, shards parameters, gradients and optimizer state over the processes (FSDP2:
vlmkit.train.fsdp; one plain process is then a group of one). The loss of a step is the sum of token
losses over the whole global batch (every process, every accumulation micro-batch) divided by its number
of labelled tokens, so one process and N processes on the same global batch compute the same loss.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.llama import causal_lm_loss
from vlmkit.models import family_of, init_model, load_model, load_processor, lora_target_regex, resolve_model
from vlmkit.quant import QuantLinear
from vlmkit.train.checkpoints import (
    copy_processor_files,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from vlmkit.train.data import DataReport, Sample, collate, load_conversations
from vlmkit.train.fsdp import (
    check_same_parts_run,
    export_pretrained,
    join_process_group,
    no_gradient_sync,
    restore_sharded,
    save_sharded,
    shard_model,
)
from vlmkit.weights import read_config_file

TRAIN_MODES = ("config", "projector", "lora", "full")


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
    quantize: str | None = None  # "int8" | "int4": a frozen quantized base under the LoRA adapters (QLoRA)
    group_size: int | None = None  # int4 group size (default vlmkit.quant.DEFAULT_GROUP_SIZE)
    quantize_parts: list[str] = field(default_factory=list)  # also "vision", "projector"
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
    fsdp: bool = False  # FSDP2: shard over the processes (under torchrun; alone, a group of one)
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
        if self.quantize is not None and (self.train != "lora" or self.model is None):
            raise ValueError(
                f"quantize={self.quantize!r} trains LoRA adapters on a frozen quantized checkpoint (QLoRA): it "
                f"needs train='lora' and model= (got train={self.train!r}, model={self.model!r})"
            )
        if self.fsdp and self.quantize is not None:
            raise ValueError(
                f"fsdp shards parameters, and a quantized base (quantize={self.quantize!r}, QLoRA) keeps its "
                "weights as packed integer buffers that fully_shard neither shards nor gathers, nor do its "
                "sharded checkpoints hold them: train QLoRA without fsdp (DDP), or LoRA with fsdp on an "
                "unquantized base"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or left out: the epochs decide), got {self.max_steps}")
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
    """Set requires_grad for the mode, on the parts the model's family names for it; returns the model to train
    (a peft model for LoRA)."""
    parts = family_of(model).trainable
    if config.train == "full":
        model.requires_grad_(True)
    elif config.train == "projector":
        model.requires_grad_(False)
        for name, p in model.named_parameters(remove_duplicate=False):  # a shared one, under each name
            if in_parts(name, parts.projector):
                p.requires_grad_(True)
    elif config.train == "lora":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.layer import Linear as LoraLinear

        model.requires_grad_(False)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_regex(family_of(model), config.lora_targets),
        )
        # QLoRA: peft's own Linear wraps a quantized layer as it wraps nn.Linear (it only calls the base layer)
        lora._register_custom_module({QuantLinear: LoraLinear})
        model = get_peft_model(model, lora)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train={config.train!r} leaves nothing to train in this model")
    return model


def in_parts(name: str, parts: Sequence[str]) -> bool:
    """Whether the parameter `name` is one that `parts` names, or lies in a module they name: a part matches
    a module or parameter path equal to it or ending in ".part".

        >>> parts = ["multi_modal_projector", "image_newline"]
        >>> [in_parts(n, parts) for n in ("image_newline", "multi_modal_projector.linear_1.bias", "x.newline")]
        [True, True, False]
    """
    pieces = name.split(".")
    paths = [".".join(pieces[:i]) for i in range(1, len(pieces) + 1)]  # "a", "a.b", ..., the name itself
    return any(path == part or path.endswith(f".{part}") for path in paths for part in parts)


def param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: the vision tower at vision_lr when it is set (0 freezes
    it: no gradient is computed for it), the rest at lr. (Trained from random init at the text model's
    rate, the tower collapses to image-independent features before the text model learns to read them.)"""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.vision_lr is None:
        return [{"params": [p for _, p in trainable]}]
    tower = family_of(model).trainable.vision
    in_tower = [any(part in n for part in tower) for n, _ in trainable]
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
    copy_processor_files(resolve_model(base_model), out)
    return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> FinetuneResult:
    config.validate()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or config.fsdp
    if distributed and not dist.is_initialized():
        join_process_group()
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


@dataclass
class Job:
    """One training run in progress: what `_prepare` sets up and each `_step` advances."""

    config: FinetuneConfig
    rank: int
    world: int
    device: torch.device
    distributed: bool
    processor_dir: Path
    samples: list[Sample]
    eval_samples: list[Sample]
    report: DataReport
    model: nn.Module
    train_model: nn.Module  # the model (sharded in place with fsdp), or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[nn.Parameter]
    pad_id: int
    autocast: bool
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    step: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def _train(
    config: FinetuneConfig, rank: int, world: int, device: torch.device, distributed: bool
) -> FinetuneResult:
    job = _prepare(config, rank, world, device, distributed)
    if rank == 0:
        job.output_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=job.total_steps, initial=job.step, desc="finetune", unit="step")
    while job.step < job.total_steps:
        record = _step(job)
        _after_step(job, record, bar)
        if distributed:
            dist.barrier()
    if bar is not None:
        bar.close()
    if config.fsdp:
        export_pretrained(job.model, job.output_dir / "final", job.processor_dir)
    elif rank == 0:
        _save(job, job.output_dir / "final")
    return FinetuneResult(
        steps=job.step, losses=job.losses, output_dir=str(job.output_dir), data_summary=job.report.summary()
    )


def _load_data(
    config: FinetuneConfig, processor: Any, rank: int
) -> tuple[list[Sample], list[Sample], DataReport]:
    """The training samples (at least one, or ValueError), the evaluation samples, and the data report."""
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
    return samples, eval_samples, report


def _build_model(config: FinetuneConfig, device: torch.device) -> nn.Module:
    """The starting model (a checkpoint, or random weights from init_config) with the mode's parts trainable."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.model is not None:
        model = load_model(
            config.model,
            dtype=torch.float32,
            device=device,
            quantize=config.quantize,
            group_size=config.group_size,
            quantize_parts=tuple(config.quantize_parts),
            inference=False,  # the checkpoint's layout: the same in every process (DDP), and what gradients use
        )
    else:
        model = init_model(read_config_file(Path(config.init_config)), seed=config.init_seed).to(device)
    model = select_trainable(model, config)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    return model.train()


def _prepare(config: FinetuneConfig, rank: int, world: int, device: torch.device, distributed: bool) -> Job:
    """Data, model, optimizer and schedule, resumed from the latest checkpoint when config.resume says so."""
    processor_dir = resolve_model(config.processor or config.model)
    processor = load_processor(processor_dir)
    samples, eval_samples, report = _load_data(config, processor, rank)
    if config.fsdp and world > 1:
        check_same_parts_run(samples)
    model = _build_model(config, device)
    pad_id = processor.tokenizer.pad_token_id
    autocast = (
        config.bf16 if config.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    )
    global_batch = config.batch_size * config.grad_accum * world
    steps_per_epoch = max(1, len(samples) // global_batch)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    groups = param_groups(model, config)
    if config.fsdp:
        groups = shard_model(model, groups, device=device, bf16=autocast)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, warmup=config.warmup_steps, total=total_steps, min_ratio=config.min_lr_ratio),
    )
    step, losses = 0, []
    if config.resume and (ckpt := latest_checkpoint(Path(config.output_dir))) is not None:
        if config.fsdp:
            step, losses = restore_sharded(ckpt, model, optimizer, scheduler)
        else:
            step, losses = restore_checkpoint(
                ckpt, model, optimizer, scheduler, lora=config.train == "lora", device=device
            )
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}", flush=True)
    # parts of a model can sit out a step (tower layers past the deepest tap, the tower on text-only rows)
    train_model = (
        nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if distributed and not config.fsdp
        else model
    )
    return Job(
        config=config,
        rank=rank,
        world=world,
        device=device,
        distributed=distributed,
        processor_dir=processor_dir,
        samples=samples,
        eval_samples=eval_samples,
        report=report,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=[p for g in groups for p in g["params"]],
        pad_id=pad_id if pad_id is not None else 0,
        autocast=autocast,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        step=step,
        losses=losses,
    )


def _micro_batches(job: Job) -> list[dict[str, torch.Tensor]]:
    """This process's share of the step's global batch, as micro-batches on the device."""
    config = job.config
    epoch, index = divmod(job.step, job.steps_per_epoch)
    order = epoch_order(len(job.samples), config.seed, epoch)
    rows = order[index * job.global_batch : (index + 1) * job.global_batch]
    share = config.batch_size * config.grad_accum
    mine = rows[job.rank * share : (job.rank + 1) * share]
    micro = [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
    return [_to(collate([job.samples[i] for i in m], pad_token_id=job.pad_id), job.device) for m in micro]


def _step(job: Job) -> dict[str, Any]:
    """One optimizer step over the global batch; its metrics record."""
    started = time.perf_counter()
    batches = _micro_batches(job)
    n_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=job.device)
    if job.distributed:
        dist.all_reduce(n_tokens)
    denom = max(1, int(n_tokens))
    loss_sum = torch.zeros((), device=job.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last else _no_sync(job):
            part, _ = batch_loss_sum(job.train_model, batch, job.autocast)
            (part * job.world / denom).backward()  # DDP and FSDP average gradients over the world
        loss_sum += part.detach().float()
    if job.distributed:
        dist.all_reduce(loss_sum)
    # the norm before clipping; with fsdp the gradients are DTensor shards and it is the whole model's
    grad_norm = None
    if job.config.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(job.params, job.config.max_grad_norm))
    job.optimizer.step()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    job.step += 1
    loss = float(loss_sum) / denom
    job.losses.append(loss)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * job.world
    return {
        "step": job.step,
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": job.scheduler.get_last_lr()[0],
        "tokens_per_s": tokens / (time.perf_counter() - started),
    }


def _no_sync(job: Job) -> Any:
    """The context for an accumulation micro-batch whose gradients stay on this process."""
    if not job.distributed:
        return nullcontext()
    return no_gradient_sync(job.train_model) if job.config.fsdp else job.train_model.no_sync()


def _after_step(job: Job, record: dict[str, Any], bar: Any) -> None:
    """Evaluation when it is due; on rank 0, the metrics line and the progress bar; a checkpoint when due."""
    config, step = job.config, job.step
    if job.eval_samples and config.eval_every and (step % config.eval_every == 0 or step == job.total_steps):
        record["eval_loss"] = evaluate(
            job.model, job.eval_samples, job.pad_id, config.batch_size, job.device, job.autocast
        )
    if job.rank == 0:
        with open(job.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
    if (config.save_every and step % config.save_every == 0) or step == job.total_steps:
        _save(job, job.output_dir / f"checkpoint-{step}")


def _save(job: Job, folder: Path) -> None:
    """A training checkpoint: sharded, by every process, with fsdp; else whole, by rank 0."""
    state = {"step": job.step, "losses": job.losses, "config": asdict(job.config)}
    if job.config.fsdp:
        save_sharded(folder, job.model, job.optimizer, job.scheduler, state, job.processor_dir)
    elif job.rank == 0:
        save_checkpoint(folder, job.model, job.optimizer, job.scheduler, state, job.processor_dir)


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
