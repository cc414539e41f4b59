"""Shapes-world questions written in each benchmark's published layout, so that `vlmkit eval` can be run end
to end where the real data sets cannot be had, with models whose right answers are known (the built-in
demo models).

    python -m vlmkit.eval.shapes OUT --task vqav2 --family vipllava --n 200

`known_examples` draws the questions `make demo-models` scores the demo models on (`vlmkit.demo.build.
accuracy`: seed 12345, n per type, the types in turn), so the demo models' accuracy on them is the one the
README reports. Pictures keep the benchmark's file names (.jpg included) but are written as PNG, which
every reader opens by its content: a JPEG's loss would change the pictures the known accuracy is for.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.demo.build import IMAGE_SIZE
from vlmkit.demo.shapes import (
    COLORS,
    NUMBERS,
    QUESTION_TYPES,
    SHAPES,
    Example,
    count_scene,
    make_example,
    random_scene,
    render,
)

KNOWN_SEED = 12345  # vlmkit.demo.build.accuracy's


def known_examples(family: str, kind: str, n: int = 200, seed: int = KNOWN_SEED) -> list[Example]:
    """The n questions of type `kind` among those `accuracy(family, n=n)` asks (the earlier types drawn too,
    so that the generator is where it was)."""
    rng = random.Random(seed)
    if kind not in QUESTION_TYPES[family]:
        raise ValueError(f"{family} is scored on {QUESTION_TYPES[family]}, not {kind!r}")
    for k in QUESTION_TYPES[family]:
        drawn = [make_example(rng, k, IMAGE_SIZE) for _ in range(n)]
        if k == kind:
            return drawn
    raise AssertionError("unreachable")


def counting_rounds(pictures: int, per_picture: int, seed: int = KNOWN_SEED) -> list[Example]:
    """`per_picture` counting questions about each of `pictures` scenes, as VQAv2 asks several questions of
    one picture (5.4 on average): the questions of a picture are consecutive and share its image object
    (`write_vqav2` writes it once), and each asks about another shape (so at most 4 per picture)."""
    if not 1 <= per_picture <= len(SHAPES):
        raise ValueError(f"per_picture must be between 1 and {len(SHAPES)} (one question per shape)")
    rng = random.Random(seed)
    out = []
    for _ in range(pictures):  # scenes drawn as the demo's counting questions draw them
        asked, shapes = count_scene(rng, IMAGE_SIZE)
        image = render(shapes, IMAGE_SIZE)
        for kind in [asked, *rng.sample([k for k in SHAPES if k != asked], per_picture - 1)]:
            answer = NUMBERS[sum(s.kind == kind for s in shapes)]
            out.append(Example([image], f"How many {kind}s are there?", answer, "count"))
    return out


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_vqav2(folder: Path, examples: list[Example], *, okvqa: bool = False, first_id: int = 0) -> Path:
    """v2_OpenEnded_mscoco_val2014_questions.json + annotations + val2014/ (OK-VQA's names with okvqa);
    question and picture ids count from first_id; questions that share an image object share its picture."""
    prefix = "" if okvqa else "v2_"
    questions, annotations = [], []
    written: dict[int, int] = {}  # id(image) -> its picture id
    for i, ex in enumerate(examples):
        qid, picture = 5000 + first_id + i, id(ex.images[0])
        if picture not in written:
            written[picture] = 1000 + first_id + i
            save_png(ex.images[0], folder / "val2014" / f"COCO_val2014_{written[picture]:012d}.jpg")
        image_id = written[picture]
        questions.append({"image_id": image_id, "question": ex.question, "question_id": qid})
        answers = [{"answer": ex.answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": ex.question.split()[0].lower(),
                "answer_type": "number" if ex.kind == "count" else "other",
                "multiple_choice_answer": ex.answer,
                "answers": answers,
            }
        )
    qfile = folder / f"{prefix}OpenEnded_mscoco_val2014_questions.json"
    qfile.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (folder / f"{prefix}mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return qfile


def write_textvqa(folder: Path, examples: list[Example]) -> Path:
    rows = []
    for i, ex in enumerate(examples):
        image_id = f"{i:016x}"
        save_png(ex.images[0], folder / "train_images" / f"{image_id}.jpg")
        rows.append(
            {"question_id": i, "image_id": image_id, "question": ex.question, "answers": [ex.answer] * 10}
        )
    path = folder / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": rows}))
    return path


def write_vizwiz(folder: Path, examples: list[Example]) -> Path:
    rows = []
    for i, ex in enumerate(examples):
        name = f"VizWiz_val_{i:08d}.jpg"
        save_png(ex.images[0], folder / "val" / name)
        answers = [{"answer": ex.answer, "answer_confidence": "yes"}] * 10
        rows.append(
            {
                "image": name,
                "question": ex.question,
                "answers": answers,
                "answer_type": "other",
                "answerable": 1,
            }
        )
    path = folder / "Annotations" / "val.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def choices_for(ex: Example) -> list[str]:
    """The answer and the other answers of its question type, in a fixed order per question."""
    pool = {"box_shape": SHAPES, "count": NUMBERS[:4], "arrow_color": tuple(COLORS)}[ex.kind]
    wrong = [x for x in pool if x != ex.answer][:3]
    return [ex.answer, *wrong]


def write_visual7w(folder: Path, examples: list[Example]) -> Path:
    """The telling task: each question with its answer and three wrong choices."""
    images = []
    for i, ex in enumerate(examples):
        name = f"v7w_{i + 1}.jpg"
        save_png(ex.images[0], folder / "images" / name)
        choices = choices_for(ex)
        qa = {"qa_id": 100 + i, "image_id": i + 1, "question": ex.question, "answer": choices[0]}
        qa.update(multiple_choices=choices[1:], type="what")
        images.append({"image_id": i + 1, "filename": name, "split": "test", "qa_pairs": [qa]})
    path = folder / "dataset_v7w_telling.json"
    path.write_text(json.dumps({"images": images}))
    return path


def write_scienceqa(folder: Path, examples: list[Example]) -> Path:
    problems, split = {}, []
    for i, ex in enumerate(examples):
        pid = str(i + 1)
        save_png(ex.images[0], folder / "images" / "test" / pid / "image.png")
        choices = choices_for(ex)
        order = random.Random(pid).sample(range(len(choices)), len(choices))
        problems[pid] = {
            "question": ex.question,
            "choices": [choices[j] for j in order],
            "answer": order.index(0),
            "hint": "",
            "image": "image.png",
            "subject": "shapes",
            "split": "test",
        }
        split.append(pid)
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"test": split}))
    return folder / "problems.json"


def write_mmbench(folder: Path, examples: list[Example]) -> Path:
    lines = ["\t".join(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])]
    for i, ex in enumerate(examples):
        choices = choices_for(ex)
        order = random.Random(i).sample(range(len(choices)), len(choices))
        options = [choices[j] for j in order]
        picture = base64.b64encode(png_bytes(ex.images[0])).decode()
        lines.append(
            "\t".join([str(i), ex.question, "nan", *options, "ABCD"[order.index(0)], ex.kind, picture])
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mmbench_dev_shapes.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_pope(folder: Path, n: int, seed: int = 0) -> Path:
    """Yes/no questions "Is there a <shape> in the image?", half yes, half no."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shapes = random_scene(rng, IMAGE_SIZE, rng.randint(1, 3))
        present = {s.kind for s in shapes}
        want = i % 2 == 0
        pool = sorted(present) if want else [k for k in SHAPES if k not in present]
        name = f"COCO_val2014_{i:012d}.jpg"
        save_png(render(shapes, IMAGE_SIZE), folder / "val2014" / name)
        asked = rng.choice(pool)
        label = "yes" if want else "no"
        rows.append(
            {"question_id": i + 1, "image": name, "text": f"Is there a {asked} in the image?", "label": label}
        )
    path = folder / "coco_pope_random.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_captions(folder: Path, examples: list[Example], *, flickr: bool = False) -> Path:
    """Karpathy's split file (dataset_coco.json with val2014/, or dataset_flickr30k.json with
    flickr30k-images/), the scene description as the reference (five times, as COCO has five)."""
    entries = []
    for i, ex in enumerate(examples):
        if flickr:
            name, where = f"{10000 + i}.jpg", "flickr30k-images"
        else:
            name, where = f"COCO_val2014_{i:012d}.jpg", "val2014"
        save_png(ex.images[0], folder / where / name)
        entry: dict[str, Any] = {"filename": name, "split": "test", "imgid": i}
        entry["sentences"] = [{"raw": ex.answer, "tokens": ex.answer.split()} for _ in range(5)]
        if not flickr:
            entry.update(filepath="val2014", cocoid=i)
        entries.append(entry)
    path = folder / ("dataset_flickr30k.json" if flickr else "dataset_coco.json")
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k" if flickr else "coco"}))
    return path


def write_vipbench(folder: Path, n: int, seed: int = 0) -> Path:
    """Shapes-world ViP-Bench: "What shape is <obj>?" about one shape per scene, its box annotated on the plain
    picture (labelme) for the bbox split, and drawn (a red rectangle) for the human split."""
    from vlmkit.visual_prompts import draw_visual_prompts

    rng = random.Random(seed)
    meta, human = {}, []
    for i in range(n):
        shapes = random_scene(rng, IMAGE_SIZE, rng.randint(2, 4))
        target = rng.choice(shapes)
        plain = render(shapes, IMAGE_SIZE)
        source, image = f"v1_{i}.png", f"v1_{i}_0.png"
        save_png(plain, folder / "source_image" / source)
        pad = IMAGE_SIZE * 0.03
        x0, y0, x1, y1 = target.box
        box = [max(0, x0 - pad), max(0, y0 - pad), min(IMAGE_SIZE, x1 + pad), min(IMAGE_SIZE, y1 + pad)]
        shape = {"label": "obj", "points": [box[:2], box[2:]], "shape_type": "rectangle"}
        labelme = {
            "shapes": [shape],
            "imagePath": source,
            "imageWidth": IMAGE_SIZE,
            "imageHeight": IMAGE_SIZE,
        }
        (folder / "source_image" / f"v1_{i}.json").write_text(json.dumps(labelme))
        drawn = draw_visual_prompts(plain, {"type": "rectangle", "box": box, "color": "red"})
        save_png(drawn, folder / "human" / "images" / image)
        meta[f"v1_{i}"] = {
            "image_source": source,
            "image": image,
            "question": "What shape is <obj>?",
            "answer": target.kind,
            "capability": ["rec"] if i % 2 else ["rec", "spat"],
        }
        human.append({"image": image, "text": "What shape is inside the red rectangle?", "question_id": i})
    (folder / "vip-bench-meta-data.json").write_text(json.dumps(meta))
    (folder / "human" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in human))
    return folder / "vip-bench-meta-data.json"


WRITERS = {
    "vqav2": lambda f, ex: write_vqav2(f, ex),
    "okvqa": lambda f, ex: write_vqav2(f, ex, okvqa=True),
    "textvqa": write_textvqa,
    "vizwiz": write_vizwiz,
    "visual7w": write_visual7w,
    "scienceqa": write_scienceqa,
    "mmbench": write_mmbench,
    "coco": write_captions,
    "flickr30k": lambda f, ex: write_captions(f, ex, flickr=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--task", required=True, choices=[*WRITERS, "pope", "vipbench"])
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--kind", help="question type (default: count; caption for captioning tasks)")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    if args.task == "pope":
        print(write_pope(args.out_dir, args.n))
    elif args.task == "vipbench":
        print(write_vipbench(args.out_dir, args.n))
    else:
        kind = args.kind or ("caption" if args.task in ("coco", "flickr30k") else "count")
        print(WRITERS[args.task](args.out_dir, known_examples(args.family, kind, args.n)))


if __name__ == "__main__":
    main()
