"""The free-form shapes world (vlmkit.demo.freeform) and its separately drawn held-out set
(vlmkit.demo.heldout): scenes in range, answers that follow from the scene, prompts on the right shape, and
two generators that share no drawing code."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmkit
from vlmkit.demo import freeform, heldout, shapes
from vlmkit.demo.model_files import FREEFORM_IMAGE_SIZE, FREEFORM_PATCH, build_tokenizer, write_configs
from vlmkit.train.data import load_conversations
from vlmkit.visual_prompts import COLORS as PALETTE

TYPES = ("box_shape", "arrow_color", "count", "caption", "which_image")


def in_range(width: int, height: int) -> bool:
    return 96 <= width <= 512 and 96 <= height <= 512 and max(width, height) / min(width, height) <= 2.0


def read_in_order(spans: list[tuple[float, float, float]]) -> bool:
    """Whether (top, bottom, x) spans are named in reading order: each later one either shares the line
    (heights overlapping by half the shorter's) and stands to the right, or sits on a lower line."""
    for i, (t0, b0, x0) in enumerate(spans):
        for t1, b1, x1 in spans[i + 1 :]:
            overlap, shorter = min(b0, b1) - max(t0, t1), min(b0 - t0, b1 - t1)
            if overlap >= shorter / 2:
                if x1 <= x0:
                    return False
            elif overlap > shorter / 10 or t1 <= t0:
                return False
    return True


def named(answer: str) -> list[tuple[str, str]]:
    """(colour, kind) of each shape a caption names, in order."""
    parts = answer.replace(" and ", ", ").split(", ")
    return [tuple(p.split(" ", 1)[1].split(" ")) for p in parts]  # type: ignore[misc]


# -- the training generator ---------------------------------------------------------------------------


def test_scenes_are_in_range_and_never_overlap():
    rng = random.Random(0)
    seen_sizes = set()
    for _ in range(60):
        n = rng.randint(1, 6)
        scene = freeform.random_scene(rng, n)
        assert len(scene.shapes) == n and in_range(scene.width, scene.height)
        seen_sizes.add(scene.width == scene.height)
        short, long = min(scene.width, scene.height), max(scene.width, scene.height)
        for i, s in enumerate(scene.shapes):
            assert max(10, 0.08 * long) - 1e-6 <= 2 * s.r <= max(10, 0.35 * short) + 1e-6
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 and x1 <= scene.width and 0 <= y0 and y1 <= scene.height
            for t in scene.shapes[i + 1 :]:
                assert freeform.gap(s, t) >= 2.0
        image = freeform.render(scene)
        assert image.size == (scene.width, scene.height)
        for s in scene.shapes:  # each shape's centre is painted in its own shade
            x, y = s.centre
            assert np.abs(np.subtract(image.getpixel((int(x), int(y))), s.rgb)).max() <= 2
    assert seen_sizes == {True, False}  # square pictures and others
    with pytest.raises(ValueError, match="1 to 6"):
        freeform.random_scene(rng, 7)


def test_gap_and_reading_order_on_known_shapes():
    a = freeform.FreeShape("circle", "red", (220, 30, 30), 50, 50, 10)
    b = freeform.FreeShape("circle", "blue", (40, 70, 220), 75, 50, 10)
    assert freeform.gap(a, b) == pytest.approx(5, abs=0.1)
    assert freeform.gap(a, freeform.FreeShape("square", "blue", (0, 0, 0), 60, 50, 10)) == 0.0
    below = freeform.FreeShape("star", "green", (0, 0, 0), 30, 90, 10)
    assert freeform.describe([below, b, a]) == "a red circle, a blue circle and a green star"
    half_below = freeform.FreeShape("circle", "green", (0, 0, 0), 100, 63, 10)  # overlaps a by a third
    assert freeform.reading_order([a, half_below]) is None


def check_freeform_answer(ex: freeform.FreeExample) -> None:
    scene = ex.scenes[0]
    if ex.kind == "box_shape":
        target, spec = ex.target, ex.prompt
        assert target in scene.shapes and ex.answer == target.kind
        assert ex.question == freeform.MARK_QUESTIONS[spec["type"]].format(spec["color"])
        assert spec["color"] in PALETTE and "width" not in spec  # the default width
        others = [s for s in scene.shapes if s is not target]
        if spec["type"] in ("rectangle", "ellipse"):
            box = spec["box"]
            grown = np.asarray(box) + [-0.1, -0.1, 0.1, 0.1]
            assert freeform.in_region(spec["type"], tuple(grown), target.outline()).all()
            assert not any(freeform.in_region(spec["type"], box, np.asarray([s.centre]))[0] for s in others)
            assert all(freeform.share_inside(s, spec["type"], box) < 0.15 for s in others)
            if spec["type"] == "rectangle":  # no side further than 35% of the shape's extent from it
                x0, y0, x1, y1 = target.box
                extent = max(x1 - x0, y1 - y0)
                assert max(x0 - box[0], y0 - box[1], box[2] - x1, box[3] - y1) <= 0.35 * extent + 0.1
        else:
            points = np.asarray(spec["points"] if spec["type"] == "scribble" else [spec["point"]])
            assert freeform.inside(target.outline(), points).all()
            assert spec["color"] not in freeform.CLASHES[target.color]
    elif ex.kind == "arrow_color":
        target, (tail, head) = ex.target, ex.prompt["points"]
        assert ex.answer == target.color and ex.question == freeform.ARROW_QUESTION
        assert (
            0 <= min(tail + head)
            and max(tail[0], head[0]) <= scene.width
            and max(tail[1], head[1]) <= scene.height
        )
        near = freeform.distance_to(target, head)
        assert near <= 0.25 * target.r + 0.1
        assert all(freeform.distance_to(s, head) > 2 * near for s in scene.shapes if s is not target)
        assert ex.prompt["color"] not in freeform.CLASHES[target.color]
    elif ex.kind == "count":
        asked = ex.question.split()[2][:-1]
        assert ex.answer == shapes.NUMBERS[sum(s.kind == asked for s in scene.shapes)]
    elif ex.kind == "caption":
        assert sorted(named(ex.answer)) == sorted((s.color, s.kind) for s in scene.shapes)
        order = freeform.reading_order(scene.shapes)
        assert [(s.color, s.kind) for s in order] == named(ex.answer)
        assert read_in_order([(s.box[1], s.box[3], s.centre[0]) for s in order])
    else:
        asked = ex.question.split()[4][:-1]
        has = [any(s.kind == asked for s in sc.shapes) for sc in ex.scenes]
        assert has in ([True, False], [False, True])
        assert ex.answer == ("the first" if has[0] else "the second")


def test_every_question_type_with_answers_that_follow_from_the_scene():
    rng = random.Random(1)
    prompts, counts = set(), set()
    for kind in TYPES:
        for _ in range(40 if kind == "count" else 12):
            ex = freeform.plan_example(rng, kind)
            assert ex.kind == kind and all(in_range(s.width, s.height) for s in ex.scenes)
            check_freeform_answer(ex)
            if ex.prompt:
                prompts.add(ex.prompt["type"])
            if kind == "count":
                counts.add(ex.answer)
    assert prompts == {"rectangle", "ellipse", "scribble", "point", "arrow"}
    assert counts == set(shapes.NUMBERS)  # zero to four
    with pytest.raises(ValueError, match="unknown question type"):
        freeform.make_example(rng, "riddle")


def test_prompts_are_drawn_by_visual_prompts_where_the_spec_says():
    rng = random.Random(2)
    for kind in ("box_shape", "arrow_color", "box_shape"):
        ex = freeform.make_example(rng, kind)
        scene, spec = ex.scenes[0], ex.prompt
        plain = np.asarray(freeform.render(scene)).astype(int)
        drawn = np.asarray(ex.images[0]).astype(int)
        changed = np.argwhere(np.abs(drawn - plain).sum(-1) > 0)
        assert len(changed), spec
        if "box" in spec:
            x0, y0, x1, y1 = spec["box"]
        else:
            points = np.asarray(spec.get("points") or [spec["point"]])
            (x0, y0), (x1, y1) = points.min(0), points.max(0)
        reach = 6 * freeform.stroke_width(scene)  # a stroke's width, a point's disc, an arrow's head
        assert changed[:, 1].min() >= x0 - reach and changed[:, 1].max() <= x1 + reach
        assert changed[:, 0].min() >= y0 - reach and changed[:, 0].max() <= y1 + reach
        colour = np.asarray(PALETTE[spec["color"]])
        assert (np.abs(drawn - colour).sum(-1) == 0).sum() > 3  # strokes in the palette colour itself


@pytest.mark.parametrize("fit", ["pad", "squash"])
def test_labelled_scenes_say_what_each_patch_holds(fit):
    rng = random.Random(3)
    grid = FREEFORM_IMAGE_SIZE // FREEFORM_PATCH
    seen = set()
    for _ in range(30):
        image, labels = freeform.labelled_scene(rng, FREEFORM_IMAGE_SIZE, FREEFORM_PATCH, fit)
        assert in_range(*image.size)
        assert set(labels) == set(freeform.patch_labels(grid)) and all(
            v.shape == (grid * grid,) for v in labels.values()
        )
        held = labels["shape"] < len(shapes.SHAPES)
        assert bool(
            (held == (labels["color"] < len(shapes.COLORS))).all()
        )  # a shape and its colour, or neither
        assert 1 <= int(labels["centre"].sum()) <= 6 and bool(held[labels["centre"] == 1].all())
        for k in ("marked", "arrow_head"):  # the marked shape's patches
            assert bool(held[labels[k] == 1].all())
        assert int(labels["arrow_tail"].sum()) == int(labels["arrow_head"].any())
        seen.update(k for k in ("marked", "arrow_head") if labels[k].any())
    assert seen == {"marked", "arrow_head"}
    # a wide picture's middle lands in the input's middle; padding (pad) shifts only the short side
    sx, sy, dx, dy = freeform.to_input(320, 160, 160, fit)
    assert (160 * sx + dx, 80 * sy + dy) == (80, 80)
    assert (0 * sy + dy) == (40 if fit == "pad" else 0)


@pytest.mark.parametrize("family", ["vipllava", "idefics"])
def test_datasets_load_for_training_at_the_freeform_input(family, tmp_path):
    path = freeform.write_dataset(tmp_path / "data", 6, family=family, seed=0)
    again = freeform.write_dataset(tmp_path / "again", 6, family=family, seed=0)
    assert path.read_text() == again.read_text()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["type"] for r in rows] == [
        shapes.QUESTION_TYPES[family][i % len(shapes.QUESTION_TYPES[family])] for i in range(6)
    ]
    folder = tmp_path / "model"
    folder.mkdir()
    ids = build_tokenizer(folder, family, freeform.corpus())
    write_configs(folder, family, ids, image_size=FREEFORM_IMAGE_SIZE, patch=FREEFORM_PATCH, pad=True)
    samples, report = load_conversations(path, vlmkit.load_processor(folder), max_length=256)
    assert report.kept == 6, report.summary()
    assert samples[0].pixel_values.shape[-2:] == (FREEFORM_IMAGE_SIZE, FREEFORM_IMAGE_SIZE)
    if family == "vipllava":  # LLaVA pads to a square instead of cropping
        assert json.loads((folder / "processor_config.json").read_text())["image_processor"]["do_pad"] is True
        assert json.loads((folder / "config.json").read_text())["image_seq_length"] == 100


# -- the held-out generator ---------------------------------------------------------------------------


def centre_of(item: heldout.Item, c: heldout.Canvas) -> tuple[float, float]:
    xs, ys = heldout.pixels_of(item, c.width, c.height)
    return float(xs.mean()), float(ys.mean())


def across(item: heldout.Item) -> float:
    """The longest distance between two points of the shape."""
    if item.kind == "circle":
        return 2 * item.radius
    return float(np.linalg.norm(item.corners[:, None] - item.corners[None], axis=-1).max())


def check_heldout_answer(ex: heldout.HeldOutExample) -> None:
    c = ex.canvases[0]
    if ex.kind in ("box_shape", "arrow_color"):
        (mark,), target = ex.marks, ex.target
        others = [i for i in c.items if i is not target]
        if ex.kind == "arrow_color":
            assert ex.answer == target.color and mark["type"] == "arrow"
            tip = np.asarray(mark["points"][1])
            near = target.distance(tip[:1], tip[1:])[0]
            assert all(o.distance(tip[:1], tip[1:])[0] > 2 * near for o in others)
            return
        assert ex.answer == target.kind
        if mark["type"] in ("rectangle", "ellipse"):
            x0, y0, x1, y1 = mark["box"]
            xs, ys = heldout.pixels_of(target, c.width, c.height)
            if mark["type"] == "rectangle":
                assert (
                    (xs >= x0 - 0.1).all()
                    and (xs <= x1 + 0.1).all()
                    and (ys >= y0 - 0.1).all()
                    and (ys <= y1 + 0.1).all()
                )
            for o in others:
                ox, oy = centre_of(o, c)
                assert not (x0 <= ox <= x1 and y0 <= oy <= y1) or mark["type"] == "ellipse"
                assert heldout.clear_of(mark["box"], mark["type"], o, c)
        else:
            points = np.asarray(mark["points"] if mark["type"] == "scribble" else [mark["point"]], float)
            assert target.contains(points[:, 0], points[:, 1]).all()
            assert mark["color"] in heldout.SHOWS_ON[target.color]
    elif ex.kind == "count":
        asked = ex.question.split()[2][:-1]
        assert ex.answer == heldout.NUMBERS[sum(i.kind == asked for i in c.items)]
    elif ex.kind == "caption":
        assert sorted(named(ex.answer)) == sorted((i.color, i.kind) for i in c.items)
        by_name: dict = {}
        for i in c.items:
            by_name.setdefault((i.color, i.kind), []).append(i)
        spans = (
            [by_name[n].pop(0) for n in named(ex.answer)]
            if len(set(named(ex.answer))) == len(c.items)
            else None
        )
        if spans is not None:
            assert read_in_order(
                [(i.bounds()[1], i.bounds()[3], (i.bounds()[0] + i.bounds()[2]) / 2) for i in spans]
            )
    else:
        asked = ex.question.split()[4][:-1]
        has = [any(i.kind == asked for i in cv.items) for cv in ex.canvases]
        assert has in ([True, False], [False, True]) and ex.answer == (
            "the first" if has[0] else "the second"
        )


def test_heldout_set_covers_every_type_with_answers_that_follow_from_the_scene():
    assert heldout.PER_TYPE == 200
    marks = set()
    for family in ("vipllava", "idefics"):
        examples = list(heldout.examples(family, per_type=8, seed=5))
        assert [e.kind for e in examples[: len(heldout.QUESTION_TYPES[family])]] == list(
            heldout.QUESTION_TYPES[family]
        )
        for ex in examples:
            for c, image in zip(ex.canvases, ex.images, strict=True):
                assert (
                    in_range(c.width, c.height)
                    and image.size == (c.width, c.height)
                    and 1 <= len(c.items) <= 6
                )
                short, long = min(c.width, c.height), max(c.width, c.height)
                for i, a in enumerate(c.items):
                    assert max(10, 0.08 * long) - 1e-6 <= across(a) <= max(10, 0.35 * short) + 1e-6
                    xs, ys = heldout.pixels_of(a, c.width, c.height)
                    for b in c.items[i + 1 :]:  # placed later: every pixel of a is over 2 px from it
                        assert b.distance(xs, ys).min() > 2.0
            check_heldout_answer(ex)
            marks.update(m["type"] for m in ex.marks)
    assert marks == {"rectangle", "ellipse", "scribble", "point", "arrow"}
    with pytest.raises(ValueError, match="family"):
        heldout.examples("gpt")


def test_heldout_draws_its_marks_itself(tmp_path):
    rng = random.Random(6)
    ex = heldout.make_example(rng, "box_shape")
    plain = np.asarray(heldout.picture(ex.canvases[0])).astype(int)
    drawn = np.asarray(ex.images[0]).astype(int)
    assert (np.abs(drawn - plain).sum(-1) > 30).sum() > 5
    path = heldout.write(tmp_path, "idefics", per_type=2, seed=1)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["count", "caption", "which_image"] * 2
    assert all(
        (tmp_path / (r["image"][0] if isinstance(r["image"], list) else r["image"])).is_file() for r in rows
    )


def test_the_two_generators_share_no_drawing_code():
    source = Path(heldout.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{a.name}" for a in node.names)
    allowed = {"__future__.annotations", "argparse", "colorsys", "json", "math", "random", "numpy"}
    allowed |= {
        "collections.abc.Iterator",
        "dataclasses.dataclass",
        "pathlib.Path",
        "typing.Any",
        "PIL.Image",
    }
    assert imported <= allowed, imported - allowed
    # and nothing drags them in at run time
    code = (
        "import random, sys; import vlmkit.demo.heldout as h; "
        "[h.make_example(random.Random(0), k) for k in ('box_shape', 'arrow_color', 'which_image')]; "
        "print(sorted(m for m in sys.modules if 'ImageDraw' in m or m.startswith(('vlmkit.visual_prompts', 'vlmkit.demo.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['vlmkit.demo.heldout']"


def test_both_generators_speak_the_same_questions():
    assert heldout.SHAPES == shapes.SHAPES and heldout.NUMBERS == shapes.NUMBERS
    assert set(heldout.HSV) == set(shapes.COLORS) and heldout.PALETTE == PALETTE
    assert heldout.QUESTION_TYPES == shapes.QUESTION_TYPES
    for prompt, text in freeform.MARK_QUESTIONS.items():
        assert heldout.QUESTIONS[prompt] == text
    assert heldout.QUESTIONS["arrow"] == freeform.ARROW_QUESTION
    for color, clash in freeform.CLASHES.items():
        assert set(heldout.SHOWS_ON[color]) == set(PALETTE) - clash


# -- the hand-made free-form set ------------------------------------------------------------------------


def test_handmade_freeform_scenes_match_their_spec_and_answers():
    data = heldout.handmade()
    canvases = {name: heldout.handmade_canvas(spec) for name, spec in data["scenes"].items()}
    for name, c in canvases.items():
        stored = np.asarray(Image.open(heldout.EXAMPLES / f"{name}.png").convert("RGB"))
        assert np.array_equal(np.asarray(heldout.picture(c)), stored), name
    for q in data["questions"]:
        c = canvases[q["images"][0]]
        words = q["question"].split()
        if words[:2] == ["How", "many"]:
            assert q["answer"] == heldout.NUMBERS[sum(i.kind == words[2][:-1] for i in c.items)], q
        elif q["question"] == "Describe the image.":
            assert heldout.caption(c.items) == q["answer"], q
        elif words[0] == "Which":
            has = [any(i.kind == words[4][:-1] for i in canvases[n].items) for n in q["images"]]
            assert has in ([True, False], [False, True]) and q["answer"] == (
                "the first" if has[0] else "the second"
            )
        else:
            (prompt,) = q["visual_prompts"]
            if prompt["type"] == "arrow":
                tip = np.asarray(prompt["points"][1], float)
                nearest = min(c.items, key=lambda i: i.distance(tip[:1], tip[1:])[0])
                assert nearest.color == q["answer"], q
                continue
            if prompt["type"] in ("rectangle", "ellipse"):
                x0, y0, x1, y1 = prompt["box"]
                marked = [
                    i for i in c.items if x0 <= centre_of(i, c)[0] <= x1 and y0 <= centre_of(i, c)[1] <= y1
                ]
            else:
                x, y = np.asarray(
                    prompt["points"] if prompt["type"] == "scribble" else [prompt["point"]], float
                ).T
                marked = [i for i in c.items if i.contains(x, y).all()]
            assert [i.kind for i in marked] == [q["answer"]], q
            assert prompt["color"] in words
    for family in ("vipllava", "idefics"):
        assert sum(q["family"] == family for q in data["questions"]) >= 12
    # the three failures are in it
    asked = {(q["images"][0], q["question"], q["answer"]) for q in data["questions"]}
    assert ("free1", "How many triangles are there?", "three") in asked
    assert ("free2", "What shape is inside the red rectangle?", "square") in asked
    assert ("free2", "What color is the shape the arrow points to?", "blue") in asked
