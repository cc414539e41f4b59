"""The `vlmkit` model of lmms-eval: `--model vlmkit --model_args pretrained=M[,dtype=...,device=...,
quantize=int8|int4,group_size=64,max_seq_len=2048] --batch_size 16`. Text generation goes through vlmkit's
continuous-batching engine, `--batch_size` requests decoding together; each prompt is one user turn of the
checkpoint's chat template, its pictures first."""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from vlmkit.eval.batching import Job, engine_answers

MODEL_ARGS = ("pretrained", "batch_size", "device", "dtype", "quantize", "group_size", "max_seq_len")


class VlmkitLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str = "demo",
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        group_size: int | None = None,
        max_seq_len: int = 2048,
        max_batch_size: int | None = None,  # lmms-eval passes it; the engine's batch is batch_size
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"the vlmkit model takes no {sorted(unknown)}; its model_args are {list(MODEL_ARGS)}"
            )
        from vlmkit.vlm import VLM

        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # lmms-eval's "auto" -> 16
        self.max_seq_len = int(max_seq_len)
        self.vlm = VLM.load(
            pretrained,
            dtype=dtype,
            device=device if device not in (None, "", "cuda") or torch.cuda.is_available() else None,
            quantize=quantize,
            group_size=None if group_size is None else int(group_size),
        )

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, doc: Any) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(doc) or []
        flat = []
        for v in visuals if isinstance(visuals, list) else [visuals]:
            flat.extend(v if isinstance(v, list) else [v])
        if any(isinstance(v, str) for v in flat):
            raise ValueError("the vlmkit model answers about pictures; this task gives videos or audio")
        return flat

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Every request through the engine at once (answers are each request's own greedy answer, so the
        batching does not change them); `until` strings stop an answer, `max_new_tokens`, `temperature`,
        `top_p` as the task asks."""
        from vlmkit.serve.engine import SamplingParams
        from vlmkit.vlm import user_turn

        jobs = []
        for n, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            temperature = float(kwargs.get("temperature", 0) or 0) if kwargs.get("do_sample", False) else 0.0
            params = SamplingParams(
                max_tokens=int(kwargs.get("max_new_tokens", 128)),
                temperature=temperature,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                stop=until,
                seed=0 if temperature > 0 else None,
            )
            visuals = self._visuals(doc_to_visual, self._doc(task, split, doc_id))

            def inputs(context: str = context, visuals: list[Any] = visuals) -> dict[str, Any]:
                return self.vlm.chat_inputs([user_turn(context, visuals)])

            jobs.append(Job(key=n, inputs=inputs, params=params))
        texts = [""] * len(requests)
        for answer in engine_answers(
            self.vlm, jobs, batch_size=self.batch_size, max_seq_len=self.max_seq_len
        ):
            if answer.error is not None:
                raise RuntimeError(f"request {answer.key} failed: {answer.error}")
            texts[answer.key] = answer.text.strip()
        return texts

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | prompt) summed over the continuation's tokens, and whether greedy decoding
        would produce it; the prompt is the chat template's user turn, the continuation the assistant's."""
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, doc)
            from vlmkit.vlm import user_turn

            prompt = self.vlm.processor.apply_chat_template(
                [user_turn(context, visuals)], add_generation_prompt=True
            )
            head = self.vlm.inputs(prompt, visuals)
            full = self.vlm.inputs(prompt + continuation, visuals)
            start = head["input_ids"].shape[1]
            ids = full["input_ids"][0]
            if ids.shape[0] <= start:
                out.append((0.0, True))
                continue
            logits = self.vlm.model(**full).logits[0, start - 1 : -1].float()  # the positions predicting it
            target = ids[start:]
            logprobs = torch.log_softmax(logits, dim=-1)
            total = float(logprobs.gather(-1, target[:, None]).sum())
            out.append((total, bool((logits.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vlmkit model answers one-round tasks (generate_until, loglikelihood)")
