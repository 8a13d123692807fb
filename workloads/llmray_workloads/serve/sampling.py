"""Per-row next-token selection for a batch whose rows have different sampling parameters.

Rows of one batch belong to different requests, so temperature, top-p and seed are per row:
temperature 0 is greedy; a seeded row draws from its own ``torch.Generator`` so its output does
not depend on which other requests happened to share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GREEDY_EPS = 1e-5


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside each row's nucleus (smallest set with mass >= top_p); rows renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p.unsqueeze(-1), 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V]; ``temperature``/``top_p`` are [B]; returns [B] int64."""
    tokens = logits.argmax(dim=-1)
    sampled = (temperature > GREEDY_EPS).nonzero().flatten().tolist()
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    scaled = logits.index_select(0, rows).float() / temperature.index_select(0, rows).unsqueeze(-1)
    probs = torch.softmax(scaled, dim=-1)
    nucleus = top_p.index_select(0, rows)
    if bool((nucleus < 1.0).any()):  # the sort is the costliest part; skip it when nobody asked
        probs = top_p_filter(probs, nucleus)
    unseeded = [i for i, row in enumerate(sampled) if generators[row] is None]
    if unseeded:
        picks = torch.multinomial(probs[unseeded], 1).flatten()
        tokens[[sampled[i] for i in unseeded]] = picks
    for i, row in enumerate(sampled):
        generator = generators[row]
        if generator is not None:
            tokens[row] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return tokens
