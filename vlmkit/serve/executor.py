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
from vlmkit.runner import PromptPlan
from vlmkit.serve.cache import CacheManager, Prompt
from vlmkit.serve.config import EngineConfig
from vlmkit.serve.errors import InvalidRequest, NotFound

log = logging.getLogger("vlmkit.serve")
OPS = ("plan", "encode", "run_prompts", "decode", "keep", "compact", "forget")


def plan_request(model: Any, inputs: dict[str, torch.Tensor]) -> PromptPlan:
    """Check one request's processor outputs and make its family's plan (its pictures' content keys and the
    tokens each affects). It reads nothing the engine changes, so it runs in the submitting thread: a bad
    request is refused at once, and the engine thread spends no time hashing pictures."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    check_text_inputs(ids, mask, None)
    if ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
        raise InvalidRequest(
            f"the engine takes one unpadded prompt per request; got input_ids {tuple(ids.shape)}"
            + ("" if mask is None else f" with {int((mask == 0).sum())} padding positions")
        )
    return model.plan(inputs)


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

    def plan(self, key: int, plan: PromptPlan, adapter: str | None = None) -> Prompt:
        """Plan one request's prompt (block hashes, the cached start, the pictures still needed) from its
        family's plan (`plan_request`, made when it was submitted) with its LoRA adapter (by name; None: the
        base model); it is remembered under `key` until `forget`."""
        lora = None
        if adapter is not None:
            if self.adapters is None:
                raise NotFound(f"adapter {adapter!r}: this server serves no adapters")
            try:
                lora = self.adapters.get(adapter)
            except KeyError:
                raise NotFound(f"adapter {adapter!r} is not loaded") from None
        prompt = self.cache.plan(plan, salt=lora.digest if lora is not None else b"")
        self.prompts[key], self.prompt_adapters[key] = prompt, lora
        return prompt

    def encode(self, keys: list[int]) -> None:
        """Features of every picture the prompts `keys` still need, from the feature cache or one `encode`."""
        self.joining = self.cache.encode_needed([self.prompts[k] for k in keys])

    def run_prompts(
        self, jobs: list[tuple[int, int]], first: int
    ) -> list[tuple[torch.Tensor, int] | Exception]:
        """Run the joining prompts `jobs` ((key, n) each, in order) into the cache rows from `first` on, n rows
        each: a prompt's uncached part after its cached blocks, then copies of its row (and state) for its
        further choices; keep their blocks. They run together in one prefill, each after its own cached
        blocks, padded on the right; if that fails, each runs alone, so that a failure ends its own request
        only. Rows go to the prompts that ran, in order. Per job: its last logits (1, V) and how many of its
        tokens came from the prefix cache, or the exception that ended it."""
        rows, row = [], first
        for _, n in jobs:
            rows.append(row)
            row += n
        results: list[Any] = [None] * len(jobs)
        if len(jobs) > 1:
            try:
                results = self._prefill(jobs, rows)
            except Exception as e:  # noqa: BLE001 - each runs alone below, and its own failure is reported
                log.debug("a joint prefill of %d prompts failed (%r); running them one by one", len(jobs), e)
        for i, (key, n) in enumerate(jobs):
            if results[i] is None:
                try:
                    results[i] = self._prefill([(key, n)], [rows[i]])[0]
                except Exception as e:  # noqa: BLE001 - returned: it ends that request alone
                    results[i] = e
        moves, row = [], first  # rows of the prompts that failed are given to the ones after them
        for i, (key, n) in enumerate(jobs):
            if isinstance(results[i], Exception):
                continue
            if rows[i] != row:
                moves += [(rows[i] + j, row + j, self.prompts[key].ids.shape[1]) for j in range(n)]
            row += n
        self.compact(moves)
        return results

    def _prefill(self, jobs: list[tuple[int, int]], rows: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The prompts `jobs` ((key, n) each) in one prefill into `rows`, each after the cached blocks copied
        into its row: the rest of its ids, padded on the right with its `filler_token`, at its own positions;
        each real token sees only its own row's earlier tokens (causal), and each row's logits are read at
        its last real token; then each prompt's n - 1 copies. Returns each prompt's last logits (1, V) and
        how many of its tokens came from the prefix cache."""
        prompts = [self.prompts[key] for key, _ in jobs]
        starts = [self.cache.load_prefix(row, p) for p, row in zip(prompts, rows, strict=True)]
        lengths = [p.ids.shape[1] - start for p, start in zip(prompts, starts, strict=True)]
        T = max(lengths)
        if max(starts) + T > self.cache.kv.shape[4]:  # the rows' slots
            raise ValueError("padded to the longest rest, a prompt after a long cached start would not fit")
        device = prompts[0].ids.device
        ids = torch.stack(
            [
                torch.cat([p.ids[0, s:], p.ids.new_full((T - length,), self.model.filler_token(p.plan))])
                for p, s, length in zip(prompts, starts, lengths, strict=True)
            ]
        )
        images = self.model.batch_images(
            [
                self.model.prompt_images(p.plan, s, self.cache.needed_features(p, self.joining))
                for p, s in zip(prompts, starts, strict=True)
            ],
            lengths,
        )
        # consecutive rows (each prompt makes one choice) are written in place
        where = (
            {"row": rows[0]}
            if rows == list(range(rows[0], rows[0] + len(rows)))
            else {"rows": torch.tensor(rows, device=device)}
        )
        if len(set(starts)) == 1:  # the same slots in every row (a prompt alone, or none cached)
            pos = torch.arange(starts[0], starts[0] + T, device=device)
            at, positions = CacheSlots(pos, key_len=starts[0] + T, **where), pos[None]
        else:
            first, pos = torch.tensor(starts, device=device), torch.arange(T, device=device)
            at = CacheSlots(pos, key_len=max(starts) + T, starts=first, **where)
            positions = first[:, None] + pos[None, :]
        with self.lora_rows([self.prompt_adapters.get(key) for key, _ in jobs]):
            logits, state = self.model.prefill(
                ids,
                images=images,
                attention_mask=None,
                position_ids=positions,
                at=at,
                kv_caches=self.cache.map,
                last=torch.tensor(lengths, device=device) - 1,
            )
        for b, ((key, n), row) in enumerate(zip(jobs, rows, strict=True)):
            one = None if state is None else state.select(torch.tensor([b], device=device))
            self._settle(key, row, n, one)
        self.cache.prefix.hit_tokens += sum(starts)
        return [(logits[b : b + 1], starts[b]) for b in range(len(jobs))]

    def _settle(self, key: int, row: int, n: int, state: Any) -> None:
        """After a prompt ran into `row`: its adapter, its n - 1 copies, its state, and its blocks kept."""
        prompt = self.prompts[key]
        self.row_adapters[row : row + n] = [self.prompt_adapters.get(key)] * n
        for j in range(1, n):
            self.cache.copy_row(row, row + j, prompt.ids.shape[1])
        self.states.join(row, n, state)
        self.cache.keep(row, prompt.hashes)

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
