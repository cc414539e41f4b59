"""The demo-model pipeline end to end on a few rows: tokenizer, configs, processor files, training, eval."""

from __future__ import annotations

import pytest

import vlmkit
from vlmkit.demo import build


@pytest.mark.parametrize("family", ["vipllava", "idefics"])
def test_pipeline_runs_and_loads(family, tmp_path):
    scores = build.build(
        tmp_path / family, family, rows=24, steps=2, batch_size=4, eval_rows=2, tower_steps=2, polish_steps=2
    )
    assert set(scores) == set(build.QUESTION_TYPES[family]) and all(0 <= v <= 1 for v in scores.values())
    final = tmp_path / family / "run" / "final"
    model = vlmkit.load_model(final)
    assert model.config.to_hf()["model_type"] == family
    proc = vlmkit.load_processor(final)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") is not None


def test_labelled_scenes_say_what_each_cell_holds():
    import random

    import numpy as np

    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        image, labels = build.labelled_scene(rng, 96)
        assert image.size == (96, 96) and all(v.shape == (9,) for v in labels.values())
        pixels = np.asarray(image)
        for cell in range(9):
            shape, color = int(labels["shape"][cell]), int(labels["color"][cell])
            assert (shape == len(build.SHAPES)) == (color == len(build.COLORS))  # empty cells have neither
            if shape < len(build.SHAPES) and not labels["arrow_head"][cell] and not labels["boxed"][cell]:
                r, c = divmod(cell, 3)  # an unprompted shape's centre pixel is its colour
                assert tuple(pixels[r * 32 + 16, c * 32 + 16]) == list(build.COLORS.values())[color]
        assert int(labels["boxed"].sum()) <= 1 and int(labels["arrow_head"].sum()) == int(
            labels["arrow_tail"].sum()
        )
        seen.update(k for k in ("boxed", "arrow_head") if labels[k].any())
    assert seen == {"boxed", "arrow_head"}


def test_tower_pretraining_learns_the_cells():
    import json
    import random

    from vlmkit.models import init_model, load_processor

    folder = build.Path(__import__("tempfile").mkdtemp())
    build.write_configs(folder, "vipllava", build.build_tokenizer(folder, "vipllava"))
    model = init_model(json.loads((folder / "config.json").read_text()))
    random.seed(0)
    scores = build.pretrain_tower(model, load_processor(folder), steps=150, batch_size=16)
    assert scores["shape"] > 0.8  # guessing "empty" everywhere scores about 0.6


def test_rows_drawn_by_worker_processes_equal_rows_drawn_by_one(tmp_path):
    from vlmkit.demo import freeform

    one = freeform.write_dataset(tmp_path / "one", 300, seed=3)
    two = freeform.write_dataset(tmp_path / "two", 300, seed=3, workers=2)
    assert one.read_text() == two.read_text()
    names = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) and len(names) == 300
    for name in names[::37]:
        assert (tmp_path / "one" / "images" / name).read_bytes() == (
            tmp_path / "two" / "images" / name
        ).read_bytes()


def test_rare_classes_weigh_as_much_as_common_ones():
    import torch

    # a label whose class 1 is 1 patch in 20: its weight is 19 times class 0's, and the average weight is 1
    truth = torch.zeros(4, 20, dtype=torch.long)
    truth[:, 0] = 1
    batches = iter([(None, {"marked": truth})] * 8)
    w = build.class_weights(batches, {"marked": 2})["marked"]
    assert torch.allclose(w[1] / w[0], torch.tensor(19.0)) and torch.isclose(
        (w * torch.tensor([0.95, 0.05])).sum(), torch.tensor(1.0)
    )
    # capped, and a class that never occurs weighs nothing
    truth[:, 1:] = 0
    w = build.class_weights(
        iter([(None, {"m": torch.zeros(1, 1000, dtype=torch.long).index_fill(1, torch.tensor([0]), 1)})] * 8),
        {"m": 3},
        cap=30.0,
    )["m"]
    assert w[2] == 0 and torch.isclose(w[1] / w[0], torch.tensor(30.0))


def test_balanced_accuracy_is_not_fooled_by_the_common_class():
    import torch

    target = torch.tensor([0] * 98 + [1, 1])
    always_zero = torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 2).float()
    assert build.balanced_accuracy(always_zero, target) == 0.5  # plain accuracy: 0.98
    assert build.balanced_accuracy(torch.nn.functional.one_hot(target, 2).float(), target) == 1.0
