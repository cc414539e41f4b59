"""LLaVA-NeXT against transformers on tiny random configs: both published config layouts, the anyres geometry,
the processor, logits, loss and generation for a Vicuna (LLaMA) and a Mistral (sliding-window) decoder on a
batch with pictures of three aspect ratios and a text-only row, the checkpoint layouts, the engine with
pictures of different sizes, fine-tuning, quantization, `info` / `convert`, and the errors.
(The conformance suite covers the rest through the registry, on the Mistral checkpoint.)"""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from checkpoints import LLAVA_NEXT_PINPOINTS, build_llava_next_checkpoint
from oracle import save_state_dict_layout
from PIL import Image
from safetensors.torch import load_file, save_file
from test_quant import dequantized_reference

import vlmkit
from vlmkit.cli import convert_command, info_command
from vlmkit.llama import LlamaConfig
from vlmkit.llava_next import LlavaNextConfig, LlavaNextModel
from vlmkit.llava_next.anyres import AnyResImageProcessor, best_resolution
from vlmkit.modules import causal_mask
from vlmkit.quant import QuantLinear
from vlmkit.serve.engine import Engine, Request, SamplingParams
from vlmkit.train.data import collate, load_conversations
from vlmkit.train.finetune import FinetuneConfig, finetune, select_trainable

TOL = 1e-4
MISTRAL = {"sliding_window": 24, "num_key_value_heads": 2}


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random RGB picture of size (height, width)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# wide (padding above and below), tall (padding left and right) and near-square pictures
PICTURES = [picture(0, (40, 52)), picture(1, (28, 70)), picture(2, (75, 24))]
TEXTS = [
    "<image>\nDescribe the picture.",
    "Compare <image> with <image>, please.",
    "Just some text, no picture at all here.",
]


@pytest.fixture(scope="module", params=["llama", "mistral"])
def checkpoint(request, tmp_path_factory):
    text = MISTRAL if request.param == "mistral" else {}
    folder, hf, proc = build_llava_next_checkpoint(
        tmp_path_factory.mktemp(request.param), text_model_type=request.param, text=text
    )
    return folder, hf, proc, vlmkit.VLM.load(folder)


def batch(proc, padding_side: str = "left") -> dict[str, torch.Tensor]:
    proc.tokenizer.padding_side = padding_side
    return dict(proc(text=TEXTS, images=PICTURES, padding=True, return_tensors="pt"))


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Config: both published layouts
# ---------------------------------------------------------------------------------------------

VISION_336 = {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# llava-hf/llava-v1.6-mistral-7b-hf as published: a `mistral` text config of the fields that differ
MISTRAL_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": PINPOINTS_336,
    "image_token_index": 32000,
    "model_type": "llava_next",
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "transformers_version": "4.39.0.dev0",
    "use_image_newline_parameter": True,
    "vision_config": VISION_336,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
# llava-hf/llava-v1.6-vicuna-7b-hf as published: a `llama` text config of the fields that differ
VICUNA_7B = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": PINPOINTS_336,
    "image_token_index": 32000,
    "model_type": "llava_next",
    "pad_token_id": 0,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.39.0.dev0",
    "use_image_newline_parameter": True,
    "vision_config": VISION_336,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
MISTRAL_DEFAULTS = {  # a Mistral text config that leaves out even the fields Mistral's defaults give
    "model_type": "llava_next",
    "text_config": {"model_type": "mistral", "vocab_size": 32064},
}


def hf_parse(d: dict):
    from transformers import AutoConfig

    d = copy.deepcopy(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize(
    "raw", [MISTRAL_7B, VICUNA_7B, MISTRAL_DEFAULTS], ids=["mistral", "vicuna", "defaults"]
)
def test_config_reads_like_transformers_and_round_trips(raw):
    ours, ref = LlavaNextConfig.from_hf(raw), hf_parse(raw)
    t, rt = ours.text_config, ref.text_config
    assert t.model_type == rt.model_type
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "hidden_act",
    ):
        assert getattr(t, name) == getattr(rt, name), name
    assert t.rope_theta == rt.rope_parameters["rope_theta"]
    assert t.sliding_window == getattr(rt, "sliding_window", None)
    assert ours.vision_config.image_size == ref.vision_config.image_size
    assert ours.image_grid_pinpoints == [list(p) for p in ref.image_grid_pinpoints]
    assert ours.feature_layers == [ref.vision_feature_layer]
    assert (ours.image_token_index, ours.tie_word_embeddings) == (
        ref.image_token_index,
        ref.tie_word_embeddings,
    )
    assert LlavaNextConfig.from_hf(ours.to_hf()) == ours
    again = hf_parse(ours.to_hf())  # transformers reads what we write
    assert again.text_config.model_type == t.model_type
    assert getattr(again.text_config, "sliding_window", None) == t.sliding_window


def test_published_sizes():
    mistral = LlavaNextConfig.from_hf(MISTRAL_7B)
    assert mistral.text_config.sliding_window is None and mistral.text_config.rope_theta == 1e6
    assert mistral.tile_size == 336 and mistral.patches_per_side == 24
    assert LlavaNextConfig.from_hf(MISTRAL_DEFAULTS).text_config.sliding_window == 4096
    vicuna = LlavaNextConfig.from_hf(VICUNA_7B)
    assert (vicuna.text_config.model_type, vicuna.text_config.num_key_value_heads) == ("llama", 32)
    assert vicuna.pad_token_id == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_grid_pinpoints": [[336, 600]]}, "whole 336-pixel tiles"),
        ({"image_grid_pinpoints": []}, "non-empty list"),
        ({"vision_feature_select_strategy": "full"}, "must be 'default'"),
        ({"text_config": {"model_type": "qwen2"}}, "'qwen2' is not supported"),
        ({"vision_feature_layer": 30}, "out of range"),
        ({"model_type": "llava"}, "not 'llava_next'"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        LlavaNextConfig.from_hf({**copy.deepcopy(VICUNA_7B), **change})


def test_llama_keeps_refusing_a_sliding_window():
    assert LlamaConfig.from_hf({"model_type": "llama", "sliding_window": 8}).sliding_window is None
    with pytest.raises(ValueError, match="no sliding window"):
        LlamaConfig(sliding_window=8)


def test_sliding_window_mask_counts_each_rows_own_slot():
    # rows at slots 5 and 2 of one decode step, window 3: row 0 sees 3..5, row 1 sees 0..2
    mask = causal_mask(None, torch.tensor([[5], [2]]), 6, window=3)
    assert mask.shape == (2, 1, 1, 6)
    assert mask[:, 0, 0].tolist() == [
        [False, False, False, True, True, True],
        [True, True, True, False, False, False],
    ]
    assert torch.equal(causal_mask(None, torch.arange(4), 4), torch.ones(4, 4).tril().bool()[None, None])


# ---------------------------------------------------------------------------------------------
# Geometry and the processor
# ---------------------------------------------------------------------------------------------


def test_geometry_equals_the_reference_for_many_sizes(checkpoint):
    from transformers.image_processing_utils import select_best_resolution

    _, _, proc, vlm = checkpoint
    rng = random.Random(0)
    sizes = [(rng.randint(1, 400), rng.randint(1, 400)) for _ in range(300)] + [(1, 400), (400, 1), (30, 60)]
    for h, w in sizes:
        assert best_resolution((h, w), LLAVA_NEXT_PINPOINTS) == tuple(
            select_best_resolution((h, w), LLAVA_NEXT_PINPOINTS)
        )
        want = proc._get_number_of_features(h, w, 30, 30) - 1  # "default" drops the class token
        assert vlm.processor.tokens_for((h, w), 30, 30) == want == vlm.model.tokens_for((h, w)), (h, w)


def test_processor_equals_transformers_on_three_aspect_ratios_and_text(checkpoint):
    _, _, proc, vlm = checkpoint
    for side in ("left", "right"):
        want = batch(proc, side)
        vlm.tokenizer.padding_side = side
        got = vlm.processor(text=TEXTS, images=PICTURES, padding=True)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
            assert torch.equal(got[key], value), key
    counts = [vlm.model.tokens_for(size) for size in got["image_sizes"].tolist()]
    assert len(set(counts)) == 3  # each aspect ratio takes its own count of image tokens
    assert int((got["input_ids"] == vlm.processor.image_token_id).sum()) == sum(counts)


def test_image_processor_equals_transformers_at_the_published_size():
    from transformers import LlavaNextImageProcessorPil

    ref = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=PINPOINTS_336,
    )
    ours = AnyResImageProcessor.from_dict(ref.to_dict() | {"image_processor_type": "LlavaNextImageProcessor"})
    images = [picture(3, (300, 500)), picture(4, (900, 200)), Image.new("RGBA", (120, 130), (9, 200, 40, 90))]
    want = ref(images, return_tensors="pt")
    pixels, sizes = ours.tiles(images)
    assert pixels.shape == want["pixel_values"].shape  # (3, 5, 3, 336, 336): zero-padded to 5 views
    assert max_diff(pixels, want["pixel_values"]) < 1e-6
    assert torch.equal(sizes, want["image_sizes"])


# ---------------------------------------------------------------------------------------------
# The model against transformers
# ---------------------------------------------------------------------------------------------


def test_logits_and_loss_match_transformers(checkpoint):
    _, hf, proc, vlm = checkpoint
    inputs = batch(proc)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = hf(**inputs, labels=labels)
        out = vlm.model(**inputs, labels=labels)
    diff = max_diff(out.logits, ref.logits, inputs["attention_mask"])
    print(f"max |logit diff| ({vlm.model.config.text_config.model_type}): {diff:.2e}")
    assert diff < TOL
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5


def test_image_features_are_the_references(checkpoint):
    _, hf, proc, vlm = checkpoint
    inputs = batch(proc)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        ours = vlm.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert [f.shape for f in ours] == [f.shape for f in ref.pooler_output]
    assert max(max_diff(a, b) for a, b in zip(ours, ref.pooler_output, strict=True)) < TOL


def test_the_newline_vector_is_read(checkpoint):
    """The comparison is sensitive to the learned newline: nudged by 1e-2, the logits move past the tolerance."""
    _, hf, proc, vlm = checkpoint
    inputs = batch(proc)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        vlm.model.image_newline.add_(1e-2)
        try:
            after = vlm.model(**inputs).logits
        finally:
            vlm.model.image_newline.sub_(1e-2)
    assert max_diff(after, before, inputs["attention_mask"]) > 10 * TOL


def test_the_runner_encodes_each_picture_at_its_own_view_count(checkpoint):
    """The engine's `plan` / `encode` take each picture's own views (no padding views through the tower)
    with its size, and give the picture's token features, newlines included, as the forward computes them."""
    _, _, _, vlm = checkpoint
    model = vlm.model
    inputs = vlm.inputs("Compare them.", PICTURES)
    plan = model.plan(inputs)
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    views = [len(item.pixels) for item in plan.items]
    assert views == [model.tiles_for(s) for s in sizes] == [5, 4, 4]  # the processor padded them all to 5
    assert [item.meta["image_size"] for item in plan.items] == sizes
    seen = []
    hook = model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    try:
        with torch.no_grad():
            features = model.encode(plan.items)
    finally:
        hook.remove()
    assert seen == [sum(views)]  # one run of the tower over the real views only
    with torch.no_grad():
        want = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert [f.shape[0] for f in features] == [model.tokens_for(s) for s in sizes]
    assert [f.shape for f in features] == [w.shape for w in want]
    assert max(max_diff(f, w) for f, w in zip(features, want, strict=True)) < 1e-5
    assert [len(item.positions) for item in plan.items] == [f.shape[0] for f in features]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_transformers_on_the_batch(checkpoint, num_beams):
    _, hf, proc, vlm = checkpoint
    inputs = batch(proc)
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        want = hf.generate(**inputs, **settings)
    assert vlm.model.generate(**inputs, **settings).tolist() == want.tolist()


def test_sampling_matches_transformers_from_the_same_seed(checkpoint):
    _, hf, proc, vlm = checkpoint
    inputs = batch(proc)
    settings = dict(max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=1.3, pad_token_id=0)
    torch.manual_seed(11)
    with torch.no_grad():
        want = hf.generate(**inputs, **settings)
    torch.manual_seed(11)
    assert vlm.model.generate(**inputs, **settings).tolist() == want.tolist()


def test_checkpoint_layouts_load_alike(checkpoint, tmp_path):
    """Published (`vision_tower.vision_model.*`), transformers 5 in-memory (`model.*`) and vlmkit-saved
    folders load to the same model; what vlmkit saves, transformers loads."""
    folder, hf, proc, vlm = checkpoint
    published = tmp_path / "published"
    published.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (published / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(folder / "model.safetensors"))
    sd = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in sd.items()}
    save_file(sd, str(published / "model.safetensors"), metadata={"format": "pt"})
    in_memory = save_state_dict_layout(hf, tmp_path / "in_memory", folder)
    saved = tmp_path / "saved"
    vlm.model.save_pretrained(saved)
    from transformers import LlavaNextForConditionalGeneration

    reloaded = LlavaNextForConditionalGeneration.from_pretrained(saved).eval()
    inputs = batch(proc)
    with torch.no_grad():
        want = hf(**inputs).logits
        for model in (vlmkit.load_model(published), vlmkit.load_model(in_memory), reloaded):
            assert max_diff(model(**inputs).logits, want, inputs["attention_mask"]) < TOL


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(checkpoint):
    _, _, proc, vlm = checkpoint
    model, p = vlm.model, vlm.processor
    with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
        p(text=["<image>\nhi"], images=PICTURES[:2])
    with pytest.raises(ValueError, match="truncation cut into an image"):
        p(text=["<image>\nhi"], images=PICTURES[:1], truncation=True, max_length=20)
    with pytest.raises(ValueError, match="torch tensors only"):
        p(text=["<image>\nhi"], images=PICTURES[:1], return_tensors="np")
    inputs = vlm.inputs("Describe it.", PICTURES[:2])
    ids, pixels, sizes = inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
    with pytest.raises(ValueError, match="need image_sizes"):
        model(ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="hold 2 pictures but image_sizes 1"):
        model(ids, pixel_values=pixels, image_sizes=sizes[:1])
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids, pixel_values=pixels, image_sizes=sizes.float())
    with pytest.raises(ValueError, match="takes 5 views but pixel_values hold 2"):
        model(ids, pixel_values=pixels[:, :2], image_sizes=sizes)
    with pytest.raises(ValueError, match="hold 10 views but the 2 pictures"):
        model(ids, pixel_values=pixels.flatten(0, 1), image_sizes=sizes)  # padding views counted as real
    with pytest.raises(ValueError, match="image tokens do not match"):
        model(ids[:, 3:], pixel_values=pixels, image_sizes=sizes)
    with pytest.raises(ValueError, match="image tokens do not match"):
        model(
            ids, pixel_values=pixels, image_sizes=torch.tensor([[40, 40], [28, 70]])
        )  # a size of another count
    with pytest.raises(ValueError, match="no pixel_values"):
        model.generate(ids, image_sizes=sizes)
    with pytest.raises(ValueError, match="image tokens do not match"):
        model.plan({"input_ids": ids})
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        AnyResImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="whole 30-pixel tiles"):
        AnyResImageProcessor.from_dict(
            {
                "image_processor_type": "LlavaNextImageProcessor",
                "crop_size": 30,
                "image_grid_pinpoints": [[30, 45]],
            }
        )


# ---------------------------------------------------------------------------------------------
# Everywhere the other families go: the engine, chat, fine-tuning, quantization, info / convert
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("together", [False, True], ids=["arriving", "joining-together"])
def test_engine_batches_pictures_of_different_sizes_with_both_caches(checkpoint, together):
    """Requests arriving while the engine runs, or all queued before it starts (the first three then run as
    one prefill of pictures with different tile counts, padded on the right)."""
    _, _, _, vlm = checkpoint
    jobs = [
        ("Describe the picture.", PICTURES[:1]),
        ("Compare these two, please.", PICTURES[1:]),
        ("Just some text, no picture.", []),
        ("Describe the picture.", PICTURES[:1]),  # the same again: feature and prefix cache hits
        ("Now the tall one alone.", PICTURES[2:]),  # a picture seen before, in another prompt
    ]
    lengths = [6, 3, 7, 5, 4]
    # streamed, as the engine detokenizes: a whole-answer decode can differ on runs of invalid UTF-8 bytes
    want = [
        "".join(vlm.stream(p, images=ims, max_new_tokens=n))
        for (p, ims), n in zip(jobs, lengths, strict=True)
    ]
    texts = [""] * len(jobs)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=3, max_seq_len=320, prefix_block=8)
    if not together:
        engine.start()
    try:
        requests = []
        for i, ((p, ims), n) in enumerate(zip(jobs, lengths, strict=True)):

            def emit(ev, i=i):
                texts[i] += ev.text

            requests.append(
                Request(inputs=vlm.inputs(p, ims), params=SamplingParams(max_tokens=n), emit=emit)
            )
            engine.submit(requests[-1])
        if together:
            engine.start()
        assert all(r.done.wait(60) for r in requests)
    finally:
        engine.stop(10)
    assert texts == want
    assert engine.features.hits >= 1  # the tall picture's features, for the last prompt
    assert engine.prefix.hit_tokens >= vlm.model.tokens_for((40, 52))  # the repeated prompt's picture


def test_server_answers_pictures_of_different_sizes_at_once(checkpoint):
    """Three chat requests at once over HTTP, pictures of three sizes: each answer is the streamed chat's."""
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import Live, data_uri

    _, _, _, vlm = checkpoint
    conversations = [
        [{"type": "image_url", "image_url": {"url": data_uri(im)}}, {"type": "text", "text": f"Picture {i}?"}]
        for i, im in enumerate(PICTURES)
    ]
    conversations[2] = conversations[0][:1] + conversations[2]  # two pictures in one request
    want = [
        "".join(vlm.stream_chat([{"role": "user", "content": c}], max_new_tokens=5)) for c in conversations
    ]
    live = Live(vlm, name="llava-next", engine_kw={"max_seq_len": 400})
    try:

        def ask(content):
            reply = live.client.chat.completions.create(
                model="llava-next",
                messages=[{"role": "user", "content": content}],
                max_tokens=5,
                temperature=0,
            )
            return reply.choices[0].message.content

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, conversations))
    finally:
        live.close()
    assert got == want


def test_chat_and_stream(checkpoint):
    _, _, _, vlm = checkpoint
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": PICTURES[1]}, {"type": "text", "text": "Hi?"}],
        }
    ]
    prompt = vlm.processor.apply_chat_template(messages)
    assert prompt == "USER: <image>\nHi? ASSISTANT:"
    answer = vlm.chat(messages, max_new_tokens=5)
    assert answer == vlm.generate(prompt, images=PICTURES[1:2], max_new_tokens=5)
    assert "".join(vlm.stream_chat(messages, max_new_tokens=5)) == answer


def test_a_folder_without_a_template_takes_its_decoders_format(checkpoint, tmp_path):
    folder, hf, _, _ = checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folder.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).write_bytes(f.read_bytes())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = vlmkit.load_processor(bare).apply_chat_template(messages)
    mistral = hf.config.text_config.model_type == "mistral"
    assert prompt == ("[INST] <image>\nHi? [/INST]" if mistral else "USER: <image>\nHi? ASSISTANT:")


def write_dataset(folder, n: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        PICTURES[i % 3].save(folder / f"img{i}.png")
        turns = [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": ["a circle", "a star"][i % 2]},
        ]
        rows.append({"id": i, "image": f"img{i}.png", "conversations": turns})
    rows.append(
        {"id": n, "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]}
    )
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_training_samples_are_the_processors_inputs(checkpoint, tmp_path):
    _, _, _, vlm = checkpoint
    samples, report = load_conversations(write_dataset(tmp_path), vlm.processor, max_length=512)
    assert report.kept == 5
    sample = samples[1]
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    )
    direct = vlm.processor(text=text, images=[PICTURES[1]])
    assert sample.input_ids[: direct["input_ids"].shape[1]].tolist() == direct["input_ids"][0].tolist()
    learned = vlm.tokenizer.decode(sample.input_ids[sample.labels != -100].tolist(), skip_special_tokens=True)
    assert learned.strip() == "a star"
    assert torch.equal(sample.image_inputs["image_sizes"], direct["image_sizes"])  # a field, not an attribute
    assert torch.equal(sample.pixel_values, direct["pixel_values"])
    assert not hasattr(sample.pixel_values, "image_sizes") and samples[-1].image_inputs == {}
    batch_ = collate(samples, pad_token_id=0)
    assert batch_["pixel_values"].shape[:2] == (4, 5) and batch_["image_sizes"].tolist()[:2] == [
        [40, 52],
        [28, 70],
    ]
    with torch.no_grad():
        assert torch.isfinite(vlm.model(**batch_).loss)
    bare = dataclasses.replace(samples[1], image_inputs={})
    with pytest.raises(ValueError, match=r"row 2: .* need image_sizes \(1, 2\) for its 1 pictures; got None"):
        collate([samples[0], bare], pad_token_id=0)


@pytest.mark.parametrize("train", ["lora", "full"])
def test_finetune_runs_and_the_result_loads(checkpoint, tmp_path, train):
    folder, _, _, _ = checkpoint
    result = finetune(
        FinetuneConfig(
            data=str(write_dataset(tmp_path / "data")),
            output_dir=str(tmp_path / "out"),
            model=str(folder),
            train=train,
            max_steps=3,
            batch_size=5,
            lr=3e-2 if train == "lora" else 3e-3,
            progress=False,
        )
    )
    assert len(result.losses) == 3 and result.losses[-1] < result.losses[0]
    if train == "full":
        vlm = vlmkit.VLM.load(tmp_path / "out" / "final")
        assert isinstance(vlm.model, LlavaNextModel)
        assert isinstance(vlm.generate("Describe it.", images=PICTURES[:1], max_new_tokens=3), str)


def test_projector_training_trains_the_newline_vector(checkpoint):
    """train="projector" trains the projector and `image_newline`, a parameter of the model itself (parts
    name parameters as well as modules); nothing else."""
    folder = checkpoint[0]
    model = select_trainable(
        vlmkit.load_model(folder, inference=False),
        FinetuneConfig(data="", output_dir="", model="x", train="projector"),
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "image_newline" in trained
    assert trained - {"image_newline"} == {
        n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.")
    }


def test_random_init_starts_the_newline_as_the_reference_does(checkpoint):
    folder = checkpoint[0]
    from vlmkit.models import init_model

    config = json.loads((folder / "config.json").read_text())
    model = init_model(config, seed=3)
    assert isinstance(model, LlavaNextModel)
    std = model.image_newline.std().item()
    assert 0.5 < std * 48**0.5 < 1.5  # normal with std 1/sqrt(hidden size), not the 0.02 of the matrices
    assert torch.equal(init_model(config, seed=3).image_newline, model.image_newline)


def test_int8_logits_equal_transformers_with_the_dequantized_weights(checkpoint):
    _, hf, proc, _ = checkpoint
    folder = checkpoint[0]
    model = vlmkit.load_model(folder, quantize="int8", inference=False)
    assert (
        sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * 3 + 1
    )  # every decoder linear + head
    ref = dequantized_reference(hf, model)
    inputs = batch(proc)
    with torch.no_grad():
        assert max_diff(model(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"]) < TOL


def test_info_and_convert(checkpoint, tmp_path):
    folder, hf, proc, vlm = checkpoint
    info = info_command(str(folder))
    assert info["model_type"] == "llava_next"
    assert set(info["parts"]) == {"vision_tower", "multi_modal_projector", "image_newline", "language_model"}
    assert info["parts"]["image_newline"] == hf.config.text_config.hidden_size
    assert info["parameters"] == sum(info["parts"].values()) == sum(p.numel() for p in hf.parameters())
    out = convert_command(str(folder), str(tmp_path / "int8"), quantize="int8")
    quantized = vlmkit.VLM.load(out)
    assert isinstance(quantized.processor, type(vlm.processor))
    assert isinstance(quantized.generate("Describe it.", images=PICTURES[:1], max_new_tokens=3), str)
