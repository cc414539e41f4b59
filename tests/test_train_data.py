"""Fine-tuning data: conversation JSONL -> samples whose ids are the processors' own, with labels on exactly
the assistant turns; every kind of bad row skipped or refused; collate's padding for both families."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_processors import idefics_folders, llava_folders, picture

import vlmkit
from vlmkit.idefics.processor import IdeficsProcessor
from vlmkit.train.data import IGNORE_INDEX, DataReport, Sample, collate, label_tokens, load_conversations
from vlmkit.vipllava.processor import LLAVA_TEMPLATE, VIP_LLAVA_TEMPLATE, LlavaProcessor

EOU = "<end_of_utterance>"
FILES = itertools.count()


def human(value: str) -> dict:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def user_msg(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant_msg(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder of images (one in a subfolder, a broken one) and the absolute path of one outside it."""
    root = tmp_path_factory.mktemp("data")
    (root / "sub").mkdir()
    picture(40, 50, seed=1).save(root / "a.png")
    picture(64, 30, "RGBA", seed=2).save(root / "sub" / "b.png")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    picture(33, 33, seed=3).save(elsewhere / "c.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "abs.txt").write_text(str(elsewhere / "c.png"))
    return root


def good_rows(root: Path) -> list[dict]:
    """Rows covering multi-turn, two images (relative and absolute paths), text only, and images without
    markers; see EXPECTED for the messages each must render as."""
    absolute = (root / "abs.txt").read_text()
    return [
        {
            "id": "multi-turn",
            "image": "a.png",
            "conversations": [
                human("<image>\nWhat is this?"),
                gpt("A cat."),
                human("And its colour?"),
                gpt("Black and white."),
            ],
        },
        {
            "image": ["sub/b.png", absolute],
            "conversations": [human("<image>\n<image>\nCompare them."), gpt("Both are noise.")],
        },
        {"conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hello there.")]},
        {"image": ["a.png", "sub/b.png"], "conversations": [human("Describe."), gpt("Two noisy pictures.")]},
    ]


EXPECTED = [  # (messages, images relative to the data folder or "abs", answers)
    (
        [
            user_msg("What is this?", 1),
            assistant_msg("A cat."),
            user_msg("And its colour?"),
            assistant_msg("Black and white."),
        ],
        ["a.png"],
        ["A cat.", "Black and white."],
    ),
    (
        [user_msg("Compare them.", 2), assistant_msg("Both are noise.")],
        ["sub/b.png", "abs"],
        ["Both are noise."],
    ),
    (
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user_msg("Hi")]
        + [assistant_msg("Hello there.")],
        [],
        ["Hello there."],
    ),
    (
        [user_msg("Describe.", 2), assistant_msg("Two noisy pictures.")],
        ["a.png", "sub/b.png"],
        ["Two noisy pictures."],
    ),
]


def write_jsonl(folder: Path, rows: list) -> Path:
    """A JSONL file in `folder` (relative image names resolve there); str/bytes rows are written as they are."""
    path = folder / f"rows-{next(FILES)}.jsonl"
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def resolve(root: Path, names: list[str]) -> list[str]:
    return [(root / "abs.txt").read_text() if n == "abs" else str(root / n) for n in names]


def labelled_runs(processor, sample: Sample) -> list[str]:
    """The decoded runs of consecutive learned tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [processor.decode(run).strip() for run in runs]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    ref, v5, _ = llava_folders(tmp_path_factory.mktemp("llava"))
    return ref, v5


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    ref, v5, _ = idefics_folders(tmp_path_factory.mktemp("idefics"), padding_side="right")
    return ref, v5


def llava_processor(llava, template: str | None = LLAVA_TEMPLATE) -> LlavaProcessor:
    processor = vlmkit.load_processor(llava[1])
    if template is not None:
        processor.chat_template = template
    return processor


# -- LLaVA family ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "end_of_turn"), [(LLAVA_TEMPLATE, "</s>"), (VIP_LLAVA_TEMPLATE, "")])
def test_llava_ids_pixels_and_labels(llava, data, template, end_of_turn):
    ref, _ = llava
    processor = llava_processor(llava, template)
    path = write_jsonl(data, good_rows(data))
    samples, report = load_conversations(path, processor, max_length=500)
    assert (report.total, report.kept, report.skipped) == (4, 4, {})
    assert report.summary() == "kept 4 of 4 rows"
    for sample, (messages, names, answers), row in zip(samples, EXPECTED, [1, 2, 3, 4], strict=True):
        assert sample.row == row
        text = processor.apply_chat_template(messages, add_generation_prompt=False)
        images = resolve(data, names)
        want = processor(text=[text], images=images or None)
        assert torch.equal(sample.input_ids, want["input_ids"][0])
        hf = ref(text=[text], images=images or None, return_tensors="pt")
        assert torch.equal(sample.input_ids, hf["input_ids"][0])
        if images:
            assert torch.equal(sample.pixel_values, want["pixel_values"])
            assert sample.pixel_values.shape == (len(images), 3, 30, 30)
        else:
            assert sample.pixel_values is None
        assert sample.image_attention_mask is None
        assert labelled_runs(processor, sample) == [a + end_of_turn for a in answers]
        assert not bool((sample.labels[sample.input_ids == processor.image_token_id] != IGNORE_INDEX).any())


def test_markers_are_prepended_when_absent(llava, data):
    processor = llava_processor(llava)
    rows = [
        {"image": ["a.png", "sub/b.png"], "conversations": [human("Describe."), gpt("Noise.")]},
        {
            "image": ["a.png", "sub/b.png"],
            "conversations": [human("<image>\n<image>\nDescribe."), gpt("Noise.")],
        },
        {"image": "a.png", "conversations": [gpt("First."), human("Describe."), gpt("Noise.")]},
    ]
    samples, _ = load_conversations(write_jsonl(data, rows), processor, max_length=500)
    assert torch.equal(samples[0].input_ids, samples[1].input_ids)
    assert torch.equal(samples[0].labels, samples[1].labels)
    text = processor.decode(samples[2].input_ids)
    assert text.index("<image>") > text.index("First.")  # the first human turn, not the first turn


def test_template_without_generation_prompt_learns_the_whole_turn(llava, data):
    """The folder's own template writes "assistant: " with the answer and has no generation prompt: all
    of the assistant turn is learned."""
    processor = llava_processor(llava, template=None)
    path = write_jsonl(data, good_rows(data)[:1])
    samples, _ = load_conversations(path, processor, max_length=500)
    assert labelled_runs(processor, samples[0]) == ["assistant: A cat.", "assistant: Black and white."]


def test_template_that_is_not_incremental_is_refused(llava, data):
    processor = llava_processor(llava)
    processor.chat_template = "{% for m in messages | reverse %}{{ m['role'] }}{% endfor %}"
    path = write_jsonl(data, good_rows(data)[:1])
    with pytest.raises(
        ValueError, match=r"rows-\d+.jsonl, row 1: the chat template does not render a conversation as an ext"
    ):
        load_conversations(path, processor, max_length=500)  # whatever the policy


def test_tokens_straddling_the_start_of_an_answer():
    """A token merged across the generation prompt and the answer is learned when it carries answer text,
    not when all it carries of the answer is a space. BOS (no characters) and image tokens never are."""
    text = "Bot: A cat<image>"
    bos, image = (1, (0, 0)), (99, (10, 17))
    split = [bos, (10, (0, 3)), (11, (3, 5)), (12, (5, 6)), (13, (6, 10)), image]  # "Bot" ":▁" "A" "▁cat"
    merged = [bos, (10, (0, 3)), (14, (3, 6)), (13, (6, 10)), image]  # "Bot" ":▁A" "▁cat"
    for tokens, answer_start, learned in [
        (split, 4, [12, 13]),  # the answer is " A cat": ":▁" holds only its space
        (split, 5, [12, 13]),  # the generation prompt ends in the space
        (merged, 5, [14, 13]),  # ":▁A" holds the answer's "A"
        (merged, 4, [14, 13]),
        (split, 7, [13]),  # starts inside "▁cat"
    ]:
        ids, offsets = [t for t, _ in tokens], [o for _, o in tokens]
        mask = np.arange(len(text)) >= answer_start
        labels = label_tokens(ids, offsets, text, mask, skip_id=99)
        assert [t for t in labels.tolist() if t != IGNORE_INDEX] == learned, (tokens, answer_start)


# -- IDEFICS ---------------------------------------------------------------------------------------


def idefics_reference_sample(text: str, images: list) -> list:
    """The rendered text split at its markers, images in between (a path as a Path: a str would be text)."""
    pieces = text.split("<image>")
    sample: list = []
    for i, piece in enumerate(pieces):
        sample += [piece] if piece else []
        sample += [Path(images[i]) if isinstance(images[i], str) else images[i]] if i < len(images) else []
    return sample


def test_idefics_ids_pixels_masks_and_labels(idefics, data):
    ref, folder = idefics
    processor = vlmkit.load_processor(folder)
    assert isinstance(processor, IdeficsProcessor)
    path = write_jsonl(data, good_rows(data))
    samples, report = load_conversations(path, processor, max_length=500)
    assert report.kept == 4
    for sample, (messages, names, answers) in zip(samples, EXPECTED, strict=True):
        text = processor.apply_chat_template(messages, add_generation_prompt=False)
        images = resolve(data, names)
        want = processor(text=[idefics_reference_sample(text, images)], add_end_of_utterance_token=False)
        assert torch.equal(sample.input_ids, want["input_ids"][0])
        hf = ref(
            text=[idefics_reference_sample(text, [Image.open(i) for i in images])],
            add_end_of_utterance_token=False,
            return_tensors="pt",
        )
        assert torch.equal(sample.input_ids, hf["input_ids"][0])
        T, n = len(sample.input_ids), len(images)
        assert sample.image_attention_mask.dtype == torch.long
        assert sample.image_attention_mask.shape == (T, n)
        if images:
            assert torch.allclose(sample.pixel_values, want["pixel_values"][0, :n])
            assert torch.equal(sample.image_attention_mask, want["image_attention_mask"][0].long())
        else:
            assert sample.pixel_values is None
        assert labelled_runs(processor, sample) == [f"{a}{EOU}" for a in answers]
        learned = sample.labels != IGNORE_INDEX
        assert not bool(learned[sample.input_ids == processor.image_token_id].any())


def test_idefics_spaces_at_piece_ends_are_mapped(idefics, data):
    """build_prompt strips spaces around pieces; the answer spans must still land on the answer."""
    processor = vlmkit.load_processor(idefics[1])
    processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %} Bot: {% else %} Me: {% endif %}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %} <image> {% else %}{{ p['text'] }}"
        "{% endif %}{% endfor %} | {% endfor %}{% if add_generation_prompt %} Bot: {% endif %}"
    )
    rows = [{"image": "a.png", "conversations": [human("<image>Look."), gpt("A picture "), human("ok")]}]
    rows[0]["conversations"].append(gpt("Bye."))
    samples, _ = load_conversations(write_jsonl(data, rows), processor, max_length=500)
    text = processor.apply_chat_template(
        [user_msg("Look.", 1), assistant_msg("A picture "), user_msg("ok"), assistant_msg("Bye.")],
        add_generation_prompt=False,
    )
    want = processor(
        text=[idefics_reference_sample(text, [data / "a.png"])], add_end_of_utterance_token=False
    )
    assert torch.equal(samples[0].input_ids, want["input_ids"][0])
    assert labelled_runs(processor, samples[0]) == ["A picture  |", "Bye. |"]


def test_idefics_text_that_looks_like_a_url_is_a_bad_row(idefics, data):
    """IdeficsProcessor reads a text piece without spaces that parses as a URL as an image."""
    processor = vlmkit.load_processor(idefics[1])
    rows = [{"image": "a.png", "conversations": [human("<image>\nhttps://example.com/x.png"), gpt("Yes.")]}]
    path = write_jsonl(data, [*rows, good_rows(data)[0]])
    samples, report = load_conversations(path, processor, max_length=500)
    assert report.skipped == {"image count": [1]} and "looks like a URL" in report.details[1]


# -- bad rows --------------------------------------------------------------------------------------

BAD_ROWS = {  # reason -> (line, what the error says)
    "invalid json": ['{"conversations": [', "not valid JSON"],
    "missing image": [
        {"image": "nope.png", "conversations": [human("<image>\nHi"), gpt("Yo.")]},
        "no image file .*nope.png",
    ],
    "bad image": [{"image": "broken.png", "conversations": [human("Hi"), gpt("Yo.")]}, ".*broken.png"],
    "image count": [
        {"image": "a.png", "conversations": [human("<image>\nHi <image>"), gpt("Yo.")]},
        "2 <image> markers in the turns but 1 images",
    ],
    "empty conversation": [{"conversations": []}, "no gpt turn with text"],
    "too long": [{"conversations": [human("Hi"), gpt("word " * 200)]}, r"\d+ tokens, above max_length=120"],
}


def test_bad_rows_are_skipped_and_counted(llava, data):
    processor = llava_processor(llava)
    good = good_rows(data)
    path = write_jsonl(
        data,
        [
            good[0],  # 1
            BAD_ROWS["invalid json"][0],  # 2
            "[1, 2]",  # 3: not an object
            {"conversations": "hi"},  # 4
            {"conversations": [{"from": "robot", "value": "x"}, gpt("y")]},  # 5
            b'{"conversations": "\xff"}',  # 6: not UTF-8
            BAD_ROWS["missing image"][0],  # 7
            "",  # 8: blank
            "   ",  # 9: blank
            BAD_ROWS["bad image"][0],  # 10
            BAD_ROWS["image count"][0],  # 11
            {"conversations": [human("<image>"), gpt("Yo.")]},  # 12: a marker without an image
            BAD_ROWS["empty conversation"][0],  # 13
            {"conversations": [human("Hi"), gpt("  ")]},  # 14
            BAD_ROWS["too long"][0],  # 15
            good[2],  # 16
            {"image": 3, "conversations": [human("Hi"), gpt("Yo.")]},  # 17
        ],
    )
    samples, report = load_conversations(path, processor, max_length=120)
    assert [s.row for s in samples] == [1, 16]
    assert isinstance(report, DataReport)
    assert (report.total, report.kept) == (15, 2)
    assert report.skipped == {
        "invalid json": [2, 3, 4, 5, 6, 17],
        "missing image": [7],
        "bad image": [10],
        "image count": [11, 12],
        "empty conversation": [13, 14],
        "too long": [15],
    }
    assert report.summary() == (
        "kept 2 of 15 rows; skipped 6 invalid json (rows 2, 3, 4, 5, 6, 17), 2 empty conversation (rows 13, 14), "
        "2 image count (rows 11, 12), 1 missing image (row 7), 1 bad image (row 10), 1 too long (row 15)"
    )
    assert "2 <image> markers in the turns but 1 images" in report.details[11]
    assert "1 <image> markers in the turns but 0 images" in report.details[12]
    assert "'from' must be 'human', 'gpt' or 'system'" in report.details[5]


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_rows_raise_with_error_policy(llava, data, reason):
    processor = llava_processor(llava)
    line, message = BAD_ROWS[reason]
    path = write_jsonl(data, [good_rows(data)[2], "", line])
    with pytest.raises(ValueError, match=f"row 3: {reason}: {message}"):
        load_conversations(path, processor, max_length=120, on_bad_sample="error")
    samples, report = load_conversations(path, processor, max_length=120)
    assert report.skipped == {reason: [3]} and len(samples) == 1


def test_template_errors_are_bad_rows(llava, data):
    processor = llava_processor(llava)
    processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{% endfor %}" + LLAVA_TEMPLATE
    )
    path = write_jsonl(data, good_rows(data))
    samples, report = load_conversations(path, processor, max_length=500)
    assert report.skipped == {"template error": [3]} and len(samples) == 3
    assert "no system turns" in report.details[3]
    with pytest.raises(ValueError, match="row 3: template error: no system turns"):
        load_conversations(path, processor, max_length=500, on_bad_sample="error")


def test_summary_shortens_long_row_lists():
    report = DataReport(total=30, kept=5, skipped={"too long": list(range(6, 31))})
    assert (
        report.summary()
        == "kept 5 of 30 rows; skipped 25 too long (rows 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, ... (15 more))"
    )


def test_limit_and_arguments(llava, data, tmp_path):
    processor = llava_processor(llava)
    good = good_rows(data)
    path = write_jsonl(data, [good[0], "{", good[1], good[2], "{"])
    samples, report = load_conversations(path, processor, max_length=500, limit=2)
    assert [s.row for s in samples] == [1, 3]
    assert (report.total, report.kept, report.skipped) == (3, 2, {"invalid json": [2]})
    for kwargs, match in [
        (dict(on_bad_sample="ignore"), "on_bad_sample must be one of"),
        (dict(max_length=0), "max_length must be a positive int"),
        (dict(limit=0), "limit must be None or a positive int"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_conversations(path, processor, **{"max_length": 500, **kwargs})
    with pytest.raises(FileNotFoundError, match="no conversation file"):
        load_conversations(tmp_path / "none.jsonl", processor, max_length=500)
    with pytest.raises(TypeError, match="LlavaProcessor or an IdeficsProcessor"):
        load_conversations(path, processor.tokenizer, max_length=500)
    length = len(load_conversations(write_jsonl(data, [good[2]]), processor, max_length=500)[0][0].input_ids)
    assert load_conversations(write_jsonl(data, [good[2]]), processor, max_length=length)[1].kept == 1
    assert load_conversations(write_jsonl(data, [good[2]]), processor, max_length=length - 1)[0] == []
    samples, report = load_conversations(write_jsonl(data, ["{", "", "[]"]), processor, max_length=500)
    assert samples == [] and report.summary() == "kept 0 of 2 rows; skipped 2 invalid json (rows 1, 3)"


# -- collate ---------------------------------------------------------------------------------------


def test_collate_llava(llava, data):
    processor = llava_processor(llava)
    samples, _ = load_conversations(write_jsonl(data, good_rows(data)), processor, max_length=500)
    batch = collate(samples[:3], pad_token_id=7)
    lengths = [len(s.input_ids) for s in samples[:3]]
    T = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for b, (s, n) in enumerate(zip(samples, lengths, strict=False)):
        assert torch.equal(batch["input_ids"][b, :n], s.input_ids)
        assert torch.equal(batch["labels"][b, :n], s.labels)
        assert bool((batch["input_ids"][b, n:] == 7).all())
        assert bool((batch["labels"][b, n:] == IGNORE_INDEX).all())
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0].pixel_values, samples[1].pixel_values]))
    text_only = collate([samples[2]], pad_token_id=0)
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_collate_idefics(idefics, data):
    processor = vlmkit.load_processor(idefics[1])
    samples, _ = load_conversations(write_jsonl(data, good_rows(data)), processor, max_length=500)
    batch = collate(samples[:3], pad_token_id=processor.tokenizer.pad_token_id)  # 1, 2 and 0 images
    T = max(len(s.input_ids) for s in samples[:3])
    assert batch["pixel_values"].shape == (3, 2, 3, 28, 28)
    assert batch["image_attention_mask"].shape == (3, T, 2)
    assert batch["image_attention_mask"].dtype == torch.long
    for b, s in enumerate(samples[:3]):
        n, t = (0 if s.pixel_values is None else len(s.pixel_values)), len(s.input_ids)
        if n:
            assert torch.equal(batch["pixel_values"][b, :n], s.pixel_values)
        assert bool((batch["pixel_values"][b, n:] == 0).all())
        assert torch.equal(batch["image_attention_mask"][b, :t, :n], s.image_attention_mask)
        assert (
            int(batch["image_attention_mask"][b, t:].sum()) == 0
            and int(batch["image_attention_mask"][b, :, n:].sum()) == 0
        )
        assert bool((batch["labels"][b, t:] == IGNORE_INDEX).all())
    # The processor's own batch of the same prompts (right padding) agrees wherever there is text.
    want = processor(
        text=[
            idefics_reference_sample(
                processor.apply_chat_template(m, add_generation_prompt=False), resolve(data, i)
            )
            for m, i, _ in EXPECTED[:3]
        ],
        add_end_of_utterance_token=False,
    )
    real = want["attention_mask"].bool()
    assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(
        batch["attention_mask"], want["attention_mask"]
    )
    assert torch.allclose(batch["pixel_values"], want["pixel_values"])
    assert torch.equal(batch["image_attention_mask"][real], want["image_attention_mask"][real].long())
    text_only = collate([samples[2]], pad_token_id=0)
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_collate_errors(llava, idefics, data):
    path = write_jsonl(data, good_rows(data)[:1])
    llava_sample = load_conversations(path, llava_processor(llava), max_length=500)[0][0]
    idefics_sample = load_conversations(path, vlmkit.load_processor(idefics[1]), max_length=500)[0][0]
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="mix the IDEFICS and LLaVA families"):
        collate([llava_sample, idefics_sample], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        collate([llava_sample], pad_token_id=None)
