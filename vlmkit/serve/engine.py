"""Continuous batching for one model: requests join and leave the running batch between decode steps.

Every running sequence owns one row of a preallocated KV cache (`RowKVCache`): its prompt sits in slots
0..L-1 and each step writes its new token at its own next slot, so rows of any length decode together in
one forward with a per-row mask and per-row rotary positions, and nobody waits for the slowest. A joining
request is prefilled alone (its images encoded together with those of the other requests joining in the
same round, through an LRU cache of image features keyed by the pixels' hash) and its cache copied into a
free row. The engine runs in one thread; callers get their events through a callback.
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


class RowKVCache(torch.nn.Module):
    """A KV cache (B, Hkv, S, D) whose rows write at their own slots: `positions` (n,) set per step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.positions: torch.Tensor | None = None

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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


class Engine:
    """Continuous batching over `model` (ViP-LLaVA / LLaVA or IDEFICS) with its tokenizer.

    max_batch: rows decoded together; max_seq_len: prompt + completion tokens per row; max_queue: waiting
    requests before `submit` raises QueueFull; feature_cache: images whose features are kept.
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
        w = next(self.model.parameters())
        self.caches = []
        for layer in self._layers():
            attn = layer.self_attn
            shape = (self.max_batch, attn.n_kv_heads, self.max_seq_len, attn.head_dim)
            self.caches.append(
                RowKVCache(
                    torch.zeros(shape, dtype=w.dtype, device=w.device),
                    torch.zeros(shape, dtype=w.dtype, device=w.device),
                )
            )
        self.cross: CrossContext | None = None  # IDEFICS: per-row keys/values, mask and gate, padded

    def _install_caches(self) -> None:
        for layer, cache in zip(self._layers(), self.caches, strict=True):
            layer.self_attn.kv_cache = cache

    # -- images ---------------------------------------------------------------------------------

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a stack of single images (K, C, H, W): LLaVA (K, P, C), IDEFICS states (K, S, C)."""
        if self.idefics:
            ones = torch.ones(pixels.shape[0], 1, 1, dtype=torch.long, device=pixels.device)
            return self.model.encode_images(pixel_values=pixels[:, None], image_attention_mask=ones)[:, 0]
        return self.model.get_image_features(pixels)

    def _image_inputs(self, joining: list[Request]) -> list[dict[str, torch.Tensor]]:
        """Every joining request's inputs with its pixels replaced by cached or freshly computed features;
        the new images of all of them go through the vision tower together."""
        keys: list[list[str]] = []
        todo: dict[str, torch.Tensor] = {}
        found: dict[str, torch.Tensor] = {}
        for r in joining:
            px = r.inputs.get("pixel_values")
            images = [] if px is None else (list(px[0]) if self.idefics else list(px))
            ks = [FeatureCache.key(p) for p in images]
            keys.append(ks)
            for k, p in zip(ks, images, strict=True):
                if k in found or k in todo:
                    continue
                hit = self.features.get(k)
                if hit is not None:
                    found[k] = hit
                else:
                    todo[k] = p
        if todo:
            computed = self._encode(torch.stack(list(todo.values())))
            for k, f in zip(todo, computed, strict=True):
                self.features.put(k, f)
                found[k] = f
        out = []
        for r, ks in zip(joining, keys, strict=True):
            inputs = {k: v for k, v in r.inputs.items() if k != "pixel_values"}
            if ks:
                stacked = torch.stack([found[k] for k in ks])
                if self.idefics:
                    inputs["image_states"] = stacked[None]  # (1, N, S, C)
                else:
                    inputs["image_features"] = stacked  # (N, P, C)
            out.append(inputs)
        return out

    # -- joining --------------------------------------------------------------------------------

    def _prefill(self, request: Request, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one prompt alone; copy its cache into the next free rows (one per choice); return its last
        logits (1, V)."""
        params = request.params
        ids = inputs.pop("input_ids")
        mask = inputs.pop("attention_mask", None)
        session = self.model.start_session(
            ids, attention_mask=mask, config=GenerationConfig(max_new_tokens=1), **inputs
        )
        logits = session.prefill()
        L = ids.shape[1]
        first = len(self.rows)
        for layer, cache in zip(self._layers(), self.caches, strict=True):
            own = layer.self_attn.kv_cache
            for j in range(params.n):
                cache.k[first + j, :, :L] = own.k[0, :, :L]
                cache.v[first + j, :, :L] = own.v[0, :, :L]
        if self.idefics:
            self._join_cross(session.rows.get("cross"), first, params.n)
        self._install_caches()
        return logits

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
        try:
            all_inputs = self._image_inputs(joining)
        except Exception as e:  # a bad image batch: fail those requests, keep serving
            for r in joining:
                self._finish_request(r, "error", e)
            return
        for r, inputs in zip(joining, all_inputs, strict=True):
            try:
                self._start_rows(r, inputs)
            except Exception as e:
                self._finish_request(r, "error", e)

    def _start_rows(self, request: Request, inputs: dict[str, torch.Tensor]) -> None:
        ids = inputs["input_ids"]
        logits = self._prefill(request, dict(inputs))
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

    def _end_row(self, row: Row, reason: str, error: str | None = None) -> None:
        row.pending = None
        row.finished = True
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
            for cache in self.caches:
                cache.k[new, :, :L] = cache.k[old, :, :L]
                cache.v[new, :, :L] = cache.v[old, :, :L]
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
        self._install_caches()
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
                    self._end_row(r, "error", f"engine failure: {e}")
            raise
