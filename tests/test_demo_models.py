"""The built-in demo models: they answer fresh questions from the shapes world and the hand-made held-out
set correctly, by name, through the Python API and the command line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import vlmkit
from vlmkit.cli import generate_command
from vlmkit.demo.build import IMAGE_SIZE
from vlmkit.demo.shapes import EXAMPLES, QUESTION_TYPES, handmade, make_example
from vlmkit.models import BUILTIN_DIR, builtin_model, resolve_model
from vlmkit.vlm import user_turn

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"vipllava": "demo", "idefics": "demo-idefics"}


@pytest.fixture(scope="module", params=["vipllava", "idefics"])
def demo(request):
    return request.param, vlmkit.VLM.load(NAMES[request.param])


def test_fresh_samples_are_answered(demo):
    """>= 90% exact answers on 200 questions generated now (a seed training never used)."""
    family, vlm = demo
    rng = random.Random(20261123)
    kinds = QUESTION_TYPES[family]
    right, wrong = 0, Counter()
    for i in range(200):
        ex = make_example(rng, kinds[i % len(kinds)], IMAGE_SIZE)
        answer = vlm.chat([user_turn(ex.question, ex.images)], max_new_tokens=24).strip()
        right += answer == ex.answer
        wrong[ex.kind] += answer != ex.answer
    assert right / 200 >= 0.9, f"{right}/200 right; wrong by type: {dict(wrong)}"


def test_accuracy_answers_in_batches_as_one_at_a_time(demo):
    """`build.accuracy` answers through the batching engine: its per-type scores equal those of asking
    each question alone with `chat`."""
    from vlmkit.demo.build import accuracy

    family, vlm = demo
    rng = random.Random(12345)  # accuracy's own seed: the same questions
    right, seen = Counter(), Counter()
    for kind in QUESTION_TYPES[family]:
        for _ in range(6):
            ex = make_example(rng, kind, IMAGE_SIZE)
            answer = vlm.chat([user_turn(ex.question, ex.images)], max_new_tokens=24).strip()
            right[kind] += answer == ex.answer
            seen[kind] += 1
    assert accuracy(builtin_model(NAMES[family]), family, n=6) == {k: right[k] / seen[k] for k in seen}


def test_handmade_held_out_set(demo):
    """Hand-placed scenes at 288 px, prompts in the picture's own coordinates, through the CLI function."""
    family, _ = demo
    questions = [q for q in handmade()["questions"] if q["family"] == family]
    assert len(questions) >= 6
    for q in questions:
        answer = generate_command(
            q["question"],
            NAMES[family],
            images=[str(EXAMPLES / f"{name}.png") for name in q["images"]],
            visual_prompts=[json.dumps(p) for p in q["visual_prompts"]],
            max_new_tokens=24,
        )
        assert answer.strip() == q["answer"], q


def test_builtin_names_and_a_missing_model(monkeypatch, tmp_path):
    assert resolve_model("demo") == resolve_model("demo-vipllava") == BUILTIN_DIR / "vipllava"
    assert resolve_model("demo-idefics") == BUILTIN_DIR / "idefics"
    size = sum(f.stat().st_size for d in ("vipllava", "idefics") for f in (BUILTIN_DIR / d).iterdir())
    assert size <= 20 * 2**20, f"built-in models take {size / 2**20:.1f} MiB (limit 20)"
    assert vlmkit.load_model("demo-idefics").config.to_hf()["model_type"] == "idefics"
    monkeypatch.setattr("vlmkit.models.BUILTIN_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="make demo-models"):
        builtin_model("demo")
    with pytest.raises(ValueError, match="built-in"):
        builtin_model("demo-gpt")


def test_the_command_line_defaults_to_the_vipllava_demo():
    scene = EXAMPLES / "scene1.png"
    assert Image.open(scene).size == (288, 288)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmkit.cli",
            "generate",
            "--image",
            str(scene),
            "--visual-prompt",
            '{"type": "rectangle", "box": [106, 106, 182, 182], "color": "red"}',
            "What shape is inside the red rectangle?",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout.strip() == "star"
