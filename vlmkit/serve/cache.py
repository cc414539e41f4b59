"""The engine's caches: every row's keys/values in one tensor, the prefix cache of prompt (and answer)
blocks with its block hashing, and the feature cache of pictures.

- `RowKVCache`: one layer's view of the row cache; rows of any length write at their own slots, passed per
  call (`CacheSlots.row` for a prompt, `CacheSlots.slots` for a decode step).
- `PrefixCache`: keys/values of whole blocks, keyed by a hash chained over the tokens and the pictures up to
  each block; a prompt that starts like an earlier one copies those blocks and runs only the rest.
- `FeatureCache`: per-picture features keyed by the picture's content hash.
- `CacheManager`: the three together, planning a prompt (hashes, cached start, pictures still needed) from
  what the runner says each picture affects, and moving rows and blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.modules import CacheSlots
from vlmkit.runner import ImageItem, PromptPlan, Runner


class RowKVCache(torch.nn.Module):
    """A KV cache (B, Hkv, S, D) whose rows write at their own slots."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, at: CacheSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B, Hkv, T, D) go into the B rows from `at.row` on, at the T consecutive slots from
        `at.input_pos[0]` (in place, read back as views), or into rows `at.rows` (B,) (any rows, at the slots
        `at.input_pos`: read back as copies); with `at.starts` (B,), prompt b's tokens go at slots
        starts[b] + input_pos of its row, after its cached blocks. A decode step (n, Hkv, 1, D) goes into
        rows 0..n-1, each at its own slot `at.slots[i]`."""
        if at.rows is not None or at.starts is not None:
            B = k.shape[0]
            rows = at.rows if at.rows is not None else torch.arange(at.row, at.row + B, device=k.device)
            slots = at.input_pos[None, :] if at.starts is None else at.starts[:, None] + at.input_pos[None, :]
            # (B, T, Hkv, D): the indexed dimensions come first
            self.k[rows[:, None], :, slots] = k.transpose(1, 2)
            self.v[rows[:, None], :, slots] = v.transpose(1, 2)
            if at.rows is None:  # consecutive rows: read back in place
                here = slice(at.row, at.row + B)
                return self.k[here, :, : at.key_len], self.v[here, :, : at.key_len]
            keys = self.k[:, :, : at.key_len].index_select(0, at.rows)
            return keys, self.v[:, :, : at.key_len].index_select(0, at.rows)
        r = at.row
        if r is not None:
            end, start = r + k.shape[0], int(at.input_pos[0])
            self.k[r:end, :, start : start + k.shape[2]].copy_(k)
            self.v[r:end, :, start : start + k.shape[2]].copy_(v)
            return self.k[r:end, :, : at.key_len], self.v[r:end, :, : at.key_len]
        if at.slots is None:
            raise ValueError("a row-wise cache needs the row of a prompt or the slots of a decode step")
        n = k.shape[0]
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, at.slots] = k[:, :, 0]
        self.v[rows, :, at.slots] = v[:, :, 0]
        return self.k[:n, :, : at.key_len], self.v[:n, :, : at.key_len]


class FeatureCache:
    """LRU of per-picture features keyed by the picture's content hash."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

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
    tokens that depend on a picture, the picture (`marks`). A block is reusable exactly when its hash
    matches, because its keys/values depend on nothing else. LRU within `capacity` blocks; a hit refreshes
    its chain from the end back to the start, so chains are evicted from their deep end first.

    The blocks live in one pool of `capacity` slots, made at the first `put` with `torch.empty` (its pages
    are touched only as slots are written), so a full cache reuses its slots in place: the process's memory
    stops growing at the cap instead of creeping as freed blocks fragment the heap (the 30-minute soak saw
    +18% beside a full cache of separately allocated blocks). A planned prompt pins the blocks it will copy
    (`pin`/`unpin`, counted per slot): pinned slots are never evicted, and the counts return to zero once
    every prompt has run or been forgotten."""

    def __init__(self, capacity: int, block: int) -> None:
        if block < 1:
            raise ValueError(f"the prefix-cache block must be at least 1 token, got {block}")
        self.capacity, self.block = capacity, block
        self.items: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, least recently used first
        self.pins: dict[int, int] = {}  # slot -> prompts planned to copy it (absent: none)
        self.pool: torch.Tensor | None = None  # (capacity, *block shape), made at the first put
        self.unused: list[int] = []  # slots never written or freed
        self.hit_tokens = 0  # prompt tokens not run because their blocks were cached

    @property
    def bytes(self) -> int:
        """Bytes of the blocks held (the pool's written slots)."""
        return 0 if self.pool is None else len(self.items) * self.pool[0].nbytes

    def hashes(self, ids: list[int], marks: dict[int, bytes], salt: bytes = b"") -> list[bytes]:
        """One hash per whole block of `ids`; marks[b]: what else block b's keys/values depend on; salt: what
        all of them depend on (the LoRA adapter the prompt runs with)."""
        out, h = [], salt
        for b in range(len(ids) // self.block):
            chunk = ids[b * self.block : (b + 1) * self.block]
            h = hashlib.sha256(
                h + b"".join(i.to_bytes(8, "little", signed=True) for i in chunk) + marks.get(b, b"")
            )
            h = h.digest()
            out.append(h)
        return out

    def mark(self, marks: dict[int, bytes], t: int, key: str) -> None:
        """Note that token t's keys/values depend on the picture `key`."""
        b = t // self.block
        marks[b] = marks.get(b, b"") + t.to_bytes(4, "little") + key.encode()

    def match(self, hashes: list[bytes]) -> list[torch.Tensor]:
        """The cached blocks (views of their slots) of the longest cached start of `hashes`. A view stays
        valid only while its block is pinned or until the next `put`."""
        found = []
        for h in hashes:
            slot = self.items.get(h)
            if slot is None:
                break
            found.append(self.pool[slot])
        for h in reversed(hashes[: len(found)]):
            self.items.move_to_end(h)
        return found

    def pin(self, hashes: list[bytes]) -> None:
        """Keep the blocks of `hashes` (all cached) from eviction until `unpin`."""
        for h in hashes:
            slot = self.items[h]
            self.pins[slot] = self.pins.get(slot, 0) + 1

    def unpin(self, hashes: list[bytes]) -> None:
        for h in hashes:
            slot = self.items[h]
            if self.pins[slot] == 1:
                del self.pins[slot]
            else:
                self.pins[slot] -= 1

    def put(self, hashes: list[bytes], blocks: Callable[[int], torch.Tensor]) -> None:
        """Keep the blocks of `hashes` not kept yet; blocks(b) gives block b's keys/values. When every slot
        is taken and pinned, the rest is not kept."""
        if self.capacity <= 0:
            return
        for b in reversed(range(len(hashes))):
            h = hashes[b]
            if h in self.items:
                self.items.move_to_end(h)
                continue
            block = blocks(b)
            if self.pool is None:
                self.pool = torch.empty((self.capacity, *block.shape), dtype=block.dtype, device=block.device)
                self.unused = list(range(self.capacity - 1, -1, -1))
            slot = self.unused.pop() if self.unused else self._evict()
            if slot is None:
                return
            self.pool[slot].copy_(block)
            self.items[h] = slot

    def _evict(self) -> int | None:
        """The slot of the least recently used block that is not pinned, freed; None if all are pinned."""
        for h, slot in self.items.items():
            if slot not in self.pins:
                del self.items[h]
                return slot
        return None


@dataclass
class Prompt:
    """A joining request's prompt as planned: the runner's plan, which pictures the part after the cached
    blocks still needs, its block hashes (and marks) and the cached blocks it starts with (pinned)."""

    plan: PromptPlan
    needed: list[bool]
    marks: dict[int, bytes]
    hashes: list[bytes]
    pinned: list[bytes]  # the hashes of the cached blocks it starts with, pinned until it runs
    salt: bytes = b""  # what every block also depends on (an adapter's digest)

    @property
    def ids(self) -> torch.Tensor:
        return self.plan.ids


class CacheManager:
    """The row KV cache (one tensor (layers, 2, max_batch, Hkv, max_seq_len, D), so a row's whole cache or a
    block of it moves in one copy), the prefix cache and the feature cache of one engine."""

    def __init__(
        self,
        model: Runner,
        *,
        max_batch: int,
        max_seq_len: int,
        feature_cache: int,
        prefix_cache_mb: float,
        prefix_block: int,
    ) -> None:
        self.model = model
        w = next(model.parameters())
        attn = [layer.self_attn for layer in model.decoder.layers]
        shapes = {(a.n_kv_heads, a.head_dim) for a in attn}
        if len(shapes) != 1:
            raise ValueError(f"the engine needs one key/value shape in every layer, got {sorted(shapes)}")
        ((heads, dim),) = shapes
        self.kv = torch.zeros(
            len(attn), 2, max_batch, heads, max_seq_len, dim, dtype=w.dtype, device=w.device
        )
        caches = [RowKVCache(self.kv[i, 0], self.kv[i, 1]) for i in range(len(attn))]
        # passed to every forward (kv_caches): the layers' own kv_cache stays free for a generate beside us
        self.map: dict[torch.nn.Module, Any] = dict(zip(attn, caches, strict=True))
        self.device = w.device
        block_bytes = len(attn) * 2 * heads * prefix_block * dim * self.kv.element_size()
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20 // block_bytes), prefix_block)
        self.features = FeatureCache(feature_cache)

    # -- planning -------------------------------------------------------------------------------

    def plan(self, plan: PromptPlan, salt: bytes = b"") -> Prompt:
        """Hash the prompt's blocks (with the pictures each token depends on), find the cached start of it
        (at least one token runs), and mark the pictures that the rest still needs."""
        marks: dict[int, bytes] = {}
        for item in plan.items:
            for t in item.positions:
                self.prefix.mark(marks, t, item.key)
        tokens = plan.ids[0].tolist()
        hashes = self.prefix.hashes(tokens, marks, salt)
        reused = self.prefix.match(hashes)[: (len(tokens) - 1) // self.prefix.block]
        start = len(reused) * self.prefix.block
        needed = [any(t >= start for t in item.positions) for item in plan.items]
        pinned = hashes[: len(reused)]
        self.prefix.pin(pinned)  # until the prompt runs (load_prefix) or is forgotten (release)
        return Prompt(plan, needed, marks, hashes, pinned, salt)

    def row_hashes(self, prompt: Prompt, sequence: list[int]) -> list[bytes]:
        """Block hashes of a row's cache: its prompt, then the answer tokens run so far (which depend on the
        plan's `decode_items`)."""
        marks = dict(prompt.marks)
        items = prompt.plan.items
        for t in range(prompt.ids.shape[1], len(sequence)):
            for n in prompt.plan.decode_items:
                self.prefix.mark(marks, t, items[n].key)
        return self.prefix.hashes(sequence, marks, prompt.salt)

    def encode_needed(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Features of every picture some joining prompt still needs: from the cache, or computed for all of
        them in one call of the runner's `encode` (which takes the pictures' items, whatever their shapes)."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, ImageItem] = {}
        for prompt in prompts:
            for item, need in zip(prompt.plan.items, prompt.needed, strict=True):
                if not need or item.key in found or item.key in todo:
                    continue
                hit = self.features.get(item.key)
                if hit is not None:
                    found[item.key] = hit
                else:
                    todo[item.key] = item
        if todo:
            computed = self.model.encode(list(todo.values()))
            for key, f in zip(todo, computed, strict=True):
                self.features.put(key, f)
                found[key] = f
        return found

    @staticmethod
    def needed_features(prompt: Prompt, features: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Per picture of the prompt: its features if the part still to run needs them, else None."""
        return [
            features[item.key] if need else None
            for item, need in zip(prompt.plan.items, prompt.needed, strict=True)
        ]

    # -- rows and blocks ------------------------------------------------------------------------

    def load_prefix(self, row: int, prompt: Prompt) -> int:
        """Copy the prompt's cached blocks (re-matched: more may be kept since the plan; the planned ones are
        pinned, so never fewer) into `row`, then unpin them; return how many tokens they cover."""
        block = self.prefix.block
        again = self.prefix.match(prompt.hashes)[: (prompt.ids.shape[1] - 1) // block]
        start = len(again) * block
        if start:
            self.kv[:, :, row, :, :start] = torch.cat(again, dim=3)
        self.release(prompt)  # the row holds them now; the cache alone decides their lifetime
        return start

    def release(self, prompt: Prompt) -> None:
        """Unpin the blocks a prompt planned to copy (once: it ran, or it is forgotten before it could)."""
        self.prefix.unpin(prompt.pinned)
        prompt.pinned = []

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]

    def keep(self, row: int, hashes: list[bytes]) -> None:
        """Give the prefix cache the blocks of cache row `row` that `hashes` name."""
        block = self.prefix.block
        self.prefix.put(hashes, lambda b: self.kv[:, :, row, :, b * block : (b + 1) * block])
