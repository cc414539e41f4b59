"""The engine's device side: the model, the row KV cache (with the prefix and feature caches) and the family's
per-row state, moved only through a few calls whose arguments are plain data.

That narrow surface is what lets a model split over processes (tensor parallel, `vlmkit.tensor_parallel`)
serve: every process holds an `Executor` over its part of the model and its part of every cache (its own
heads), the engine runs on rank 0 only, and each of its calls is first sent to the other processes, which run
the same call in `follow`. Scheduling, sampling and text stay on rank 0; the other processes never see a
request, only prompts to plan, pictures to encode, rows to fill, steps to run and rows to move.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch

from vlmkit.adapters import Adapter, AdapterSet
from vlmkit.llama import check_text_inputs
from vlmkit.modules import CacheSlots
from vlmkit.serve.cache import CacheManager, Prompt
from vlmkit.serve.config import EngineConfig
from vlmkit.serve.errors import InvalidRequest, NotFound

log = logging.getLogger("vlmkit.serve")
OPS = ("plan", "encode", "run_prompt", "decode", "keep", "compact", "forget")


class Executor:
    """Runs the engine's model work on `model` (any family that implements `vlmkit.runner.Runner`)."""

    def __init__(
        self, model: torch.nn.Module, config: EngineConfig, adapters: AdapterSet | None = None
    ) -> None:
        self.model, self.adapters = model, adapters
        self.cache = CacheManager(
            model,
            max_batch=config.max_batch,
            max_seq_len=config.max_seq_len,
            feature_cache=config.feature_cache,
            prefix_cache_mb=config.prefix_cache_mb,
            prefix_block=config.prefix_block,
        )
        self.states = model.row_store(config.max_batch)
        self.prompts: dict[int, Prompt] = {}  # the prompts of the requests running or joining, by key
        self.prompt_adapters: dict[int, Adapter | None] = {}  # the LoRA adapter each prompt runs with
        self.row_adapters: list[Adapter | None] = [None] * config.max_batch  # and each cache row
        self.joining: dict[str, torch.Tensor] = {}  # the pictures' features the joining prompts need
        mesh = getattr(model, "tp_mesh", None)
        self.group = mesh.get_group() if mesh is not None and mesh.size() > 1 else None
        self.closed = False

    # -- the calls, on every process --------------------------------------------------------------

    def call(self, op: str, *args: Any) -> Any:
        """Run `op` here, after sending it to the other processes of a split model (on rank 0)."""
        if op not in OPS:
            raise ValueError(f"unknown executor call {op!r}")
        if self.group is not None:
            import torch.distributed as dist

            dist.broadcast_object_list([op, args], group=self.group, group_src=0)
        return getattr(self, op)(*args)

    def plan(self, key: int, inputs: dict[str, torch.Tensor], adapter: str | None = None) -> Prompt:
        """Check one request's processor outputs and plan its prompt (block hashes, the cached start, the
        pictures still needed) with its LoRA adapter (by name; None: the base model); it is remembered under
        `key` until `forget`."""
        lora = None
        if adapter is not None:
            if self.adapters is None:
                raise NotFound(f"adapter {adapter!r}: this server serves no adapters")
            try:
                lora = self.adapters.get(adapter)
            except KeyError:
                raise NotFound(f"adapter {adapter!r} is not loaded") from None
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        check_text_inputs(ids, mask, None)
        if ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
            raise InvalidRequest(
                f"the engine takes one unpadded prompt per request; got input_ids {tuple(ids.shape)}"
                + ("" if mask is None else f" with {int((mask == 0).sum())} padding positions")
            )
        prompt = self.cache.plan(self.model.plan(inputs), salt=lora.digest if lora is not None else b"")
        self.prompts[key], self.prompt_adapters[key] = prompt, lora
        return prompt

    def encode(self, keys: list[int]) -> None:
        """Features of every picture the prompts `keys` still need, from the feature cache or one `encode`."""
        self.joining = self.cache.encode_needed([self.prompts[k] for k in keys])

    def run_prompt(self, key: int, row: int, n: int) -> tuple[torch.Tensor, int]:
        """Run prompt `key`'s uncached part into cache row `row`, after its cached blocks; copy the row (and
        its state) into the next n - 1 rows for further choices; keep its blocks. Returns the last logits
        (1, V) and how many prompt tokens came from the prefix cache."""
        prompt = self.prompts[key]
        ids, L = prompt.ids, prompt.ids.shape[1]
        start = self.cache.load_prefix(row, prompt)
        features = self.cache.needed_features(prompt, self.joining)
        images = self.model.prompt_images(prompt.plan, start, features)
        pos = torch.arange(start, L, device=ids.device)
        lora = self.prompt_adapters.get(key)
        with self.lora_rows([lora]):
            logits, state = self.model.prefill(
                ids[:, start:],
                images=images,
                attention_mask=None,
                position_ids=pos[None],
                at=CacheSlots(pos, key_len=L, row=row),
                kv_caches=self.cache.map,
            )
        self.row_adapters[row : row + n] = [lora] * n
        for j in range(1, n):
            self.cache.copy_row(row, row + j, L)
        self.states.join(row, n, state)
        self.cache.keep(row, prompt.hashes)
        self.cache.prefix.hit_tokens += start
        return logits, start

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One step for rows 0..n-1: token i goes into row i at slot lengths[i]; the logits (n, V)."""
        device = self.cache.device
        n = len(tokens)
        slots = torch.tensor(lengths, device=device)
        key_len = max(lengths) + 1
        mask = (torch.arange(key_len, device=device)[None, :] <= slots[:, None]).long()  # (n, key_len)
        with self.lora_rows(self.row_adapters[:n]):
            return self.model.decode(
                torch.tensor(tokens, device=device)[:, None],
                attention_mask=mask,
                position_ids=slots[:, None],
                at=CacheSlots(torch.tensor([key_len - 1], device=device), key_len=key_len, slots=slots),
                kv_caches=self.cache.map,
                state=self.states.view(n),
            )

    def lora_rows(self, adapters: list[Adapter | None]) -> Any:
        """The context in which row i runs with adapters[i] (nothing to do without adapters)."""
        if self.adapters is None or not any(a is not None for a in adapters):
            return nullcontext()
        return self.adapters.rows(adapters)

    def keep(self, row: int, key: int, sequence: list[int]) -> None:
        """Give the prefix cache the blocks of a finished row (prompt `key` and its answer `sequence`)."""
        self.cache.keep(row, self.cache.row_hashes(self.prompts[key], sequence))

    def compact(self, moves: list[tuple[int, int, int]]) -> None:
        """Move rows up: (old, new, length) each."""
        for old, new, length in moves:
            self.cache.copy_row(old, new, length)
            self.states.move(old, new)
            self.row_adapters[new] = self.row_adapters[old]

    def forget(self, key: int) -> None:
        prompt = self.prompts.pop(key, None)
        if prompt is not None:
            self.cache.release(prompt)  # a prompt that never ran (cancelled, failed) unpins its blocks
        self.prompt_adapters.pop(key, None)

    # -- the other processes ----------------------------------------------------------------------

    def follow(self) -> None:
        """On every process but rank 0: run the calls rank 0 sends until it closes. A call that fails here
        failed on rank 0 too (same inputs, same model), which fails that request and goes on; so do we."""
        import torch.distributed as dist

        with torch.inference_mode():
            while True:
                message: list[Any] = [None, None]
                dist.broadcast_object_list(message, group=self.group, group_src=0)
                op, args = message
                if op == "close":
                    return
                try:
                    getattr(self, op)(*args)
                except Exception as e:  # noqa: BLE001 - rank 0 reports it to the request
                    log.debug("executor call %s failed here as on rank 0: %s", op, e)

    def close(self) -> None:
        """On rank 0: release the other processes from `follow`."""
        if self.group is not None and not self.closed:
            import torch.distributed as dist

            dist.broadcast_object_list(["close", ()], group=self.group, group_src=0)
        self.closed = True
