"""Exact threshold calibration for the per-token (JumpReLU) export of Mutual and Feature Choice SAEs.

At inference the batch is gone, so a latent fires when its score exceeds a threshold. The
training-time thresholds are running estimates; :func:`calibrate_thresholds` replaces them with
exact order statistics on activations the user supplies: Mutual Choice gets the one global
threshold under which ``int(k * N)`` of the ``N x F`` scores lie above it, Feature Choice gets, for
each latent, the threshold under which exactly its capacity's worth of the ``N`` tokens lie above
it. Scores are computed a block of latents at a time, so memory is bounded by ``N`` times the block.
"""

import torch

from sae_mutual_choice.base import validate_activations
from sae_mutual_choice.feature_choice import FeatureChoiceTrainingSAE
from sae_mutual_choice.mutual_choice import MutualChoiceTrainingSAE

CalibratedSAE = MutualChoiceTrainingSAE | FeatureChoiceTrainingSAE


def latent_scores(sae: CalibratedSAE, sae_in: torch.Tensor, latents: slice) -> torch.Tensor:
    """The training scores (``hidden_pre``) of a block of latents. ``[N, d_in] -> [N, len(latents)]``.

    ``sae_in`` has been through ``sae.process_sae_in``. Equals ``sae.encode_with_hidden_pre(x)[1]``
    restricted to ``latents``, including the decoder-norm rescaling.
    """
    scores = sae_in @ sae.W_enc[:, latents] + sae.b_enc[latents]
    if sae.cfg.rescale_acts_by_decoder_norm:
        scores = scores * sae.W_dec[latents].norm(dim=-1)
    return scores


@torch.no_grad()
def calibrate_thresholds(
    sae: CalibratedSAE, activations: torch.Tensor, max_block_bytes: int = 1 << 28
) -> torch.Tensor:
    """Set ``sae``'s inference thresholds exactly from ``activations`` and return them (``[F]``).

    ``activations``: ``[..., d_in]`` raw activations from the training distribution (use held-out
    data, as many tokens as fit). After this, ``sae.save_inference_model`` (and the runner's final
    save) exports these thresholds, and the exported JumpReLU SAE fires on these activations with
    a mean L0 of ``int(k * N) / N`` (Mutual Choice) or each latent at its capacity (Feature Choice).
    A threshold is never below 0: only positive scores fire.
    """
    if not isinstance(sae, (MutualChoiceTrainingSAE, FeatureChoiceTrainingSAE)):
        raise TypeError(
            f"calibrate_thresholds takes a mutual_choice or feature_choice training SAE, got {type(sae).__name__}"
        )
    validate_activations(activations, sae.cfg.d_in)
    sae_in = sae.process_sae_in(activations.reshape(-1, sae.cfg.d_in).to(sae.W_enc.device))
    n_tokens, n_latents = sae_in.shape[0], sae.cfg.d_sae
    block = max(1, min(n_latents, max_block_bytes // (4 * n_tokens)))
    blocks = [slice(start, min(start + block, n_latents)) for start in range(0, n_latents, block)]
    counts = sae.calibration_counts(n_tokens)
    if isinstance(counts, int):
        thresholds = torch.full((n_latents,), _global_threshold(sae, sae_in, blocks, counts))
    else:
        thresholds = torch.cat(
            [_per_latent_thresholds(latent_scores(sae, sae_in, s), counts[s]) for s in blocks]
        )
    thresholds = thresholds.clamp(min=0).to(sae.W_enc.device)
    sae.set_inference_thresholds(thresholds)
    return sae.inference_thresholds()


def _per_latent_thresholds(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For each column, the ``(count + 1)``-th largest score (``-inf`` when count is every token)."""
    n_tokens = scores.shape[0]
    depth = min(n_tokens, int(counts.max()) + 1)
    ordered = scores.float().topk(depth, dim=0).values
    below = ordered.gather(0, counts.clamp(max=depth - 1)[None].to(scores.device))[0]
    return torch.where(counts.to(scores.device) >= n_tokens, -torch.inf, below).cpu()


def _global_threshold(sae: CalibratedSAE, sae_in: torch.Tensor, blocks: list[slice], count: int) -> float:
    """The ``(count + 1)``-th largest score over all tokens and latents (``-inf`` if there is none)."""
    kept = sae_in.new_empty(0, dtype=torch.float32)
    for latents in blocks:
        merged = torch.cat([kept, latent_scores(sae, sae_in, latents).float().flatten()])
        kept = merged.topk(min(count + 1, merged.numel())).values
    return float(kept[count]) if kept.numel() > count else -float("inf")
