"""Beam search as the reference's vectorised implementation does it: K = max(2, 1 + n_eos) * beams
candidates per input, finished hypotheses kept in a second beam set, its early-stop heuristic and length
penalty."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmkit.generation import GenerationConfig, StopStrings, process_logits
from vlmkit.runner import DecoderSession

NEG = -1e9


@dataclass
class Candidates:
    """One step's K candidates per input: scores, source beam, token, sequences, lengths, and which stop."""

    scores: torch.Tensor  # (B, K)
    src_beam: torch.Tensor
    sequences: torch.Tensor  # (B, K, max_len)
    lengths: torch.Tensor
    hits: torch.Tensor  # (B, K) ended by EOS, a stop string or the length limit


class Beams:
    """The running and finished beam sets of B inputs (B, nb, max_len) with their scores and lengths."""

    def __init__(self, config: GenerationConfig, prompt_ids: torch.Tensor) -> None:
        B, T = prompt_ids.shape
        nb, device = config.num_beams, prompt_ids.device
        self.config, self.B, self.T, self.nb = config, B, T, nb
        self.max_len = T + config.max_new_tokens
        eos_ids = config.eos_token_id
        self.keep = max(2, 1 + len(eos_ids)) * nb
        self.top_beams = torch.arange(self.keep, device=device) < nb
        # the reference fills unused slots with `pad or eos[0]`: a pad id of 0 falls through to EOS
        fill = config.pad_token_id if config.pad_token_id else (eos_ids[0] if eos_ids else -1)
        self.running = torch.full((B, nb, self.max_len), fill, dtype=torch.long, device=device)
        self.running[:, :, :T] = prompt_ids[:, None]
        self.finished = self.running.clone()
        self.running_scores = torch.zeros(B, nb, device=device)
        self.running_scores[:, 1:] = NEG
        self.finished_scores = torch.full((B, nb), NEG, device=device)
        self.is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.running_lengths = torch.zeros(B, nb, dtype=torch.long, device=device)  # generated per beam
        self.finished_lengths = torch.zeros(B, nb, dtype=torch.long, device=device)
        self.eos = torch.tensor(eos_ids or [-1], device=device)

    def candidates(
        self, logits: torch.Tensor, cur: int, generator: torch.Generator | None, stops: StopStrings | None
    ) -> Candidates:
        B, nb, config = self.B, self.nb, self.config
        log_probs = F.log_softmax(logits.float(), dim=-1)
        flat_seq = self.running[:, :, :cur].reshape(B * nb, cur)
        log_probs = process_logits(log_probs, flat_seq, config, new_tokens=cur - self.T, beams=True)
        V = log_probs.shape[-1]
        total = (log_probs.view(B, nb, V) + self.running_scores[:, :, None]).view(B, nb * V)
        if config.sampling:
            idx = torch.multinomial(F.softmax(total, dim=-1), self.keep, generator=generator)
            scores = torch.gather(total, 1, idx)
        else:
            scores, idx = torch.topk(total, self.keep)
        src_beam, token = idx // V, idx % V  # (B, K)
        seqs = torch.gather(self.running, 1, src_beam[:, :, None].expand(-1, -1, self.max_len)).clone()
        seqs[:, :, cur] = token
        lengths = torch.gather(self.running_lengths, 1, src_beam) + 1
        hits = torch.isin(token, self.eos) | (cur + 1 >= self.max_len)
        if stops is not None:
            for b in range(B):
                for k in range(self.keep):
                    tail = seqs[b, k, max(0, cur + 1 - stops.window) : cur + 1].tolist()
                    if not hits[b, k] and stops.hit(tail):
                        hits[b, k] = True
        return Candidates(scores, src_beam, seqs, lengths, hits)

    def advance(self, c: Candidates, cur: int) -> torch.Tensor:
        """Take the step's candidates: the best nb that did not stop keep running, the stopped ones among
        the top nb join the finished set. Returns each running beam's parent (B, nb)."""
        config, nb, max_len = self.config, self.nb, self.max_len
        live = c.scores - c.hits.float() * -NEG
        pick = torch.topk(live, nb).indices
        self.running = torch.gather(c.sequences, 1, pick[:, :, None].expand(-1, -1, max_len))
        self.running_scores = torch.gather(live, 1, pick)
        self.running_lengths = torch.gather(c.lengths, 1, pick)
        done_now = c.hits & self.top_beams[None]
        normed = c.scores / ((cur + 1 - self.T) ** config.length_penalty)
        full = self.is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
        normed = normed - full.float() * -NEG - (~self.improvable).float() * -NEG - (~done_now).float() * -NEG
        merged = torch.cat([self.finished_scores, normed], dim=1)
        best = torch.topk(merged, nb).indices
        both = torch.cat([self.finished, c.sequences], 1)
        self.finished = torch.gather(both, 1, best[:, :, None].expand(-1, -1, max_len))
        self.finished_scores = torch.gather(merged, 1, best)
        self.finished_lengths = torch.gather(torch.cat([self.finished_lengths, c.lengths], 1), 1, best)
        self.is_finished = torch.gather(torch.cat([self.is_finished, done_now], 1), 1, best)
        return torch.gather(c.src_beam, 1, pick)

    def can_improve(self, cur: int, hits: torch.Tensor) -> bool:
        """Whether a running beam can still beat the worst finished one (and anything still runs)."""
        config = self.config
        if config.early_stopping == "never" and config.length_penalty > 0:
            best_len = self.max_len - self.T
        else:
            best_len = cur - self.T
        best_running = self.running_scores[:, :1] / (best_len**config.length_penalty)
        floor = torch.tensor(NEG, device=self.running.device)
        worst_done = torch.where(
            self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, floor
        )
        self.improvable = self.improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        still_open = ~(self.is_finished.all() & (config.early_stopping is True))
        return (
            bool(self.improvable.any()) and bool(still_open) and not bool(hits.all()) and cur < self.max_len
        )

    def best(self) -> torch.Tensor:
        n_ret = self.config.num_return_sequences
        out = self.finished[:, :n_ret].reshape(self.B * n_ret, self.max_len)
        return out[:, : self.T + int(self.finished_lengths[:, :n_ret].max())]


def beam_search(
    session: DecoderSession,
    config: GenerationConfig,
    prompt_ids: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> torch.Tensor:
    """Returns (B * num_return_sequences, prompt + generated), rows of one input next to each other."""
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a tokenizer to decode with: pass tokenizer=...")
    stops = StopStrings(config.stop_strings, decode) if config.stop_strings else None
    beams = Beams(config, prompt_ids)
    B, nb = beams.B, beams.nb
    logits = session.prefill()
    session.expand(nb)
    logits = logits.repeat_interleave(nb, dim=0)
    cur = beams.T
    while cur < beams.max_len:
        step = beams.candidates(logits, cur, generator, stops)
        parent = beams.advance(step, cur)
        cur += 1
        if not beams.can_improve(cur, step.hits):
            break
        session.reorder((parent + torch.arange(B, device=parent.device)[:, None] * nb).reshape(-1))
        logits = session.step(beams.running[:, :, cur - 1].reshape(-1))
    return beams.best()
