"""The high-level API: a model and its processor, and one-line generate / stream / chat for both families.

vlm = vlmkit.VLM.load("llava-hf/vip-llava-7b-hf", dtype="bfloat16")
vlm.generate("What is inside the red box?", images=["photo.png"], max_new_tokens=64)
for delta in vlm.stream("Describe the image.", images=["photo.png"]):
    print(delta, end="")
vlm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                       {"type": "text", "text": "What shape is this?"}]}])
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from vlmkit.adapters import AdapterSet
from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS
from vlmkit.models import family_of, load_model, load_processor, stop_token_ids
from vlmkit.quant import QuantConfig
from vlmkit.structured import CONSTRAINT_FIELDS, constraint_from
from vlmkit.tokenizer import IncrementalDecoder


def user_turn(text: str, images: Sequence[Any] = ()) -> dict[str, Any]:
    """One user message for `VLM.chat`: the images, then the text."""
    return {
        "role": "user",
        "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}],
    }


class VLM:
    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.adapters: AdapterSet | None = None  # LoRA adapters answered with by name

    @classmethod
    def load(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        batched: bool = False,
        quantize: str | QuantConfig | None = None,
        group_size: int | None = None,
        quantize_parts: Sequence[str] = (),
        tp: int = 1,
        adapters: dict[str, str | os.PathLike] | None = None,
    ) -> VLM:
        """A checkpoint folder, hub id or built-in demo model ("demo", "demo-idefics"); batched: the CPU weight
        layout for many rows at a time; quantize: "int8" or "int4" weights; tp: split over this many
        processes, every one of them making this call under torchrun (see `load_model`); adapters: {name: peft
        LoRA folder} to answer with by name (`chat(..., adapter=name)`), never merged into the weights."""
        model = load_model(
            path_or_repo_id,
            dtype=dtype,
            device=device,
            progress=progress,
            batched=batched,
            quantize=quantize,
            group_size=group_size,
            quantize_parts=tuple(quantize_parts),
            tp=tp,
        )
        vlm = cls(model, load_processor(path_or_repo_id))
        for name, path in (adapters or {}).items():
            vlm.add_adapter(name, path)
        return vlm

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve a peft LoRA folder under `name`: `generate(..., adapter=name)` and the like answer with it."""
        if self.adapters is None:
            self.adapters = AdapterSet(self.model, max_loaded=8)
        self.adapters.add(name, path)

    @property
    def device(self) -> torch.device:
        # a parameter is found once (walking the module tree costs more than building a small prompt); moving
        # the model moves it too, so its device stays the model's
        first = self.__dict__.get("_first_parameter")
        if first is None:
            first = self.__dict__["_first_parameter"] = next(self.model.parameters())
        return first.device

    # -- inputs ---------------------------------------------------------------------------------

    def inputs(self, prompt: str, images: Sequence[Any] | None = None, *, allow_remote: bool = False) -> dict:
        """Processor outputs for a prompt with `<image>` markers where the images go (none: images first)."""
        family = family_of(self.processor)
        out = family.prompt_inputs(self.processor, prompt, list(images or []), allow_remote=allow_remote)
        device = self.device
        return {k: v.to(device) for k, v in out.items()}

    def chat_inputs(self, messages: list[dict[str, Any]], *, allow_remote: bool = False) -> dict:
        out = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, allow_remote=allow_remote
        )
        device = self.device
        return {k: v.to(device) for k, v in out.items()}

    def _settings(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """Defaults for people: a longer budget, and the family's end-of-turn tokens also end a reply; the
        OpenAI / vLLM names of a constraint (response_format, guided_json, guided_regex, guided_grammar,
        guided_choice) become generate's `constraint`."""
        sampling.pop("adapter", None)  # applied around the call (`_adapter`)
        named = {k: sampling.pop(k) for k in CONSTRAINT_FIELDS if k in sampling}
        if named:
            if "constraint" in sampling:
                raise ValueError(f"pass constraint= or {sorted(named)}, not both")
            sampling["constraint"] = constraint_from(**named)
        settings = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **sampling}
        if settings.get("eos_token_id") is None:
            eos = stop_token_ids(self.tokenizer, family_of(self.model))
            if eos:
                settings["eos_token_id"] = eos
        if settings.get("pad_token_id") is None and self.tokenizer.pad_token_id is not None:
            settings["pad_token_id"] = self.tokenizer.pad_token_id
        return settings

    # -- generation -----------------------------------------------------------------------------

    def _adapter(self, name: str | None) -> Any:
        """The context in which the model answers with adapter `name` (None: the base model)."""
        if name is None:
            return nullcontext()
        if self.adapters is None or name not in self.adapters.names():
            known = self.adapters.names() if self.adapters is not None else []
            raise ValueError(f"no adapter named {name!r}; loaded: {known} (VLM.load(..., adapters=...))")
        return self.adapters.rows([self.adapters.get(name)])

    def generate_from_inputs(self, inputs: dict, **sampling: Any) -> str | list[str]:
        adapter = sampling.get("adapter")
        settings = self._settings(sampling)
        with self._adapter(adapter):
            out = self.model.generate(**inputs, tokenizer=self.tokenizer, **settings)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts[0] if len(texts) == 1 else texts

    def stream_from_inputs(self, inputs: dict, **sampling: Any) -> Iterator[str]:
        with self._adapter(sampling.get("adapter")):
            yield from self._stream(inputs, sampling)

    def _stream(self, inputs: dict, sampling: dict[str, Any]) -> Iterator[str]:
        settings = self._settings(sampling)
        if settings.get("num_return_sequences", 1) != 1:
            raise ValueError("stream() yields one sequence: num_return_sequences must be 1")
        decoder = IncrementalDecoder(self.tokenizer)
        eos = set(settings.get("eos_token_id") or [])
        for tokens in self.model.stream_tokens(**inputs, tokenizer=self.tokenizer, **settings):
            token = int(tokens[0])
            if token in eos:
                break
            delta = decoder.push(token)
            if delta:
                yield delta
        tail = decoder.flush()
        if tail:
            yield tail

    def generate(
        self, prompt: str, images: Sequence[Any] | None = None, *, allow_remote: bool = False, **sampling: Any
    ) -> str | list[str]:
        """The answer to one prompt (a list of answers with num_return_sequences > 1)."""
        return self.generate_from_inputs(self.inputs(prompt, images, allow_remote=allow_remote), **sampling)

    def stream(
        self, prompt: str, images: Sequence[Any] | None = None, *, allow_remote: bool = False, **sampling: Any
    ) -> Iterator[str]:
        """Text deltas of the answer as they are generated; never half a UTF-8 character."""
        return self.stream_from_inputs(self.inputs(prompt, images, allow_remote=allow_remote), **sampling)

    def chat(
        self, messages: list[dict[str, Any]], *, allow_remote: bool = False, **sampling: Any
    ) -> str | list[str]:
        """The assistant's reply to OpenAI-style messages, through the checkpoint's chat template."""
        return self.generate_from_inputs(self.chat_inputs(messages, allow_remote=allow_remote), **sampling)

    def stream_chat(
        self, messages: list[dict[str, Any]], *, allow_remote: bool = False, **sampling: Any
    ) -> Iterator[str]:
        return self.stream_from_inputs(self.chat_inputs(messages, allow_remote=allow_remote), **sampling)
