"""Exact calibration: thresholds under which an SAE fires exactly given counts of its scores.

Order statistics over ``N`` tokens: one global threshold with a count of the ``N x F`` (token,
latent) pairs above it (Mutual Choice, BatchTopK), or per latent a threshold with its count of the
``N`` tokens above it (Feature Choice). Scores are computed a block of latents at a time, so memory
is bounded by ``N`` times the block.

:func:`norm_corrected_counts` adapts the counts when the ``N`` tokens are a random sample of a
larger population whose mean input norm is known (the training run's): a regression estimator.
"""

from typing import Any

import torch

from sae_mutual_choice.upstream.zipf import round_capacities

MAX_BLOCK_BYTES = 1 << 28
# A sample whose norms spread less than this many units of the inputs' float resolution (relative
# standard deviation over the dtype's eps) has nearly constant norms, as at a LayerNorm'd hook point:
# their differences are rounding, and a slope fitted to them would turn rounding into a correction.
NORM_RESOLUTION_UNITS = 4


def latent_scores(sae: Any, sae_in: torch.Tensor, latents: slice) -> torch.Tensor:
    """The training scores (``hidden_pre``) of a block of latents. ``[N, d_in] -> [N, len(latents)]``.

    ``sae_in`` has been through ``sae.process_sae_in``. Equals ``sae.encode_with_hidden_pre(x)[1]``
    restricted to ``latents``, including the decoder-norm rescaling.
    """
    scores = sae_in @ sae.W_enc[:, latents] + sae.b_enc[latents]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        scores = scores * sae.W_dec[latents].norm(dim=-1)
    return scores


@torch.no_grad()
def thresholds_for_counts(
    sae: Any, activations: torch.Tensor, counts: int | torch.Tensor, max_block_bytes: int = MAX_BLOCK_BYTES
) -> torch.Tensor:
    """Thresholds under which ``sae`` fires exactly ``counts`` of its scores on ``activations``; never below 0.

    ``counts``: an int (one global threshold, that many (token, latent) pairs above it) or a
    tensor ``[F]`` (per latent, that many tokens above its threshold). ``sae`` is any SAE with
    ``W_enc``, ``b_enc`` and ``process_sae_in`` (a training SAE here, or an exported JumpReLU SAE).
    Scores are computed a block of latents at a time. ``-> [F]`` float64.
    """
    x = activations.reshape(-1, sae.cfg.d_in).to(sae.W_enc.device, sae.W_enc.dtype)
    sae_in = sae.process_sae_in(x)
    n_tokens, n_latents = sae_in.shape[0], sae.cfg.d_sae
    blocks = latent_blocks(n_tokens, n_latents, max_block_bytes)
    if isinstance(counts, int):
        thresholds = torch.full(
            (n_latents,), _global_threshold(sae, sae_in, blocks, counts), dtype=torch.double
        )
    else:
        thresholds = torch.cat(
            [_per_latent_thresholds(latent_scores(sae, sae_in, s), counts[s]) for s in blocks]
        ).double()
    return thresholds.clamp(min=0).to(sae.W_enc.device)


def _per_latent_thresholds(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per column, midway between the ``count``-th and ``(count + 1)``-th largest scores.

    Midway, so that the float rounding of a differently folded copy of the weights cannot flip a
    boundary token; ``-inf`` when the count is every token, the largest score when it is 0.
    """
    n_tokens = scores.shape[0]
    counts = counts.to(scores.device)
    depth = min(n_tokens, int(counts.max()) + 1)
    ordered = scores.float().topk(depth, dim=0).values
    last_kept = ordered.gather(0, (counts - 1).clamp(0, depth - 1)[None])[0]
    first_dropped = ordered.gather(0, counts.clamp(max=depth - 1)[None])[0]
    midway = torch.where(counts > 0, (last_kept + first_dropped) / 2, first_dropped)
    return torch.where(counts >= n_tokens, -torch.inf, midway)


def _global_threshold(sae: Any, sae_in: torch.Tensor, blocks: list[slice], count: int) -> float:
    """Midway between the ``count``-th and ``(count + 1)``-th largest scores over all tokens and latents."""
    kept = sae_in.new_empty(0, dtype=torch.float32)
    for latents in blocks:
        merged = torch.cat([kept, latent_scores(sae, sae_in, latents).float().flatten()])
        kept = merged.topk(min(count + 1, merged.numel())).values
    if kept.numel() <= count:
        return -float("inf")
    return float(kept[count] if count == 0 else (kept[count - 1] + kept[count]) / 2)


@torch.no_grad()
def norm_corrected_counts(
    sae: Any,
    activations: torch.Tensor,
    thresholds: torch.Tensor,
    counts: int | torch.Tensor,
    norms: torch.Tensor,
    population_mean_norm: float,
) -> int | torch.Tensor:
    """``counts`` for a random sample, corrected for its mean input norm (a regression estimator).

    ``thresholds`` ``[F]`` fire ``counts`` on the sample ``activations [N, d_in]``, whose inputs
    have norms ``norms [N]``; the population they were drawn from has mean norm
    ``population_mean_norm``. Which latents an input fires follows its norm closely, so a sample
    holding more large-norm inputs than the population would set thresholds too high. Per latent,
    the slope of "fires" on the norm over the sample predicts the population's firing rate
    (rate on the sample + slope x (population mean - sample mean)); the corrected counts make that
    prediction equal to the asked rate: ``count + slope x N x (sample mean - population mean)``.
    The total is corrected alike (one global count) or spread over latents by largest remainder
    (per-latent counts), within ``[0, N]`` per latent. Left as they are when the norms' spread is
    at the float resolution of ``activations`` (``NORM_RESOLUTION_UNITS``). ``-> int`` or ``[F]`` long.
    """
    x = sae.process_sae_in(activations.reshape(-1, sae.cfg.d_in).to(sae.W_enc.device, sae.W_enc.dtype))
    norms = norms.to(x.device, torch.float64)
    centred = norms - norms.mean()
    spread = float(centred.square().sum())
    n_tokens = x.shape[0]
    resolution = torch.finfo(activations.dtype).eps * abs(float(norms.mean()))
    if spread <= n_tokens * (NORM_RESOLUTION_UNITS * resolution) ** 2:
        return counts  # no spread beyond rounding: nothing to correct for
    excess = n_tokens * (float(norms.mean()) - population_mean_norm)
    weights = centred.float()[None]
    slopes = (
        torch.cat(
            [
                (weights @ (latent_scores(sae, x, s) > thresholds[s].to(x.device)).float())[0]
                for s in latent_blocks(n_tokens, sae.cfg.d_sae)
            ]
        ).double()
        / spread
    )
    if isinstance(counts, int):
        return min(max(counts + round(excess * float(slopes.sum())), 0), n_tokens * sae.cfg.d_sae)
    target = (counts.to(slopes) + excess * slopes).clamp(0, n_tokens)
    return round_capacities(target, torch.zeros_like(target), round(float(target.sum())), n_tokens)[0]


@torch.no_grad()
def norm_corrected_thresholds(
    sae: Any,
    activations: torch.Tensor,
    counts: int | torch.Tensor,
    norms: torch.Tensor,
    population_mean_norm: float,
) -> torch.Tensor:
    """Thresholds exact on the sample ``activations [N, d_in]`` for ``counts`` corrected by
    :func:`norm_corrected_counts` (calibrated once with ``counts`` to measure the slopes, then with the
    corrected counts). ``-> [F]`` float64."""
    exact = thresholds_for_counts(sae, activations, counts)
    corrected = norm_corrected_counts(sae, activations, exact, counts, norms, population_mean_norm)
    return thresholds_for_counts(sae, activations, corrected)


def latent_blocks(n_tokens: int, n_latents: int, max_block_bytes: int = MAX_BLOCK_BYTES) -> list[slice]:
    """Slices of latents whose float32 scores over ``n_tokens`` take at most ``max_block_bytes`` (at least one latent)."""
    block = max(1, min(n_latents, max_block_bytes // (4 * n_tokens)))
    return [slice(start, min(start + block, n_latents)) for start in range(0, n_latents, block)]
