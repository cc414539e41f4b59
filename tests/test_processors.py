"""Processors against the transformers processors, tensor for tensor, in both folder layouts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import build_tokenizer
from PIL import Image

import vlmkit
from vlmkit.idefics.processor import IdeficsProcessor
from vlmkit.vipllava.processor import LlavaProcessor

IDEFICS_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")


def picture(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


IMAGES = [
    picture(37, 211, "RGBA", 1),
    picture(300, 20, "L", 2),
    picture(64, 64, "P", 3),
    picture(1, 1, "RGB", 4),
    picture(333, 334, "LA", 5),
]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.float() - b.float()).abs().max().item() < 1e-4


def assert_same(ours: dict, ref, keys) -> None:
    for key in keys:
        a, b = ours[key], ref[key]
        if key == "pixel_values":
            assert close(a, b), key
        else:
            assert torch.equal(a.long(), b.long()), key


# -- LLaVA / ViP-LLaVA ---------------------------------------------------------------------------

CLIP_IMAGE = dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})


def llava_folders(tmp_path, *, do_pad: bool = False):
    """The same processor saved by transformers 5 and written in the published layout."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaImageProcessorPil
    from transformers import LlavaProcessor as HFLlavaProcessor

    tok_dir = build_tokenizer(tmp_path / "tok", published_layout=True)
    image_processor = (
        LlavaImageProcessorPil(do_pad=True, **CLIP_IMAGE) if do_pad else CLIPImageProcessorPil(**CLIP_IMAGE)
    )
    template = "{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    ref = HFLlavaProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(tok_dir),
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    v5 = tmp_path / "v5"
    ref.save_pretrained(v5)
    published = tmp_path / "published"
    shutil.copytree(tok_dir, published)
    (published / "preprocessor_config.json").write_text(
        json.dumps({**image_processor.to_dict(), "processor_class": "LlavaProcessor"})
    )
    (published / "processor_config.json").write_text(
        json.dumps(
            {
                "patch_size": 6,
                "vision_feature_select_strategy": "default",
                "num_additional_image_tokens": 1,
                "processor_class": "LlavaProcessor",
            }
        )
    )
    (published / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return ref, v5, published


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return llava_folders(tmp_path_factory.mktemp("llava"))


@pytest.mark.parametrize("layout", ["v5", "published"])
def test_llava_batches_match(llava, layout):
    ref, v5, published = llava
    ours = vlmkit.load_processor(v5 if layout == "v5" else published)
    assert isinstance(ours, LlavaProcessor)
    cases = [
        (
            [
                "USER: <image>\nWhat is this? ASSISTANT:",
                "USER: <image>\nAnd this one, longer text here? ASSISTANT:",
            ],
            IMAGES[:2],
        ),
        (["<image><image>two images", "text only row"], IMAGES[2:4]),
        ("<image>", [IMAGES[4]]),
        (["no images at all", "none"], None),
    ]
    for text, images in cases:
        got = ours(text=text, images=images, padding=True)
        want = ref(text=text, images=images, padding=True, return_tensors="pt")
        assert_same(got, want, ["input_ids", "attention_mask", *(["pixel_values"] if images else [])])
    n = 5 * 5 + 1 - 1
    assert int((got["input_ids"] == ours.image_token_id).sum()) == 0
    assert ours.tokens_for(30, 30) == n


def test_llava_pad_to_square_matches(tmp_path):
    ref, v5, _ = llava_folders(tmp_path, do_pad=True)
    ours = vlmkit.load_processor(v5)
    got = ours(text=["<image> a", "<image> b"], images=IMAGES[:2], padding=True)
    want = ref(text=["<image> a", "<image> b"], images=IMAGES[:2], padding=True, return_tensors="pt")
    assert_same(got, want, ["input_ids", "attention_mask", "pixel_values"])


def test_llava_marker_count_errors(llava):
    ours = vlmkit.load_processor(llava[1])
    with pytest.raises(ValueError, match="hold 2 <image> markers but 1 images were given"):
        ours(text="<image><image>", images=[IMAGES[0]])
    with pytest.raises(ValueError, match="hold 0 <image> markers but 1 images were given"):
        ours(text="no marker", images=IMAGES[0])
    with pytest.raises(ValueError, match="truncation cut into an image"):
        ours(text="a long prefix of several words <image>", images=IMAGES[0], truncation=True, max_length=8)
    with pytest.raises(ValueError, match=r"torch tensors only \(return_tensors='pt'\), got None"):
        ours(text="<image>", images=IMAGES[0], return_tensors=None)


def test_llava_chat_template(llava):
    ref, v5, published = llava
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "What?"}],
        }
    ]
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    for folder in (v5, published):
        ours = vlmkit.load_processor(folder)
        assert ours.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
            hf_messages, tokenize=False
        )


def test_llava_chat_tokenized_carries_images(llava, tmp_path):
    ours = vlmkit.load_processor(llava[1])
    path = tmp_path / "a.png"
    IMAGES[0].save(path)
    out = ours.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "hi"}]}],
        tokenize=True,
    )
    assert out["pixel_values"].shape == (1, 3, 30, 30)
    assert int((out["input_ids"] == ours.image_token_id).sum()) == 25


def test_builtin_vip_llava_template(llava, tmp_path):
    folder = tmp_path / "nochat"
    shutil.copytree(llava[2], folder)
    (folder / "chat_template.json").unlink()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "vipllava",
                "vision_config": {
                    "image_size": 30,
                    "patch_size": 6,
                    "hidden_size": 16,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                },
                "vision_feature_layers": [-1],
            }
        )
    )
    ours = vlmkit.load_processor(folder)
    prompt = ours.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    )
    assert prompt.endswith("###Human: <image>\nWhat is this?###Assistant:")
    assert prompt.startswith("A chat between a curious human")


def test_builtin_llava_template(llava, tmp_path):
    folder = tmp_path / "nochat-llava"
    shutil.copytree(llava[2], folder)
    (folder / "chat_template.json").unlink()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    ours = vlmkit.load_processor(folder)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    assert (
        ours.apply_chat_template(messages)
        == "USER: <image>\nWhat? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:"
    )
    ids = ours.tokenizer("USER: hi")["input_ids"][0]
    assert ours.decode(ids, skip_special_tokens=True) == "USER: hi"
    assert ours.batch_decode(ids[None]) == [ours.tokenizer.decode(ids)]
    assert ours.batch_decode(ids[None])[0].startswith("<s>")


# -- IDEFICS -------------------------------------------------------------------------------------


def idefics_folders(tmp_path, *, padding_side: str = "left"):
    from transformers import AutoTokenizer, IdeficsImageProcessorPil
    from transformers import IdeficsProcessor as HFIdeficsProcessor

    tok_dir = build_tokenizer(
        tmp_path / "tok",
        extra_special=IDEFICS_SPECIALS[:2],
        additional_special_tokens=IDEFICS_SPECIALS,
        padding_side=padding_side,
        published_layout=True,
    )
    image_processor = IdeficsImageProcessorPil(image_size=28)
    ref = HFIdeficsProcessor(
        image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(tok_dir)
    )
    v5 = tmp_path / "v5"
    ref.save_pretrained(v5)
    published = tmp_path / "published"
    shutil.copytree(tok_dir, published)
    (published / "preprocessor_config.json").write_text(
        json.dumps({**image_processor.to_dict(), "processor_class": "IdeficsProcessor"})
    )
    return ref, v5, published


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    return idefics_folders(tmp_path_factory.mktemp("idefics"))


IDEFICS_BATCH = [
    ["User: what is this?", IMAGES[0], "And this?", IMAGES[1], "<end_of_utterance>\nAssistant:"],
    [IMAGES[2], IMAGES[3], "two images in a row"],
    ["text only", "two texts in a row"],
]
KEYS = ["input_ids", "attention_mask", "pixel_values", "image_attention_mask"]


@pytest.mark.parametrize("layout", ["v5", "published"])
@pytest.mark.parametrize("eou", [True, False])
def test_idefics_batches_match(idefics, layout, eou):
    ref, v5, published = idefics
    ours = vlmkit.load_processor(v5 if layout == "v5" else published)
    assert isinstance(ours, IdeficsProcessor)
    for kwargs in (dict(), dict(add_eos_token=True), dict(padding="max_length", max_length=60)):
        got = ours(text=IDEFICS_BATCH, add_end_of_utterance_token=eou, **kwargs)
        want = ref(text=IDEFICS_BATCH, add_end_of_utterance_token=eou, return_tensors="pt", **kwargs)
        assert_same(got, want, KEYS)
    text_only = [["just text"], ["more", "text"]]
    got = ours(text=text_only, add_end_of_utterance_token=eou)
    assert_same(got, ref(text=text_only, add_end_of_utterance_token=eou, return_tensors="pt"), KEYS)
    assert got["image_attention_mask"].dtype == torch.bool


def test_idefics_right_padding_and_truncation(tmp_path):
    ref, v5, _ = idefics_folders(tmp_path, padding_side="right")
    ours = vlmkit.load_processor(v5)
    for kwargs in (dict(), dict(truncation=True, max_length=12)):
        got = ours(text=IDEFICS_BATCH, add_end_of_utterance_token=False, **kwargs)
        want = ref(text=IDEFICS_BATCH, add_end_of_utterance_token=False, return_tensors="pt", **kwargs)
        assert_same(got, want, KEYS)


def test_idefics_images_and_text_form(idefics):
    ref, v5, _ = idefics
    ours = vlmkit.load_processor(v5)
    got = ours(text=["first prompt", "second"], images=[[IMAGES[0], IMAGES[1]], [IMAGES[2]]])
    want = ref(
        text=["first prompt", "second"], images=[[IMAGES[0], IMAGES[1]], [IMAGES[2]]], return_tensors="pt"
    )
    assert_same(got, want, KEYS)
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        ours(text=["a", "b"], images=[IMAGES[0]])


def test_idefics_end_of_utterance_default(idefics):
    """The tokenizer lists <end_of_utterance> among its special tokens, so two consecutive texts are
    separated by it unless told otherwise. (On purpose unlike transformers 5.23, whose check looks for the
    token under a special-tokens key that version no longer fills, so it never adds it by default.)"""
    ours = vlmkit.load_processor(idefics[1])
    assert ours.has_end_of_utterance
    eou = ours.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert int((ours(text=[["a", "b"]])["input_ids"] == eou).sum()) == 1
    assert int((ours(text=[["a", "b"]], add_end_of_utterance_token=False)["input_ids"] == eou).sum()) == 0


def test_idefics_urls_need_allow_remote(idefics):
    ours = vlmkit.load_processor(idefics[1])
    with pytest.raises(ValueError, match="allow_remote=True"):
        ours(text=[["look:", "https://example.com/cat.png"]])


def test_idefics_chat(idefics):
    ours = vlmkit.load_processor(idefics[2])  # the published layout here has no template: the built-in one
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": IMAGES[0]}],
        }
    ]
    assert ours.apply_chat_template(messages) == "User:What is this?<image><end_of_utterance>\nAssistant:"
    out = ours.apply_chat_template(messages, tokenize=True)
    direct = ours(
        text=[["User:What is this?", IMAGES[0], "<end_of_utterance>\nAssistant:"]],
        add_end_of_utterance_token=False,
    )
    assert_same(out, direct, KEYS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.lists(
            st.one_of(st.just("img"), st.text("abc xyz", min_size=1, max_size=8)), min_size=1, max_size=6
        ),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
)
def test_idefics_masks_follow_token_positions(idefics, rows, eos):
    """Any interleaving: each token attends exactly to the latest image at or before it; pixel slots hold
    the row's images in order, zeros after."""
    ours = vlmkit.load_processor(idefics[1])
    tiny = [picture(5, 9, seed=i) for i in range(6)]
    samples = [[tiny[i] if part == "img" else part for i, part in enumerate(row)] for row in rows]
    out = ours(text=samples, add_eos_token=eos)
    ids, iam, pixels = out["input_ids"], out["image_attention_mask"], out["pixel_values"]
    n_images = [sum(1 for p in row if p == "img") for row in rows]
    assert pixels.shape[1] == max(1, max(n_images))
    for b, row_ids in enumerate(ids.tolist()):
        current = -1
        for t, token in enumerate(row_ids):
            if token == ours.image_token_id:
                current += 1
            expected = [int(n == current) for n in range(iam.shape[2])]
            assert iam[b, t].tolist() == expected
        assert current + 1 == n_images[b]
        assert bool((pixels[b, n_images[b] :] == 0).all())
