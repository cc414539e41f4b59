"""Tokenizer from a checkpoint's `tokenizer.json` (the `tokenizers` library), its special tokens, padding,
truncation, decoding, and chat templates rendered with jinja2.

BOS/EOS come from tokenizer.json's post-processor, as transformers 5 does (it ignores `add_bos_token` /
`add_eos_token` in tokenizer_config.json). Special tokens, padding side, truncation side and the pad id come
from tokenizer_config.json and special_tokens_map.json.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer

from vlmkit.weights import read_config_file

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(token: Any) -> str | None:
    """A special token as written in the configs: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


class Tokenizer:
    """Encode, pad, truncate and decode like the checkpoint's reference tokenizer."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            bos_token,
            eos_token,
            unk_token,
            pad_token,
        )
        self.additional_special_tokens = list(additional_special_tokens)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self._lock = threading.Lock()  # the backend's truncation setting is per call

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            if (folder / "tokenizer.model").is_file():
                raise FileNotFoundError(
                    f"{folder} has only a SentencePiece tokenizer.model; vlmkit reads tokenizer.json. Produce it once "
                    f"with transformers: `AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')` "
                    f"(this writes tokenizer.json next to it)."
                )
            raise FileNotFoundError(f"{path} not found: the checkpoint folder needs tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read {path}: {e}. Re-download or re-save the tokenizer.") from e
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins where both say
            if (folder / name).is_file():
                config.update(read_config_file(folder / name))
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        max_len = config.get("model_max_length")
        return cls(
            backend,
            **{name: _content(config.get(name)) for name in SPECIAL_NAMES},
            additional_special_tokens=[_content(t) for t in extra],
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
            chat_template=template,
        )

    # -- ids ------------------------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def convert_tokens_to_ids(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        named = [getattr(self, n) for n in SPECIAL_NAMES]
        return list(dict.fromkeys(t for t in [*named, *self.additional_special_tokens] if t))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.backend.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Tokenize a string or a batch. padding: False, True / "longest", or "max_length"; truncation to
        max_length (special tokens included) from `truncation_side`. Returns input_ids and attention_mask
        as LongTensors (B, T) with return_tensors="pt", else lists."""
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if truncation and max_length is None:
            max_length = self.model_max_length
            if max_length is None:
                raise ValueError(
                    "truncation=True needs max_length (the tokenizer config sets no model_max_length)"
                )
        with self._lock:
            if truncation:
                self.backend.enable_truncation(max_length, direction=self.truncation_side)
            else:
                self.backend.no_truncation()
            try:
                ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
            finally:
                self.backend.no_truncation()
        masks = [[1] * len(row) for row in ids]
        if padding not in (False, "do_not_pad"):
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                target = max_length
            else:
                target = max(len(row) for row in ids)
            ids, masks = self.pad(ids, target)
        elif return_tensors == "pt" and len({len(row) for row in ids}) > 1:
            raise ValueError("the texts have different lengths: pass padding=True to return one tensor")
        if return_tensors == "pt":
            input_ids = torch.tensor(ids, dtype=torch.long)
            padded = any(0 in row for row in masks)  # else the mask is all ones, made without a list
            mask = torch.tensor(masks, dtype=torch.long) if padded else torch.ones_like(input_ids)
            return {"input_ids": input_ids, "attention_mask": mask}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return {"input_ids": ids, "attention_mask": masks}

    def pad(self, ids: list[list[int]], length: int) -> tuple[list[list[int]], list[list[int]]]:
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError(
                f"padding needs a pad token, but the tokenizer has none (pad_token={self.pad_token!r}); set "
                f"pad_token in tokenizer_config.json, or pass one text at a time"
            )
        out_ids, out_mask = [], []
        for row in ids:
            n = max(0, length - len(row))
            if self.padding_side == "left":
                out_ids.append([pad_id] * n + row)
                out_mask.append([0] * n + [1] * len(row))
            else:
                out_ids.append(row + [pad_id] * n)
                out_mask.append([1] * len(row) + [0] * n)
        return out_ids, out_mask

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, rows: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=...")
        return render_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            unk_token=self.unk_token or "",
            pad_token=self.pad_token or "",
            **extra,
        )


class ChatTemplateError(ValueError):
    """A chat template refused the messages (its `raise_exception`) or could not be rendered."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def render_template(template: str, messages: list[dict[str, Any]], **context: Any) -> str:
    """Render a Hugging Face chat template: jinja2 sandbox, trim_blocks + lstrip_blocks, `raise_exception`,
    `strftime_now` and a `tojson` that keeps non-ASCII characters. Compiled templates are cached."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, **context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class IncrementalDecoder:
    """Text deltas from token ids arriving one at a time. A delta is released only when it does not end in
    an incomplete UTF-8 sequence (U+FFFD), and it keeps the spaces a whole-sequence decode would have: each
    step decodes from a few tokens back, so tokenizers that drop a leading space stay consistent.
    The concatenated deltas plus `flush()` equal `tokenizer.decode(all_ids)`, with one exception: a run of
    byte-fallback tokens (`<0x7A>`) that is not valid UTF-8 as a whole, which the tokenizer's decoder turns
    into one U+FFFD per byte, also the bytes of characters already released (`[<0x7A>, <0xC7>]` decodes to
    "\ufffd\ufffd"; the deltas say "z\ufffd"). Holding every byte run back until it ends would stall streams
    of text written in byte tokens (CJK in LLaMA's vocabulary), so released text is kept."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this have been released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        now = self._decode(self.ids[self.prefix_offset :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        now = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(before) :]
