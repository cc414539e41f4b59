"""The synthetic shapes world: answers follow from the scene, prompts are drawn, datasets load."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from test_processors import idefics_folders, llava_folders

import vlmkit
from vlmkit.demo.shapes import (
    COLORS,
    EXAMPLES,
    NUMBERS,
    SHAPES,
    Shape,
    cell_of,
    describe,
    draw_handmade,
    handmade,
    make_example,
    random_scene,
    render,
    write_dataset,
)
from vlmkit.train.data import load_conversations


def test_scenes_do_not_overlap_and_render_their_colours():
    rng = random.Random(0)
    for _ in range(50):
        shapes = random_scene(rng, 96, 4)
        for i, a in enumerate(shapes):
            for b in shapes[i + 1 :]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.r + b.r
        image = render(shapes, 96)
        for s in shapes:
            assert image.getpixel((round(s.cx), round(s.cy))) == COLORS[s.color]


def test_answers_are_right_by_construction():
    rng = random.Random(1)
    kinds = Counter()
    for _ in range(200):
        kind = rng.choice(["box_shape", "arrow_color", "count", "caption", "which_image"])
        ex = make_example(rng, kind)
        kinds[ex.kind] += 1
        if kind == "box_shape":
            assert ex.answer in SHAPES and ("rectangle" in ex.question or "ellipse" in ex.question)
        elif kind == "arrow_color":
            assert ex.answer in COLORS
        elif kind == "count":
            assert ex.answer in NUMBERS
        elif kind == "which_image":
            assert len(ex.images) == 2 and ex.answer in ("the first", "the second")
        else:
            assert ex.answer.startswith(("a ", "an "))
    assert len(kinds) == 5


def test_box_prompt_surrounds_the_answer():
    rng = random.Random(2)
    ex = make_example(rng, "box_shape")
    drawn = np.asarray(ex.images[0]).astype(int)
    # the prompt colour is a pure ViP-LLaVA colour that no shape uses
    pure = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
    assert any(((drawn == np.array(c)).all(-1)).sum() > 20 for c in pure)


def test_deterministic_per_seed(tmp_path):
    a = write_dataset(tmp_path / "a", 12, seed=3)
    b = write_dataset(tmp_path / "b", 12, seed=3)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "images").is_dir()
    with pytest.raises(ValueError, match="family"):
        write_dataset(tmp_path / "c", 1, family="gpt")


@pytest.mark.parametrize("family", ["vipllava", "idefics"])
def test_datasets_load_for_training(family, tmp_path):
    path = write_dataset(tmp_path / "data", 8, family=family, seed=0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    if family == "idefics":
        assert any(isinstance(r["image"], list) and len(r["image"]) == 2 for r in rows)
        _, folder, _ = idefics_folders(tmp_path / "proc")
    else:
        _, folder, _ = llava_folders(tmp_path / "proc")
    samples, report = load_conversations(path, vlmkit.load_processor(folder), max_length=4096)
    assert report.kept == 8, report.summary()
    assert all((s.labels != -100).any() for s in samples)


def test_one_shape_per_cell():
    rng = random.Random(4)
    for _ in range(50):
        shapes = random_scene(rng, 96, rng.randint(1, 9))
        cells = [cell_of(s, 96) for s in shapes]
        assert len(set(cells)) == len(cells)
        for s in shapes:  # the whole shape stays in its cell: one 32-px patch each
            row, col = cell_of(s, 96)
            assert col * 32 <= s.cx - s.r and s.cx + s.r <= (col + 1) * 32
            assert row * 32 <= s.cy - s.r and s.cy + s.r <= (row + 1) * 32
    two = [Shape("star", "orange", 80, 16, 9), Shape("circle", "red", 16, 80, 9)]
    assert describe(two) == "an orange star and a red circle"  # reading order: row by row
    with pytest.raises(ValueError, match="1 to 9"):
        random_scene(rng, 96, 10)


def test_handmade_scenes_match_their_spec():
    data = handmade()
    for name, spec in data["scenes"].items():
        drawn = np.asarray(draw_handmade(spec, data["size"]))
        assert np.array_equal(drawn, np.asarray(Image.open(EXAMPLES / f"{name}.png").convert("RGB")))
        for color, _kind, row, col in spec:
            centre = drawn[int((row + 0.5) * 96), int((col + 0.5) * 96)]
            assert tuple(centre) == COLORS[color]
    assert {q["family"] for q in data["questions"]} == {"vipllava", "idefics"}
