"""Build a demo model from nothing: a tokenizer trained on the shapes world's text, a small config, processor
files, a generated training set, `finetune` from random init, and held-out accuracy per question type.

    python -m vlmkit.demo.build OUT --family vipllava --rows 20000 --steps 3000
    python -m vlmkit.demo.build OUT --family vipllava --world freeform   # shapes anywhere (vlmkit.demo.freeform)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.demo import freeform, heldout
from vlmkit.demo.model_files import (
    FREEFORM_IMAGE_SIZE,
    FREEFORM_PATCH,
    IMAGE_SIZE,
    build_tokenizer,
    write_configs,
)
from vlmkit.demo.shapes import (
    ARROW_COLORS,
    COLORS,
    GRID,
    PROMPT_COLORS,
    QUESTION_TYPES,
    SHAPES,
    arrow_to,
    cell_of,
    make_example,
    random_scene,
    render,
    write_dataset,
)
from vlmkit.visual_prompts import draw_visual_prompts

# stage 3's question types in turn: counting (and IDEFICS's two-picture question) come last to a small model
POLISH_MIX = {
    "vipllava": ("count", "box_shape", "count", "arrow_color", "count", "caption"),
    "idefics": ("count", "which_image", "count", "caption", "which_image"),
}
# pictures are drawn at these sizes and resized to IMAGE_SIZE by the processor, as users' pictures are
RENDER_SIZES = (96, 144, 192, 288)
# "grid": the 3 x 3 shapes world (vlmkit.demo.shapes); "freeform": shapes anywhere (vlmkit.demo.freeform),
# read at FREEFORM_IMAGE_SIZE in FREEFORM_PATCH patches and scored on the separately drawn vlmkit.demo.heldout
WORLDS = ("grid", "freeform")
PATCH_LABELS = {
    "shape": len(SHAPES) + 1,
    "color": len(COLORS) + 1,
    "boxed": 2,
    "arrow_head": 2,
    "arrow_tail": 2,
    "row": GRID,  # where the patch is: IDEFICS's cross-attention sees no positions but these
    "column": GRID,
}


def labelled_scene(
    rng: random.Random, size: int | None = None
) -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """A scene with (sometimes) a box or ellipse and an arrow drawn on it, and what each grid cell holds:
    its shape and colour (the last class: none), whether a prompt surrounds it, holds an arrow's head or its
    tail, and its row and column. One 32-px patch is one cell. size: drawn at this size (default: one of
    RENDER_SIZES)."""
    size = size or rng.choice(RENDER_SIZES)
    shapes = random_scene(rng, size, rng.randint(1, 6))
    labels = {k: torch.zeros(GRID * GRID, dtype=torch.long) for k in PATCH_LABELS}
    labels["row"] = torch.arange(GRID * GRID) // GRID
    labels["column"] = torch.arange(GRID * GRID) % GRID
    labels["shape"].fill_(len(SHAPES))
    labels["color"].fill_(len(COLORS))
    colors = list(COLORS)
    for sh in shapes:
        r, c = cell_of(sh, size)
        labels["shape"][r * GRID + c] = SHAPES.index(sh.kind)
        labels["color"][r * GRID + c] = colors.index(sh.color)
    specs = []
    if rng.random() < 0.5:
        target = rng.choice(shapes)
        prompt, pad = rng.choice((("rectangle", 0.03), ("ellipse", 0.05)))
        x0, y0, x1, y1 = target.box
        box = [
            max(0, x0 - pad * size),
            max(0, y0 - pad * size),
            min(size, x1 + pad * size),
            min(size, y1 + pad * size),
        ]
        specs.append({"type": prompt, "box": box, "color": rng.choice(PROMPT_COLORS)})
        r, c = cell_of(target, size)
        labels["boxed"][r * GRID + c] = 1
    if rng.random() < 0.5:
        target = rng.choice(shapes)
        points = arrow_to(rng, target, shapes, size)
        if points is not None:
            specs.append({"type": "arrow", "points": points, "color": rng.choice(ARROW_COLORS)})
            r, c = cell_of(target, size)
            labels["arrow_head"][r * GRID + c] = 1
            tail = int(points[0][1] // (size / GRID)) * GRID + int(points[0][0] // (size / GRID))
            labels["arrow_tail"][tail] = 1
    image = render(shapes, size)
    return (draw_visual_prompts(image, specs) if specs else image), labels


def tower_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the text model reads of each patch (B, P, C): ViP-LLaVA's projected image features (its tapped
    layers through the projector), IDEFICS's last tower layer (what its cross-attention reads)."""
    if hasattr(model, "vision_tower"):
        return model.get_image_features(pixel_values)
    return model.model.vision_model(pixel_values, layers=(-1,))[0][:, 1:]


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless stage-1 batches: (pixel values, per-patch labels stacked), each worker drawing with its own
    seeded generator (so worker processes draw the pictures while the main one trains)."""

    def __init__(self, scenes: Callable, preprocess: Callable, batch_size: int, seed: int) -> None:
        self.scenes, self.preprocess, self.batch_size, self.seed = scenes, preprocess, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed + 1 + 1000 * (info.id if info else 0))
        while True:
            images, truth = zip(*(self.scenes(rng) for _ in range(self.batch_size)), strict=True)
            yield self.preprocess(list(images)), {k: torch.stack([t[k] for t in truth]) for k in truth[0]}


def class_weights(batches, labels: dict[str, int], n: int = 8, cap: float = 30.0) -> dict[str, torch.Tensor]:
    """Per label, loss weights for its classes from their frequencies in n batches: inverse frequency, so a
    rare class (the few patches a mark or arrow points at) counts as much as the common one, capped at
    `cap` times the most common class's weight and scaled to keep the average weight 1."""
    counts = {k: torch.zeros(c) for k, c in labels.items()}
    for _, truth in (next(batches) for _ in range(n)):
        for k in labels:
            counts[k] += torch.bincount(truth[k].flatten(), minlength=labels[k]).float()
    weights = {}
    for k, count in counts.items():
        freq = count / count.sum()
        w = torch.where(freq > 0, 1 / freq.clamp_min(1e-12), torch.zeros_like(freq))
        w = torch.minimum(w, w[freq > 0].min() * cap)
        weights[k] = w / (freq * w).sum()
    return weights


def balanced_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the classes present of the share of their patches predicted right (plain accuracy would
    call "no mark anywhere" 98% right)."""
    guess = logits.argmax(-1).flatten()
    target = target.flatten()
    recalls = [(guess[target == c] == c).float().mean() for c in target.unique()]
    return float(torch.stack(recalls).mean())


def pretrain_tower(
    model: torch.nn.Module,
    processor,
    *,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    sizes: tuple[int, ...] = RENDER_SIZES,
    scenes: Callable[[random.Random], tuple[Image.Image, dict[str, torch.Tensor]]] | None = None,
    labels: dict[str, int] = PATCH_LABELS,
    device: str | torch.device = "cpu",
    workers: int = 0,
    log_every: int = 0,
) -> dict[str, float]:
    """Stage 1, as real VLMs start from a pretrained CLIP (and LLaVA from an aligned projector): teach the
    vision tower (and ViP-LLaVA's projector) the shapes world by predicting, for each patch, what its cell
    holds (`labels`) through throw-away linear heads, each label's classes weighted by `class_weights`.
    Returns each label's balanced accuracy (`balanced_accuracy`), averaged over the last 20 steps.
    scenes(rng) -> (picture, per-patch labels with the classes in `labels`): another world's labelled scenes
    (default: the grid world's, drawn at one of `sizes`). workers: processes drawing the pictures (0: this
    one). The model is trained on `device` and left there."""
    torch.manual_seed(seed)
    scenes = scenes or partial(_grid_scene, sizes=sizes)
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_model
    image_processor = processor.image_processor
    model.to(device)
    probe = image_processor.preprocess([Image.new("RGB", (8, 8))]).to(device)
    dim = tower_features(model, probe).shape[-1]
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, n) for k, n in labels.items()}).to(device)
    projector = getattr(model, "multi_modal_projector", torch.nn.Identity())
    optimizer = torch.optim.AdamW(
        [*tower.parameters(), *projector.parameters(), *heads.parameters()], lr=lr, weight_decay=0.01
    )
    loader = torch.utils.data.DataLoader(
        SceneBatches(scenes, image_processor.preprocess, batch_size, seed),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    batches = iter(loader)
    weights = {k: w.to(device) for k, w in class_weights(batches, labels).items()}
    recent: dict[str, list[float]] = defaultdict(list)
    for step in range(steps):
        pixel_values, truth = next(batches)
        features = tower_features(model, pixel_values.to(device, non_blocking=True))  # (B, patches, C)
        loss = 0.0
        for name, head in heads.items():
            logits = head(features)
            target = truth[name].to(device)
            loss = loss + torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), weight=weights[name]
            )
            if step >= steps - 20 or (log_every and (step + 1) % log_every == 0):
                recent[name] = [*recent[name][-19:], balanced_accuracy(logits.detach(), target)]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if log_every and (step + 1) % log_every == 0:
            shown = {k: round(v[-1], 3) for k, v in recent.items()}
            print(
                f"stage 1 step {step + 1}: loss {float(loss.detach()):.3f} balanced accuracy {shown}",
                flush=True,
            )
    del batches
    return {k: sum(v[-20:]) / len(v[-20:]) for k, v in recent.items()}


def _grid_scene(rng: random.Random, sizes: tuple[int, ...]) -> tuple[Image.Image, dict[str, torch.Tensor]]:
    return labelled_scene(rng, rng.choice(sizes))


def accuracy(
    model_dir: Path | str, family: str, n: int = 200, seed: int = 12345, *, world: str = "grid", **load: Any
) -> dict[str, float]:
    """Greedy answers to n freshly generated questions per type, exact match, answered 16 at a time by the
    continuous-batching engine; `load` goes to VLM.load (quantize=...). world="freeform": the held-out set
    drawn by `vlmkit.demo.heldout`, not by the training generator."""
    from vlmkit.eval.batching import Job, engine_answers
    from vlmkit.serve.engine import SamplingParams
    from vlmkit.vlm import VLM, user_turn

    vlm = VLM.load(model_dir, **load)
    if world == "freeform":
        questions: Any = heldout.examples(family, n, seed)
    else:
        rng = random.Random(seed)
        questions = (make_example(rng, kind, IMAGE_SIZE) for kind in QUESTION_TYPES[family] for _ in range(n))
    jobs = (
        Job(
            key=(ex.kind, ex.answer),
            inputs=partial(vlm.chat_inputs, [user_turn(ex.question, ex.images)]),
            params=SamplingParams(max_tokens=24),
        )
        for ex in questions
    )
    right: Counter = Counter()
    seen: defaultdict = defaultdict(int)
    for a in engine_answers(vlm, jobs, batch_size=16):
        kind, expected = a.key
        right[kind] += a.text.strip() == expected
        seen[kind] += 1
    return {k: right[k] / seen[k] for k in seen}


def dataset(
    world: str,
    folder: Path,
    rows: int,
    *,
    family: str,
    seed: int,
    sizes: tuple[int, ...] = RENDER_SIZES,
    kinds: tuple[str, ...] | None = None,
    workers: int = 0,
) -> Path:
    """A training set of the world (sizes: the grid world's picture sizes; the free-form world picks its
    own), drawn by `workers` processes."""
    started = time.perf_counter()
    if world == "freeform":
        path = freeform.write_dataset(folder, rows, family=family, seed=seed, kinds=kinds, workers=workers)
    else:
        path = write_dataset(
            folder, rows, family=family, seed=seed, sizes=sizes, kinds=kinds, workers=workers
        )
    print(f"{rows} rows drawn into {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def start_model(
    base: Path,
    family: str,
    world: str,
    *,
    tower_steps: int,
    seed: int,
    sizes: tuple[int, ...],
    device: str = "cpu",
    workers: int = 0,
) -> None:
    """The untrained model of the world in base/: tokenizer, configs, processor files, and (stage 1) weights
    with a vision tower that has learned what each patch holds."""
    from vlmkit.models import init_model, load_processor
    from vlmkit.weights import read_config_file

    base.mkdir(parents=True, exist_ok=True)
    if (base / "model.safetensors").is_file():
        return  # stage 1 is done: its tokenizer and configs are there with it
    stage1: dict[str, Any] = {}
    if world == "freeform":
        size, patch = FREEFORM_IMAGE_SIZE, FREEFORM_PATCH
        ids = build_tokenizer(base, family, freeform.corpus())
        write_configs(base, family, ids, image_size=size, patch=patch, pad=True)
        fit = "pad" if family == "vipllava" else "squash"  # how each family's processor makes pictures square
        stage1 = {
            "scenes": partial(freeform.labelled_scene, size=size, patch=patch, fit=fit),
            "labels": freeform.patch_labels(size // patch),
        }
    else:
        write_configs(base, family, build_tokenizer(base, family))
    model = init_model(read_config_file(base / "config.json"), seed=seed)
    started = time.perf_counter()
    tower_accuracy = pretrain_tower(
        model,
        load_processor(base),
        steps=tower_steps,
        seed=seed,
        sizes=sizes,
        device=device,
        workers=workers,
        log_every=max(1, tower_steps // 10),
        **stage1,
    )
    print(
        f"stage 1 ({time.perf_counter() - started:.0f} s): vision tower per-patch balanced accuracy "
        f"{json.dumps({k: round(v, 4) for k, v in tower_accuracy.items()})}",
        flush=True,
    )
    model.to("cpu").save_pretrained(base)


def build(
    out: Path,
    family: str,
    *,
    rows: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    vision_lr: float = 1e-4,
    tower_steps: int = 500,
    seed: int = 0,
    eval_rows: int = 200,
    install_as_builtin: bool = False,
    render_sizes: tuple[int, ...] = RENDER_SIZES,
    polish_steps: int = 2000,
    world: str = "grid",
    device: str = "cpu",
    workers: int = 0,
) -> dict[str, float]:
    """Train a demo model into out/run/final, polished into out/run-polish/final (and install it as the built-in one); returns the held-out
    accuracy per question type (eval_rows each) of what was installed, else of out/run/final.

    Two stages, as LLaVA and IDEFICS were built on a pretrained CLIP: (1) `pretrain_tower` teaches the
    randomly initialised vision tower what each patch holds; (2) `finetune` trains the rest from that
    checkpoint on the questions, the tower at a tenth of the text model's rate. (Trained from random init at
    the text model's rate, the tower collapses to image-independent features before the text model learns
    to read them; frozen after stage 1, its shape features are too faint for the text model to pick up.)
    world: "grid" or "freeform" (WORLDS). device: where stage 1 trains (stages 2 and 3 train where
    `finetune` does: CUDA when there is one); workers: processes drawing pictures."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    out = Path(out)
    base = out / "base"
    start_model(
        base,
        family,
        world,
        tower_steps=tower_steps,
        seed=seed,
        sizes=render_sizes,
        device=device,
        workers=workers,
    )
    data = dataset(world, out / "data", rows, family=family, seed=seed, sizes=render_sizes, workers=workers)
    torch.manual_seed(seed)
    train_stage(
        data, base, out / "run", steps=steps, batch_size=batch_size, lr=lr, vision_lr=vision_lr, seed=seed
    )
    final = polish(
        out,
        family,
        steps=polish_steps,
        seed=seed,
        render_sizes=render_sizes,
        batch_size=batch_size,
        world=world,
        workers=workers,
    )
    if install_as_builtin:
        final = install(final, family)
        print(f"installed in {final}", flush=True)
    return accuracy(final, family, n=eval_rows, world=world)


def polish(
    out: Path,
    family: str,
    *,
    steps: int,
    seed: int = 0,
    rows: int = 12000,
    render_sizes: tuple[int, ...] = RENDER_SIZES,
    batch_size: int = 16,
    world: str = "grid",
    workers: int = 0,
) -> Path:
    """Stage 3: `steps` more at a third of the rate from out/run/final on fresh questions weighted toward
    the types a small model learns last (POLISH_MIX); returns the final folder (out/run/final when steps
    is 0)."""
    if steps <= 0:
        return out / "run" / "final"
    data = dataset(
        world,
        out / "data-polish",
        rows,
        family=family,
        seed=seed + 1,
        sizes=render_sizes,
        kinds=POLISH_MIX[family],
        workers=workers,
    )
    train_stage(
        data,
        out / "run" / "final",
        out / "run-polish",
        steps=steps,
        batch_size=batch_size,
        lr=3e-4,
        vision_lr=3e-5,
        seed=seed + 1,
        warmup_steps=100,
    )
    return out / "run-polish" / "final"


def train_stage(
    data: Path,
    model: Path,
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    vision_lr: float,
    seed: int,
    warmup_steps: int | None = None,
) -> None:
    """One `finetune` run of every parameter from `model` (resumable): what stages 2 and 3 share."""
    from vlmkit.train.finetune import FinetuneConfig, finetune

    finetune(
        FinetuneConfig(
            data=str(data),
            output_dir=str(output_dir),
            model=str(model),
            train="full",
            max_steps=steps,
            batch_size=batch_size,
            lr=lr,
            vision_lr=vision_lr,
            warmup_steps=min(200, steps // 10) if warmup_steps is None else warmup_steps,
            min_lr_ratio=0.05,
            weight_decay=0.01,
            max_length=256,
            seed=seed,
            save_every=500,
            resume=True,
        )
    )


def install(final: Path, family: str) -> Path:
    """Put a trained model into the package as a built-in demo model: weights stored in float16 (half the
    size; config.json says float32, so it loads and runs in float32) and its processor files."""
    from vlmkit.models import BUILTIN_DIR, load_model
    from vlmkit.train.checkpoints import copy_processor_files

    target = BUILTIN_DIR / family
    if target.exists():
        shutil.rmtree(target)
    load_model(final).save_pretrained(target, storage_dtype=torch.float16)
    copy_processor_files(final, target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-lr", type=float, default=1e-4, help="stage 2's rate for the tower (0: frozen)")
    ap.add_argument("--tower-steps", type=int, default=500, help="stage 1: vision-tower pretraining steps")
    ap.add_argument("--eval-rows", type=int, default=200, help="held-out questions per type")
    ap.add_argument("--polish-steps", type=int, default=2000, help="stage 3 steps (0: none)")
    ap.add_argument(
        "--render-sizes",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=RENDER_SIZES,
        help="comma-separated sizes the training pictures are drawn at",
    )
    ap.add_argument(
        "--install", action="store_true", help="copy the result into the package's built-in models"
    )
    ap.add_argument(
        "--world",
        choices=WORLDS,
        default="grid",
        help="grid: shapes in 3 x 3 cells; freeform: shapes anywhere, scored on the separately drawn held-out set",
    )
    ap.add_argument("--device", default="cpu", help="where stage 1 trains (finetune picks CUDA when present)")
    ap.add_argument("--workers", type=int, default=0, help="processes drawing the training pictures")
    args = ap.parse_args()
    scores = build(
        args.out,
        args.family,
        rows=args.rows,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_lr=args.vision_lr,
        tower_steps=args.tower_steps,
        eval_rows=args.eval_rows,
        install_as_builtin=args.install,
        render_sizes=args.render_sizes,
        polish_steps=args.polish_steps,
        world=args.world,
        device=args.device,
        workers=args.workers,
    )
    print(json.dumps({"family": args.family, "held_out_accuracy": scores}))


if __name__ == "__main__":
    main()
