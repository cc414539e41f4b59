"""vlmkit.eval's readers and metrics on small hand-written fixtures in each benchmark's published layout,
with the expected scores worked out by hand in the comments."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.eval import DataError, Sample, get_task
from vlmkit.eval.caption import cider_scores, score_captions
from vlmkit.eval.choice import extract_choice, score_choice
from vlmkit.eval.fewshot import random_demonstrations, rices_demonstrations
from vlmkit.eval.pope import pope_metrics, score_pope, yes_or_no
from vlmkit.eval.vipbench import (
    JUDGE_PROMPT,
    judge_one,
    judge_query,
    parse_judge_score,
    score_vipbench,
)
from vlmkit.eval.vqa import normalize_answer, score_vqa, vqa_accuracy


def picture(path: Path, color: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="PNG")


# -- VQA --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words become digits
        ("two dogs.", "2 dogs"),  # and a final period goes
        ("none", "0"),
        ("ten", "10"),
        ("The cat", "cat"),  # articles go
        ("an apple", "apple"),
        ("a", ""),
        ("isnt", "isn't"),  # contractions come back
        ("dont know", "don't know"),
        ("yes!", "yes"),  # punctuation: dropped beside a space or at the end ...
        ("red, white", "red white"),
        ("t-shirt", "t shirt"),  # ... a space inside a word
        ("1,000", "1000"),  # a comma between digits: all punctuation dropped
        ("2.5", "2.5"),  # a period before a digit stays
        ("  Yes.\n", "yes"),
    ],
)
def test_vqa_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_by_hand():
    ten_threes = ["3"] * 10
    assert vqa_accuracy("three", ten_threes) == 1.0  # "three" -> "3"
    # 3 humans said 2, 7 said 3. Answer "two": leaving out one of the three, 2 others match (2/3); leaving out
    # one of the seven, 3 others match (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    mixed = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", mixed) == pytest.approx(0.9)
    assert vqa_accuracy("3", mixed) == 1.0
    assert vqa_accuracy("four", mixed) == 0.0
    # one human: 9 of the 10 leave-one-outs see it once (1/3), the tenth sees none: 9/3/10 = 0.3
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # two humans: 2 * 1/3 + 8 * 2/3 over 10 = 0.6
    assert vqa_accuracy("the cat", ["cat", "Cat"] + ["dog"] * 8) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_score_vqa_by_answer_type():
    samples = [
        Sample("1", [], "q", ["2"] * 10, meta={"answer_type": "number"}),
        Sample("2", [], "q", ["yes"] * 10, meta={"answer_type": "yes/no"}),
        Sample("3", [], "q", ["red"] * 3 + ["blue"] * 7, meta={"answer_type": "other"}),
    ]
    metrics, per = score_vqa(samples, ["two", "No", "red"])
    # 1 + 0 + 0.6 (three humans said red: 3 * 2/3 + 7 * 1 ... for "red": 3 of 10 match) -> see below
    # "red" against 3 red + 7 blue: 3 leave-outs see 2 (2/3), 7 see 3 (1): (2 + 7) / 10 = 0.9
    assert [p["score"] for p in per] == pytest.approx([1.0, 0.0, 0.9])
    assert metrics["accuracy"] == pytest.approx(100 * 1.9 / 3)
    assert metrics["by_answer_type"] == pytest.approx({"number": 100.0, "other": 90.0, "yes/no": 0.0})
    assert per[0]["normalized"] == "2"


def write_vqav2(folder: Path, okvqa: bool = False) -> None:
    prefix = "" if okvqa else "v2_"
    questions = [
        {"image_id": 42, "question": "How many?", "question_id": 420},
        {"image_id": 7, "question": "What color?", "question_id": 70},
    ]
    answers = [
        {"question_id": 420, "answers": [{"answer": "2", "answer_id": i} for i in range(10)],
         "multiple_choice_answer": "2", "answer_type": "number"},
        {"question_id": 70, "answers": [{"answer": "red", "answer_id": i} for i in range(10)],
         "multiple_choice_answer": "red", "answer_type": "other"},
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": questions})
    )
    (folder / f"{prefix}mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": answers}))
    picture(folder / "val2014" / "COCO_val2014_000000000042.jpg")


def test_vqav2_and_okvqa_readers(tmp_path):
    for task, okvqa in (("vqav2", False), ("okvqa", True)):
        folder = tmp_path / task
        write_vqav2(folder, okvqa)
        samples = get_task(task).samples(folder)
        assert [s.id for s in samples] == ["420", "70"]
        assert samples[0].images == [folder / "val2014" / "COCO_val2014_000000000042.jpg"]
        assert samples[0].target == ["2"] * 10 and samples[0].answer == "2"
        assert samples[1].meta["answer_type"] == "other"
        # the second picture is missing: one error naming it and the layout
        from vlmkit.eval.data import check_images

        with pytest.raises(DataError, match=r"(?s)1 picture\(s\) not found.*COCO_val2014_000000000007"):
            check_images(samples, task, get_task(task).layout)
    (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="question 420 .* has no entry"):
        get_task("vqav2").samples(tmp_path / "vqav2")
    (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        get_task("vqav2").samples(tmp_path / "vqav2")
    with pytest.raises(DataError, match="no file or folder"):
        get_task("vqav2").samples(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds none of"):
        get_task("vqav2").samples(tmp_path)


def test_textvqa_and_vizwiz_readers(tmp_path):
    t = tmp_path / "textvqa"
    t.mkdir()
    rows = [
        {
            "question_id": 1,
            "image_id": "abc",
            "question": "What brand?",
            "answers": ["coke"] * 6 + ["pepsi"] * 4,
        }
    ]
    (t / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": rows}))
    picture(t / "train_images" / "abc.jpg")
    [s] = get_task("textvqa").samples(t)
    assert s.images == [t / "train_images" / "abc.jpg"] and s.answer == "coke"

    v = tmp_path / "vizwiz"
    (v / "Annotations").mkdir(parents=True)
    rows = [
        {"image": "VizWiz_val_00000001.jpg", "question": "What is this?", "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
    ]  # fmt: skip
    (v / "Annotations" / "val.json").write_text(json.dumps(rows))
    picture(v / "val" / "VizWiz_val_00000001.jpg")
    [s] = get_task("vizwiz").samples(v)
    assert s.images == [v / "val" / "VizWiz_val_00000001.jpg"] and s.id == "VizWiz_val_00000001"
    metrics, per = score_vqa([s], ["Unanswerable."])
    assert per[0]["score"] == 1.0 and metrics["by_answer_type"] == {"unanswerable": 100.0}
    rows[0]["answers"] = []
    (v / "Annotations" / "val.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="has no answers"):
        get_task("vizwiz").samples(v)


# -- multiple choice ----------------------------------------------------------------------------------------

OPTIONS = ["circle", "star", "square", "triangle"]


@pytest.mark.parametrize(
    "answer, choice",
    [
        ("B", "B"),
        ("(C) square", "C"),
        ("The answer is D.", "D"),
        ("C.", "C"),
        ("star", "B"),  # no letter: the one option whose text it holds
        ("star and green", "B"),
        ("A and B", None),  # two letters: no choice
        ("a square or a star", None),  # two options' texts: no choice
        ("nothing", None),
        ("E", None),  # not an option of four
        ("A red star", "A"),  # MMBench's rule reads a capital "A" as the letter A
    ],
)
def test_letter_extraction(answer, choice):
    assert extract_choice(answer, OPTIONS) == choice


def test_choice_scores_and_circular_accuracy_by_hand():
    def sample(i, k, target, group=None):
        meta = {"pass": k, "category": "c1" if i < 2 else "c2"}
        if group is not None:
            meta["group"] = group
        return Sample(f"{i}-{k}", [], "q", target, options=["x", "y"], meta=meta)

    # question 0: both passes right; question 1: first pass right, second wrong; question 2: first pass wrong
    samples = [sample(0, 0, "A", "0"), sample(0, 1, "B", "0"), sample(1, 0, "B", "1"), sample(1, 1, "A", "1")]
    samples += [sample(2, 0, "A", "2"), sample(2, 1, "B", "2")]
    metrics, per = score_choice(samples, ["A", "(B)", "y", "B", "B", "B"])
    assert [p["score"] for p in per] == [1, 1, 1, 0, 0, 1]
    assert per[2]["choice"] == "B"  # by its text
    assert metrics["accuracy"] == pytest.approx(200 / 3)  # first passes: 2 of 3
    assert metrics["circular_accuracy"] == pytest.approx(100 / 3)  # only question 0 has every pass right
    assert metrics["by_category"] == {"c1": 100.0, "c2": 0.0}


def test_visual7w_telling_and_pointing(tmp_path):
    picture(tmp_path / "images" / "v7w_1.jpg")
    qa = {"qa_id": 11, "image_id": 1, "question": "What is red?", "answer": "a ball",
          "multiple_choices": ["a cat", "a dog", "a car"], "type": "what"}  # fmt: skip
    other = {**qa, "qa_id": 12}
    telling = {"images": [{"image_id": 1, "filename": "v7w_1.jpg", "split": "test", "qa_pairs": [qa]},
                          {"image_id": 2, "filename": "v7w_2.jpg", "split": "train", "qa_pairs": [other]}]}  # fmt: skip
    (tmp_path / "dataset_v7w_telling.json").write_text(json.dumps(telling))
    [s] = get_task("visual7w").samples(tmp_path / "dataset_v7w_telling.json")  # the test split only
    assert sorted(s.options) == ["a ball", "a car", "a cat", "a dog"]
    assert s.options["ABCD".index(s.target)] == "a ball" and s.meta["category"] == "what"
    again = get_task("visual7w").samples(tmp_path / "dataset_v7w_telling.json")[0]
    assert again.options == s.options  # shuffled the same every run

    boxes = [{"box_id": b, "x": 10 * b, "y": 5, "width": 4, "height": 6, "name": "x"} for b in (1, 2, 3, 4)]
    pointing = {"images": [{"image_id": 1, "filename": "v7w_1.jpg", "split": "test",
                            "qa_pairs": [{"qa_id": 21, "question": "Which is the ball?", "answer": 3,
                                          "multiple_choices": [1, 2, 4], "type": "which"}]}], "boxes": boxes}  # fmt: skip
    folder = tmp_path / "pointing"
    folder.mkdir()
    (folder / "dataset_v7w_pointing.json").write_text(json.dumps(pointing))
    [p] = get_task("visual7w").samples(folder, images=tmp_path)
    assert len(p.visual_prompts) == 4 and len({v["color"] for v in p.visual_prompts}) == 4
    answer_box = p.visual_prompts["ABCD".index(p.target)]
    assert answer_box["box"] == [30, 5, 34, 11]  # box 3: x 30, y 5, 4 x 6
    assert p.options["ABCD".index(p.target)] == f"The object within the {answer_box['color']} rectangle"
    assert p.images == [tmp_path / "images" / "v7w_1.jpg"]
    pointing["images"][0]["qa_pairs"][0]["multiple_choices"] = [1, 2, 9]
    (folder / "dataset_v7w_pointing.json").write_text(json.dumps(pointing))
    with pytest.raises(DataError, match=r"box ids \[9\]"):
        get_task("visual7w").samples(folder)


def test_scienceqa_reader(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "Look.",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "2": {"question": "No picture", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
              "subject": "language science", "split": "test"},
        "3": {"question": "Train", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "subject": "x", "split": "train"},
    }  # fmt: skip
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "train": ["3"]}))
    picture(tmp_path / "images" / "test" / "1" / "image.png")
    [s] = get_task("scienceqa").samples(tmp_path)  # ScienceQA-IMG: only the test problem with a picture
    assert (
        s.question == "Context: Look.\nWhich is a mammal?"
        and s.options == ["frog", "cat"]
        and s.target == "B"
    )
    with pytest.raises(DataError, match="no split 'val'"):
        get_task("scienceqa").samples(tmp_path, split="val")
    with pytest.raises(ValueError, match="takes no \\['circular'\\]"):
        get_task("scienceqa").samples(tmp_path, circular=False)


def test_mmbench_reader_rotations(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    rows = [
        ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
        ["0", "Which colour?", "A hint", "red", "blue", "green", "nan", "B", "color", b64],
        ["1", "Again?", "nan", "yes", "no", "", "", "A", "other", "0"],  # the picture of row 0
    ]
    (tmp_path / "mmbench_dev_en.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    samples = get_task("mmbench").samples(tmp_path)
    assert [s.id for s in samples] == ["0", "0-c1", "0-c2", "1", "1-c1"]
    first, second, third = samples[:3]
    assert first.question == "A hint\nWhich colour?" and first.options == ["red", "blue", "green"]
    assert (first.target, second.options, second.target) == ("B", ["blue", "green", "red"], "A")
    assert (third.options, third.target) == (["green", "red", "blue"], "C")
    assert samples[3].images == first.images and samples[3].question == "Again?"
    # hand: row 0 right in passes 0 and 1, wrong in 2; row 1 right in both: circular 1 of 2, vanilla 2 of 2
    metrics, _ = score_choice(samples, ["B", "A", "A", "yes", "B"])
    assert metrics["accuracy"] == 100.0 and metrics["circular_accuracy"] == 50.0
    assert [s.id for s in get_task("mmbench").samples(tmp_path, circular=False)] == ["0", "1"]
    rows[1][7] = "D"
    (tmp_path / "mmbench_dev_en.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="answer 'D' for options ABC"):
        get_task("mmbench").samples(tmp_path)
    no_answer = [[c for j, c in enumerate(r) if j != 7] for r in rows]
    (tmp_path / "mmbench_dev_en.tsv").write_text("\n".join("\t".join(r) for r in no_answer) + "\n")
    with pytest.raises(DataError, match="answers are hidden"):
        get_task("mmbench").samples(tmp_path)


# -- POPE -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, reading",
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog in the image", "no"),
        ("I don't know", "yes"),  # neither "no" nor "not" is a word of it
        ("Not sure. no", "yes"),  # only the first sentence counts, and "Not" is not in POPE's list
        ("no, none", "no"),
    ],
)
def test_pope_answer_reading(answer, reading):
    assert yes_or_no(answer) == reading


def test_pope_metrics_and_reader(tmp_path):
    # predictions y y n n y against y n n y y: tp 2, fp 1, tn 1, fn 1
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert m == pytest.approx(
        {"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3, "yes_ratio": 60.0}
    )
    rows = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "no"}]  # fmt: skip
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    picture(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    samples = get_task("pope").samples(tmp_path)
    assert [s.target for s in samples] == ["yes", "no"]
    metrics, per = score_pope(samples, ["Yes.", "Yes, a dog."])
    assert metrics["precision"] == 50.0 and metrics["recall"] == 100.0 and per[1]["prediction"] == "yes"
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        get_task("pope").samples(tmp_path)


# -- captioning ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("java") is None, reason="the PTB tokenizer of the COCO evaluation needs Java"
)
def test_cider_by_hand():
    # two pictures, one reference each. "a" is in both references: IDF log(2/2) = 0; "cat", "dog", "a cat",
    # "a dog" in one: IDF log 2. A caption equal to its reference has cosine 1 for 1- and 2-grams and no 3- or
    # 4-grams (0): CIDEr-D = 10 * mean(1, 1, 0, 0) = 5. "a cat" against "a dog" shares only "a" (weight 0): 0.
    mean, each = cider_scores([["a cat"], ["a dog"]], ["a cat", "a dog"])
    assert each == pytest.approx([5.0, 5.0]) and mean == pytest.approx(5.0)
    mean, each = cider_scores([["a cat"], ["a dog"]], ["A cat.", "a cat"])  # PTB: lower case, no period
    assert each == pytest.approx([5.0, 0.0]) and mean == pytest.approx(2.5)
    metrics, per = score_captions(
        [Sample("1", [], "", ["a cat"]), Sample("2", [], "", ["a dog"])], ["a cat", ""]
    )  # an empty caption scores 0
    assert metrics["cider"] == pytest.approx(250.0) and per[1]["score"] == 0.0


def test_caption_readers(tmp_path):
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "A cat."}, {"raw": "A small cat."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000002.jpg", "split": "train", "cocoid": 2,
         "sentences": [{"raw": "x"}]},
    ]}  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    [s] = get_task("coco").samples(tmp_path)
    assert s.id == "1" and s.target == ["A cat.", "A small cat."] and s.answer == "A cat."
    assert s.images == [tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"]
    assert [x.id for x in get_task("coco").samples(tmp_path, split="train")] == ["2"]
    flickr = tmp_path / "flickr"
    flickr.mkdir()
    entry = {"filename": "1000.jpg", "split": "test", "imgid": 0, "sentences": [{"raw": "A dog runs."}]}
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": [entry]}))
    picture(flickr / "flickr30k-images" / "1000.jpg")
    [f] = get_task("flickr30k").samples(flickr)
    assert f.images == [flickr / "flickr30k-images" / "1000.jpg"]
    coco = {"images": [{"id": 5, "file_name": "COCO_val2014_000000000005.jpg"}],
            "annotations": [{"image_id": 5, "caption": "one"}, {"image_id": 5, "caption": "two"}]}  # fmt: skip
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "captions_val2014.json").write_text(json.dumps(coco))
    [c] = get_task("coco").samples(tmp_path / "own")
    assert c.target == ["one", "two"] and c.images[0].parts[-2:] == (
        "val2014",
        "COCO_val2014_000000000005.jpg",
    )


# -- ViP-Bench ----------------------------------------------------------------------------------------------


def write_vipbench(folder: Path) -> None:
    meta = {
        "v1_0": {"image_source": "v1_0.png", "image": "v1_0_0.png", "question": "Is <obj1> left of <obj2>?",
                 "answer": "yes<OR>Yes", "capability": ["spat", "rec"]},
        "v1_1": {"image_source": "v1_1.png", "image": "v1_1_0.png", "question": "What is the number <obj>?",
                 "answer": "3<OR>three", "capability": ["ocr"]},
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vip-bench-meta-data.json").write_text(json.dumps(meta))
    shapes0 = [
        {"label": "obj1", "points": [[40, 30], [10, 5]], "shape_type": "rectangle"},
        {"label": "obj2", "points": [[50, 50], [70, 52], [60, 80]], "shape_type": "polygon"},
    ]
    shapes1 = [{"label": "obj", "points": [[1, 2], [3, 4]], "shape_type": "rectangle"}]
    for name, shapes in (("v1_0", shapes0), ("v1_1", shapes1)):
        picture(folder / "source_image" / f"{name}.png")
        (folder / "source_image" / f"{name}.json").write_text(json.dumps({"shapes": shapes}))
        picture(folder / "human" / "images" / f"{name}_0.png", "blue")
    human = [{"image": "v1_1_0.png", "text": "What is the number in the red scribble?", "question_id": 1}]
    (folder / "human" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in human))


def test_vipbench_readers(tmp_path):
    write_vipbench(tmp_path)
    first, second = get_task("vipbench-bbox").samples(tmp_path)
    assert (
        first.id == "v1_0"
        and first.question == "Is within the red rectangle left of within the blue rectangle?"
    )
    assert first.visual_prompts == [
        {"type": "rectangle", "box": [10, 5, 40, 30], "color": "red"},  # corners in either order
        {"type": "rectangle", "box": [50, 50, 70, 80], "color": "blue"},  # a polygon's bounding box
    ]
    assert first.images == [tmp_path / "source_image" / "v1_0.png"] and first.answer == "yes"
    assert second.question == "What is the number within the red rectangle?"
    [h] = get_task("vipbench-human").samples(tmp_path)
    assert (h.id, h.question, h.visual_prompts) == ("v1_1", "What is the number in the red scribble?", [])
    assert h.images == [tmp_path / "human" / "images" / "v1_1_0.png"]
    (tmp_path / "source_image" / "v1_0.json").write_text(json.dumps({"shapes": shapes_without_obj2()}))
    with pytest.raises(DataError, match=r"asks about <obj2>"):
        get_task("vipbench-bbox").samples(tmp_path)


def shapes_without_obj2() -> list[dict]:
    return [{"label": "obj1", "points": [[1, 1], [2, 2]], "shape_type": "rectangle"}]


def test_vipbench_judge_prompt_and_parsing():
    query = judge_query("What is it?", "3<OR>three", "three")
    assert query == JUDGE_PROMPT + "\nWhat is it? | 3 <OR> three | three | "
    assert judge_query("q", "a", "p", retry=True).endswith(
        "q | a | p | \nPredict the correctness of the answer (digit): "
    )
    assert [parse_judge_score(x) for x in ("0.7", "1.0 correct", "1.5", "great", "")] == [
        0.7,
        1.0,
        None,
        None,
        None,
    ]
    asked = []

    def ask(prompt, temperature):
        asked.append((prompt.endswith("(digit): "), temperature))
        return ["hmm", "still no", "0.4"][len(asked) - 1]

    assert judge_one(ask, "q", "a", "p") == {"score": 0.4, "replies": ["hmm", "still no", "0.4"]}
    assert asked == [(False, 0.0), (True, 0.0), (True, 0.5)]  # asked again with the suffix, warmer
    never = judge_one(lambda prompt, t: "no idea", "q", "a", "p")
    assert never["score"] == 0.0 and len(never["replies"]) == 5


def test_vipbench_scores_by_hand():
    samples = [
        Sample(str(i), [], "q", "a", meta={"capability": c})
        for i, c in enumerate([["rec"], ["rec", "ocr"], ["ocr"]])
    ]
    # scores 1.0, 0.5, 0.0: total 50; rec (1 + 0.5) / 2 = 75; ocr (0.5 + 0) / 2 = 25
    m = score_vipbench(samples, [{"score": 1.0}, {"score": 0.5}, {"score": 0.0}])
    assert m == {"total": 50.0, "by_capability": {"ocr": 25.0, "rec": 75.0}, "answered": 3, "judged": 3}
    assert score_vipbench(samples, [None, None, None]) == {"answered": 3, "judged": 0}


# -- few-shot selection ---------------------------------------------------------------------------------------


def test_random_demonstrations_are_fixed_per_query_and_never_the_query():
    pool = [Sample(str(i), [], "q", "a") for i in range(10)]
    picks = random_demonstrations(pool[:3], pool, 4, seed=0)
    assert all(len(p) == 4 and str(i) not in [pool[j].id for j in p] for i, p in enumerate(picks))
    assert random_demonstrations(pool[2:3], pool, 4, seed=0) == picks[2:3]  # the same whatever else is asked
    assert random_demonstrations(pool[:1], pool, 4, seed=1) != picks[:1]
    with pytest.raises(ValueError, match="support set has 9"):
        random_demonstrations(pool[:1], pool, 10, seed=0)


def test_rices_orders_by_similarity_most_similar_last():
    import torch

    vectors = {"q": [1.0, 0.0], "a": [0.0, 1.0], "b": [0.9, 0.1], "c": [0.6, 0.8], "d": [1.0, 0.0]}

    def features(group):
        out = torch.tensor([vectors[s.id] for s in group])
        return out / out.norm(dim=-1, keepdim=True)

    support = [Sample(k, [], "q", "x") for k in ("a", "b", "c", "d", "q")]
    [picked] = rices_demonstrations([Sample("q", [], "q", "x")], support, 3, features)
    # cosines with q: d 1.0, b 0.99, c 0.6, a 0.0; q itself excluded; the three best, most similar last
    assert [support[i].id for i in picked] == ["c", "b", "d"]
