"""Continuous batching for one model: requests join and leave the running batch between decode steps.

Every running sequence owns one row of a preallocated KV cache (`RowKVCache`): its prompt sits in slots
0..L-1 and each step writes its new token at its own next slot, so rows of any length decode together in
one forward with a per-row mask and per-row rotary positions, and nobody waits for the slowest.

A joining request's prompt runs alone, straight into a free row. Two caches spare it work:
- `PrefixCache`: the keys/values of blocks of prompts (and answers) already run, keyed by a hash chained
  over the tokens and pictures up to each block; a prompt that starts like an earlier one (the same picture
  and template, a follow-up turn) copies those blocks and runs only the rest.
- `FeatureCache`: vision features keyed by the pixels' hash. The new pictures of all requests joining in
  the same round go through the vision tower together; pictures whose tokens all lie in reused blocks are
  not needed at all.
The engine runs in one thread; callers get their events through a callback.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.generation import GenerationConfig, process_logits, sample
from vlmkit.idefics.model import CrossContext, IdeficsModel
from vlmkit.llama import check_text_inputs
from vlmkit.modules import optimize_for_cpu_inference
from vlmkit.tokenizer import IncrementalDecoder
from vlmkit.vipllava.model import VipLlavaModel


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; try again later."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1

    def config(self, eos: list[int], pad: int | None) -> GenerationConfig:
        config = GenerationConfig(
            max_new_tokens=self.max_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_k=None,
            top_p=self.top_p,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        config.validate()
        return config


@dataclass
class Event:
    """What a request hears: a text delta of choice `index`, then its end (finish_reason "stop" or
    "length", or "error" with a message)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    inputs: dict[str, torch.Tensor]  # processor output for one prompt (batch of 1)
    params: SamplingParams
    emit: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which the request is cut off
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    completion_tokens: int = 0
    open_rows: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Row:
    """One running sequence (a request's choice) in one cache row."""

    request: Request
    index: int  # choice index
    config: GenerationConfig
    sequence: torch.Tensor  # (1, prompt + generated) token ids, for repetition-style processors
    length: int  # tokens in the cache (its next token goes to slot `length`)
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    text: str = ""
    generated: int = 0
    pending: int | None = None  # the token sampled but not yet run through the model
    finished: bool = False
    prompt: Prompt | None = None


@dataclass
class Prompt:
    """A joining request's prompt as planned: its pictures' keys and which of them the part after the
    cached blocks still needs, its block hashes and the cached blocks it starts with."""

    ids: torch.Tensor  # (1, L)
    pixels: list[torch.Tensor]  # one (C, H, W) per picture
    keys: list[str]
    needed: list[bool]
    marks: dict[int, bytes]
    hashes: list[bytes]
    reused: list[torch.Tensor]
    answer_sees: list[int] = field(default_factory=list)  # IDEFICS: the pictures generated tokens attend to

    def needed_features(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [features[k] for k, need in zip(self.keys, self.needed, strict=True) if need]


class RowKVCache(torch.nn.Module):
    """A KV cache (B, Hkv, S, D) whose rows write at their own slots: `positions` (n,) set per decode step.
    While `prompt_row` is set, a prompt (1, Hkv, T, D) is written into that row at `input_pos`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.positions: torch.Tensor | None = None
        self.prompt_row: int | None = None

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.prompt_row
        if r is not None:
            self.k[r].index_copy_(1, input_pos, k[0])
            self.v[r].index_copy_(1, input_pos, v[0])
            return self.k[r : r + 1, :, :key_len], self.v[r : r + 1, :, :key_len]
        n = k.shape[0]
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, self.positions] = k[:, :, 0]
        self.v[rows, :, self.positions] = v[:, :, 0]
        return self.k[:n, :, :key_len], self.v[:n, :, :key_len]


class FeatureCache:
    """LRU of per-image vision features keyed by the preprocessed pixels' SHA-256."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.size <= 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class PrefixCache:
    """Keys/values of whole blocks of `block` tokens, for every layer at once (layers, 2, Hkv, block, D),
    keyed by a hash chained over everything up to the block's end: the token ids and, where a block holds
    a picture's tokens, the picture (`marks`). A block is reusable exactly when its hash matches, because
    its keys/values depend on nothing else. LRU within `capacity` blocks; a hit refreshes its chain from
    the end back to the start, so chains are evicted from their deep end first."""

    def __init__(self, capacity: int, block: int) -> None:
        if block < 1:
            raise ValueError(f"the prefix-cache block must be at least 1 token, got {block}")
        self.capacity, self.block = capacity, block
        self.items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens not run because their blocks were cached

    def hashes(self, ids: list[int], marks: dict[int, bytes]) -> list[bytes]:
        """One hash per whole block of `ids`; marks[b]: what else block b's keys/values depend on."""
        out, h = [], b""
        for b in range(len(ids) // self.block):
            chunk = ids[b * self.block : (b + 1) * self.block]
            h = hashlib.sha256(
                h + b"".join(i.to_bytes(8, "little", signed=True) for i in chunk) + marks.get(b, b"")
            )
            h = h.digest()
            out.append(h)
        return out

    def match(self, hashes: list[bytes]) -> list[torch.Tensor]:
        """The cached blocks of the longest cached start of `hashes`."""
        found = []
        for h in hashes:
            block = self.items.get(h)
            if block is None:
                break
            found.append(block)
        for h in reversed(hashes[: len(found)]):
            self.items.move_to_end(h)
        return found

    def put(self, hashes: list[bytes], blocks: Callable[[int], torch.Tensor]) -> None:
        """Keep the blocks of `hashes` not kept yet; blocks(b) gives block b's keys/values."""
        if self.capacity <= 0:
            return
        for b in reversed(range(len(hashes))):
            h = hashes[b]
            if h in self.items:
                self.items.move_to_end(h)
            else:
                self.items[h] = blocks(b).clone()
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class Engine:
    """Continuous batching over `model` (ViP-LLaVA / LLaVA or IDEFICS) with its tokenizer.

    max_batch: rows decoded together; max_seq_len: prompt + completion tokens per row; max_queue: waiting
    requests before `submit` raises QueueFull; feature_cache: images whose features are kept;
    prefix_cache_mb: memory for the keys/values of prompt blocks kept for reuse (0: none), in blocks of
    prefix_block tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_seq_len: int = 512,
        max_queue: int = 64,
        max_images: int = 4,
        feature_cache: int = 256,
        prefix_cache_mb: float = 1024,
        prefix_block: int = 16,
    ) -> None:
        if not isinstance(model, (VipLlavaModel, IdeficsModel)):
            raise TypeError(
                f"the engine serves ViP-LLaVA/LLaVA and IDEFICS models, not {type(model).__name__}"
            )
        self.model, self.tokenizer = model, tokenizer
        if next(model.parameters()).device.type == "cpu":
            optimize_for_cpu_inference(model, batched=max_batch > 1)  # row-major: fastest for 2-64 rows
        self.idefics = isinstance(model, IdeficsModel)
        self.max_batch, self.max_seq_len, self.max_images = max_batch, max_seq_len, max_images
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.features = FeatureCache(feature_cache)
        self.rows: list[Row] = []
        self.eos = [
            i for i in (tokenizer.eos_token_id, tokenizer.token_to_id("<end_of_utterance>")) if i is not None
        ]
        self.pad = tokenizer.pad_token_id
        self.steps = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._setup_caches()
        layers, _, _, heads, _, dim = self.kv.shape
        block_bytes = layers * 2 * heads * prefix_block * dim * self.kv.element_size()
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20 // block_bytes), prefix_block)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="vlmkit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        n = request.params.n
        if n < 1 or n > self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch}, got {n}")
        request.prompt_tokens = int(request.inputs["input_ids"].shape[1])
        if request.prompt_tokens + request.params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({request.prompt_tokens} tokens) + max_tokens ({request.params.max_tokens}) exceeds "
                f"this server's limit of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )
        request.params.config(self.eos, self.pad)  # invalid sampling settings raise here
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting") from None
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def running(self) -> int:
        return len(self.rows)

    # -- the cache ------------------------------------------------------------------------------

    def _layers(self) -> torch.nn.ModuleList:
        return self.model.model.layers if self.idefics else self.model.language_model.model.layers

    def _setup_caches(self) -> None:
        """One tensor (layers, 2, max_batch, Hkv, max_seq_len, D) holds every row's keys and values, so a
        row's whole cache (or a block of it) moves in one copy."""
        w = next(self.model.parameters())
        attn = [layer.self_attn for layer in self._layers()]
        shapes = {(a.n_kv_heads, a.head_dim) for a in attn}
        if len(shapes) != 1:
            raise ValueError(f"the engine needs one key/value shape in every layer, got {sorted(shapes)}")
        ((heads, dim),) = shapes
        self.kv = torch.zeros(
            len(attn), 2, self.max_batch, heads, self.max_seq_len, dim, dtype=w.dtype, device=w.device
        )
        self.caches = [RowKVCache(self.kv[i, 0], self.kv[i, 1]) for i in range(len(attn))]
        # passed to every forward (kv_caches): the layers' own kv_cache stays free for a generate beside us
        self.cache_map = dict(zip(attn, self.caches, strict=True))
        self.cross: CrossContext | None = None  # IDEFICS: per-row keys/values, mask and gate, padded

    # -- planning: cached blocks and pictures ---------------------------------------------------

    def _plan(self, request: Request) -> Prompt:
        """Hash the prompt's blocks (with its pictures), find the cached start of it, and mark the
        pictures that the rest still needs."""
        inputs = request.inputs
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        check_text_inputs(ids, mask, None)
        if ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
            raise ValueError(
                f"the engine takes one unpadded prompt per request; got input_ids {tuple(ids.shape)}"
                + ("" if mask is None else f" with {int((mask == 0).sum())} padding positions")
            )
        px = inputs.get("pixel_values")
        iam = inputs.get("image_attention_mask")
        if self.idefics:
            self.model.check_inputs(ids, pixel_values=px, image_attention_mask=iam)
        pixels = [] if px is None else (list(px[0]) if self.idefics else list(px))
        keys = [FeatureCache.key(p) for p in pixels]
        marks: dict[int, bytes] = {}
        answer_sees: list[int] = []
        if keys and self.idefics:  # (check_inputs made sure the image mask is there and fits)
            # a token's keys/values depend on the pictures it attends to (and on earlier tokens)
            for t, n in iam[0].nonzero().tolist():
                self._mark(marks, t, keys[n])
            answer_sees = iam[0, -1].nonzero()[:, 0].tolist()
        elif keys:
            self.model.check_image_tokens(ids, len(keys))
            where = (ids[0] == self.model.config.image_token_index).nonzero()[:, 0].tolist()
            per = self.model.config.image_tokens_per_image
            for j, key in enumerate(keys):  # a picture's features fill its run of <image> tokens
                self._mark(marks, where[j * per], key)
            last = [where[(j + 1) * per - 1] for j in range(len(keys))]
        tokens = ids[0].tolist()
        hashes = self.prefix.hashes(tokens, marks)
        block = self.prefix.block
        reused = self.prefix.match(hashes)[: (len(tokens) - 1) // block]  # at least one token runs
        start = len(reused) * block
        if self.idefics:
            needed = [bool(iam[0, start:, n].any()) for n in range(len(keys))]
        else:
            needed = [last[j] >= start for j in range(len(keys))]
        return Prompt(ids, pixels, keys, needed, marks, hashes, reused, answer_sees)

    def _mark(self, marks: dict[int, bytes], t: int, key: str) -> None:
        """Note that token t's keys/values depend on the picture `key`."""
        b = t // self.prefix.block
        marks[b] = marks.get(b, b"") + t.to_bytes(4, "little") + key.encode()

    def _row_hashes(self, row: Row) -> list[bytes]:
        """Block hashes of everything in a row's cache: its prompt, then the answer tokens run so far (which
        attend to the pictures the last prompt token attends to)."""
        prompt = row.prompt
        marks = dict(prompt.marks)
        for t in range(prompt.ids.shape[1], row.length):
            for n in prompt.answer_sees:
                self._mark(marks, t, prompt.keys[n])
        return self.prefix.hashes(row.sequence[0, : row.length].tolist(), marks)

    def _keep_blocks(self, row: int, hashes: list[bytes]) -> None:
        """Give the prefix cache the blocks of cache row `row` that `hashes` name."""
        block = self.prefix.block
        self.prefix.put(hashes, lambda b: self.kv[:, :, row, :, b * block : (b + 1) * block])

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a stack of single images (K, C, H, W): LLaVA (K, P, C), IDEFICS states (K, S, C)."""
        if self.idefics:
            ones = torch.ones(pixels.shape[0], 1, 1, dtype=torch.long, device=pixels.device)
            return self.model.encode_images(pixel_values=pixels[:, None], image_attention_mask=ones)[:, 0]
        return self.model.get_image_features(pixels)

    def _features(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Features of every picture some joining prompt still needs: from the cache, or computed for all of
        them in one call of the vision tower."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            for key, p, need in zip(prompt.keys, prompt.pixels, prompt.needed, strict=True):
                if not need or key in found or key in todo:
                    continue
                hit = self.features.get(key)
                if hit is not None:
                    found[key] = hit
                else:
                    todo[key] = p
        if todo:
            computed = self._encode(torch.stack(list(todo.values())))
            for key, f in zip(todo, computed, strict=True):
                self.features.put(key, f)
                found[key] = f
        return found

    # -- joining --------------------------------------------------------------------------------

    def _run_prompt(
        self, request: Request, prompt: Prompt, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Run the prompt's uncached part straight into the next free row, after its cached blocks; give
        each further choice a copy of the row; keep the prompt's blocks. Returns the last logits (1, V)."""
        row, block = len(self.rows), self.prefix.block
        ids = prompt.ids
        L = ids.shape[1]
        again = self.prefix.match(prompt.hashes)[: (L - 1) // block]  # blocks kept since the plan
        if len(again) > len(prompt.reused):
            prompt.reused = again
        start = len(prompt.reused) * block
        if start:
            self.kv[:, :, row, :, :start] = torch.cat(prompt.reused, dim=3)
        pos = torch.arange(start, L, device=ids.device)
        kwargs = dict(
            attention_mask=None, position_ids=pos[None], input_pos=pos, key_len=L, kv_caches=self.cache_map
        )
        step_cross = None
        for cache in self.caches:
            cache.prompt_row = row
        try:
            if self.idefics:
                states = self._states(prompt, features)
                iam = request.inputs.get("image_attention_mask")
                cross = None if states is None else self.model.cross_context(states, iam[:, start:])
                base = self.model.model
                hidden = base(base.embed_tokens(ids[:, start:]), cross=cross, **kwargs)
                logits = self.model.lm_head(hidden[:, -1])
                if cross is not None:  # decode steps attend to what the last prompt token attends to
                    step = self.model.cross_context(states, iam[:, -1:], kv=cross.kv)
                    step_cross = (step.kv, step.mask, step.gate)
            else:
                rest = ids[:, start:]
                n_image = int((rest == self.model.config.image_token_index).sum())
                tail = None
                if n_image:  # the features of the image tokens after the cached blocks
                    tail = torch.cat(prompt.needed_features(features))[-n_image:][None]
                lm = self.model.language_model
                logits = lm(lm.model(self.model.embed_inputs(rest, tail), **kwargs)[:, -1])
        finally:
            for cache in self.caches:
                cache.prompt_row = None
        for j in range(1, request.params.n):
            self.kv[:, :, row + j, :, :L] = self.kv[:, :, row, :, :L]
        if self.idefics:
            self._join_cross(step_cross, row, request.params.n)
        self._keep_blocks(row, prompt.hashes)
        self.prefix.hit_tokens += start
        request.cached_tokens = start
        prompt.reused = []  # the row holds them now; let the cache alone decide their lifetime
        return logits

    def _states(self, prompt: Prompt, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """IDEFICS image states (1, N, S, C) for a prompt; pictures no remaining token attends to are zeros
        (masked out), and None when no remaining token attends to any."""
        have = prompt.needed_features(features)
        if not have:
            return None
        zeros = torch.zeros_like(have[0])
        return torch.stack(
            [features[k] if need else zeros for k, need in zip(prompt.keys, prompt.needed, strict=True)]
        )[None]

    def _join_cross(self, cross: tuple | None, first: int, n: int) -> None:
        """Copy a new row's image keys/values (or none) into the padded per-row cross context."""
        if cross is None and self.cross is None:
            return
        if cross is not None:
            kv, mask, gate = cross
            width = kv[0][0].shape[2]
            if self.cross is None or self.cross.mask.shape[-1] < width:
                self._grow_cross(kv, width)
        c = self.cross
        for j in range(n):
            r = first + j
            c.mask[r] = True  # a text-only row attends anywhere; its gate drops the output
            c.gate[r] = False
            if cross is None:
                continue
            for (k_all, v_all), (k, v) in zip(c.kv, kv, strict=True):
                k_all[r, :, : k.shape[2]] = k[0]
                v_all[r, :, : v.shape[2]] = v[0]
            c.mask[r] = False
            c.mask[r, ..., : mask.shape[-1]] = mask[0]
            c.gate[r] = gate[0]

    def _grow_cross(self, kv: list, width: int) -> None:
        old = self.cross
        B = self.max_batch
        new_kv = []
        for i, (k, v) in enumerate(kv):
            K = k.new_zeros(B, k.shape[1], width, k.shape[3])
            V = v.new_zeros(B, v.shape[1], width, v.shape[3])
            if old is not None:
                w = old.kv[i][0].shape[2]
                K[:, :, :w], V[:, :, :w] = old.kv[i][0], old.kv[i][1]
            new_kv.append((K, V))
        mask = torch.ones(B, 1, 1, width, dtype=torch.bool, device=kv[0][0].device)
        gate = torch.zeros(B, 1, dtype=torch.bool, device=kv[0][0].device)
        if old is not None:
            w = old.mask.shape[-1]
            mask[..., :w] = old.mask
            mask[..., w:] = ~old.gate[:, None, None, :]  # rows with images never see the new padding
            gate[:] = old.gate
        self.cross = CrossContext(kv=new_kv, mask=mask, gate=gate)

    def _admit(self) -> None:
        joining: list[Request] = []
        free = self.max_batch - len(self.rows)
        while free > 0:
            try:
                r = self.waiting.queue[0]
            except IndexError:
                break
            if r.params.n > free:
                break
            self.waiting.get_nowait()
            if r.cancelled.is_set():
                self._finish_request(r, "cancelled")
                continue
            joining.append(r)
            free -= r.params.n
        if not joining:
            return
        planned: list[tuple[Request, Prompt]] = []
        for r in joining:
            try:
                planned.append((r, self._plan(r)))
            except Exception as e:  # a malformed request fails alone
                self._finish_request(r, "error", e)
        try:
            features = self._features([prompt for _, prompt in planned])
        except Exception as e:  # a bad image batch: fail those requests, keep serving
            for r, _ in planned:
                self._finish_request(r, "error", e)
            return
        for r, prompt in planned:
            try:
                self._start_rows(r, prompt, features)
            except Exception as e:
                self._finish_request(r, "error", e)

    def _start_rows(self, request: Request, prompt: Prompt, features: dict[str, torch.Tensor]) -> None:
        ids = prompt.ids
        logits = self._run_prompt(request, prompt, features)
        config = request.params.config(self.eos, self.pad)
        request.open_rows = request.params.n
        seed = request.params.seed
        for j in range(request.params.n):
            gen = None
            if config.do_sample:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(seed + j if seed is not None else int(torch.randint(2**62, (1,))))
            row = Row(
                request=request,
                index=j,
                config=config,
                sequence=ids.clone(),
                length=ids.shape[1],
                decoder=IncrementalDecoder(self.tokenizer),
                generator=gen,
                prompt=prompt,
            )
            self.rows.append(row)
            self._take(row, logits[0])

    # -- decoding -------------------------------------------------------------------------------

    def _take(self, row: Row, logits: torch.Tensor) -> None:
        """Choose the row's next token from its logits (V,), emit its text, and mark the row finished or
        pending (its token runs through the model at the next step)."""
        config = row.config
        scores = process_logits(logits[None].float(), row.sequence, config, new_tokens=row.generated)
        token = int(sample(scores, config, row.generator)[0])
        req = row.request
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        row.generated += 1
        req.completion_tokens += 1
        if token in config.eos_token_id:
            self._end_row(row, "stop")
            return
        row.sequence = torch.cat([row.sequence, torch.tensor([[token]], device=row.sequence.device)], 1)
        delta = row.decoder.push(token)
        if delta:
            row.text += delta
            cut = self._stop_at(row)
            if cut is not None:
                keep = len(delta) - (len(row.text) - cut)
                if keep > 0:
                    req.emit(Event(row.index, delta[:keep]))
                row.text = row.text[:cut]
                self._end_row(row, "stop")
                return
            req.emit(Event(row.index, delta))
        if row.generated >= config.max_new_tokens:
            tail = row.decoder.flush()
            if tail:
                req.emit(Event(row.index, tail))
            self._end_row(row, "length")
            return
        row.pending = token

    @staticmethod
    def _stop_at(row: Row) -> int | None:
        stops = [row.text.find(s) for s in row.request.params.stop if s and s in row.text]
        return min(stops) if stops else None

    def _end_row(self, row: Row, reason: str, error: str | None = None, *, keep: bool = True) -> None:
        """Finish a row; keep its blocks (prompt and answer) for a follow-up turn that repeats them."""
        row.pending = None
        row.finished = True
        if keep:
            self._keep_blocks(next(i for i, x in enumerate(self.rows) if x is row), self._row_hashes(row))
        req = row.request
        req.emit(Event(row.index, finish_reason=reason, error=error))
        req.open_rows -= 1
        if req.open_rows == 0:
            req.done.set()

    def _step(self) -> None:
        """One decode step for every running row with a pending token."""
        n = len(self.rows)
        device = self.caches[0].k.device
        tokens = torch.tensor([[r.pending] for r in self.rows], device=device)
        lengths = torch.tensor([r.length for r in self.rows], device=device)
        key_len = int(lengths.max()) + 1
        slots = torch.arange(key_len, device=device)
        mask = (slots[None, :] <= lengths[:, None]).long()  # (n, key_len)
        for cache in self.caches:
            cache.positions = lengths
        kwargs = dict(
            attention_mask=mask,
            position_ids=lengths[:, None],
            input_pos=torch.tensor([key_len - 1], device=device),
            key_len=key_len,
            kv_caches=self.cache_map,
        )
        if self.idefics:
            c = self.cross
            cross = (
                None
                if c is None
                else CrossContext(kv=[(k[:n], v[:n]) for k, v in c.kv], mask=c.mask[:n], gate=c.gate[:n])
            )
            hidden = self.model.model(self.model.model.embed_tokens(tokens), cross=cross, **kwargs)
            logits = self.model.lm_head(hidden[:, -1])
        else:
            lm = self.model.language_model
            hidden = lm.model(lm.model.embed_tokens(tokens), **kwargs)
            logits = lm(hidden[:, -1])
        self.steps += 1
        for i, row in enumerate(self.rows):
            row.length += 1
            row.pending = None
            if row.request.cancelled.is_set():
                self._end_row(row, "cancelled")
                continue
            if row.request.deadline is not None and time.monotonic() > row.request.deadline:
                self._end_row(row, "error", "the request timed out")
                continue
            self._take(row, logits[i])

    def _compact(self) -> None:
        """Drop finished rows, moving the rows behind them up so the running rows stay 0..n-1."""
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        for new, old in enumerate(keep):
            if new == old:
                continue
            L = self.rows[old].length + 1
            self.kv[:, :, new, :, :L] = self.kv[:, :, old, :, :L]
            if self.cross is not None:
                for k, v in self.cross.kv:
                    k[new] = k[old]
                    v[new] = v[old]
                self.cross.mask[new] = self.cross.mask[old]
                self.cross.gate[new] = self.cross.gate[old]
        self.rows = [self.rows[i] for i in keep]

    # -- the loop -------------------------------------------------------------------------------

    def _finish_request(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """End every choice of a request that never got rows (cancelled while waiting, or failed to start)."""
        for j in range(request.params.n):
            request.emit(Event(j, finish_reason=reason, error=None if error is None else str(error)))
        request.done.set()

    def _loop(self) -> None:
        try:
            while True:
                with torch.inference_mode():
                    self._admit()
                    self._compact()
                    if any(r.pending is not None for r in self.rows):
                        self._step()
                        self._compact()
                        continue
                if self.waiting.empty():
                    if self._stop.is_set():
                        return
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # the engine is broken: tell everyone, keep the error for /health
            self.error = e
            for r in self.rows:
                if not r.finished:
                    self._end_row(r, "error", f"engine failure: {e}", keep=False)
            raise
