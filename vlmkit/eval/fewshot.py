"""In-context examples for few-shot evaluation (IDEFICS was reported this way): k demonstrations per query,
chosen at random or retrieved by similarity of picture features (RICES, as OpenFlamingo's evaluation does)
computed by the evaluated model's own vision encoder, through the runner interface every family has."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from vlmkit.eval.data import Sample

SELECTIONS = ("random", "rices")


def random_demonstrations(queries: list[Sample], support: list[Sample], k: int, seed: int) -> list[list[int]]:
    """k support indices per query, drawn with a generator seeded by the query's id, so a query gets the
    same examples whatever else is evaluated with it; never the query itself."""
    out = []
    for q in queries:
        pool = [i for i, s in enumerate(support) if s.id != q.id]
        if len(pool) < k:
            raise ValueError(f"{k} shots need at least {k} other examples; the support set has {len(pool)}")
        out.append(random.Random(f"{seed}-{q.id}").sample(pool, k))
    return out


@torch.inference_mode()
def picture_features(vlm: Any, pictures: list[Any], batch_size: int = 16) -> torch.Tensor:
    """One L2-normalised feature per picture (N, D): the model's own picture features (what its `encode`
    gives the decoder: ViP-LLaVA's projected tower output, IDEFICS's vision states), averaged over positions."""
    model = vlm.model
    items = [model.plan(vlm.inputs("", [p])).items[0] for p in pictures]
    feats = []
    for start in range(0, len(items), batch_size):
        for f in model.encode(items[start : start + batch_size]):
            feats.append(f.float().reshape(-1, f.shape[-1]).mean(0))
    out = torch.stack(feats)
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rices_demonstrations(
    queries: list[Sample], support: list[Sample], k: int, features: Callable[[list[Sample]], torch.Tensor]
) -> list[list[int]]:
    """The k support examples whose pictures are most similar (cosine of `features`) to each query's, the
    most similar last, nearest the query, as OpenFlamingo orders them; never the query itself."""
    if len(support) - 1 < k and any(s.id == q.id for q in queries for s in support):
        raise ValueError(f"{k} shots need at least {k} other examples; the support set has {len(support)}")
    similarity = features(queries) @ features(support).T  # (Q, S)
    ids = [s.id for s in support]
    out = []
    for qi, q in enumerate(queries):
        row = similarity[qi].clone()
        for si, sid in enumerate(ids):
            if sid == q.id:
                row[si] = -float("inf")
        order = torch.argsort(row, descending=True, stable=True)[:k].tolist()
        out.append(order[::-1])
    return out
