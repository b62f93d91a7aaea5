"""``aux_zipf_loss``: AuxK generalised from dead latents to latents under-used relative to Zipf.

SAELens's AuxK (``calculate_topk_aux_loss``) lets each token's ``k_aux = d_in // 2`` highest-scoring
*dead* latents reconstruct the detached residual ``e = x - x_hat`` (no ``b_dec``), scaled by
``min(n_dead / k_aux, 1)``. Here every latent has an under-use weight ``w_j`` in ``[0, 1]``; the
candidates are the latents with ``w_j > 0``, each selected latent's activation is multiplied by
``w_j``, and the scale is ``min(sum_j w_j / k_aux, 1)``. With ``w`` the dead mask this is AuxK
exactly.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_mutual_choice.upstream.zipf import fitted_zipf, ranks_of


@torch.no_grad()
def underuse_weights(
    usage: torch.Tensor, fit_fraction: float, underuse_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Under-use weight of every latent relative to a Zipf law fitted to ``usage``. ``[F] -> [F]``.

    ``usage`` is each latent's firing rate. A Zipf law is fitted to the head of its rank curve
    (:func:`sae_mutual_choice.upstream.zipf.fitted_zipf`), giving every rank a target rate ``t_r``; latent ``j``
    at rank ``r`` gets ``w_j = clamp(1 - usage_j / (underuse_ratio * t_r), 0, 1)``: 0 once it fires
    at least ``underuse_ratio`` of its target, 1 when it never fires; all 0 when no law can be
    fitted (fewer than two latents fire). Returns ``(w, exponent)``, the exponent a float64 scalar
    tensor (computed on the device, not read).
    """
    exponent, log_scale = fitted_zipf(usage, fit_fraction)
    ranks = ranks_of(usage).to(torch.float64)
    target = torch.exp(log_scale - exponent * ranks.log())
    weights = (1 - usage.double() / (underuse_ratio * target)).clamp(0, 1)
    weights = torch.where(torch.isfinite(log_scale), weights, 0.0)
    return weights.to(usage.dtype), exponent


class AuxSelection(NamedTuple):
    """Each token's selected under-used latents ``latents [B, k_aux]``, their weights, and the loss scale.

    Selected latents that are not candidates (on the fixed-size path) have weight 0.
    """

    latents: torch.Tensor
    weights: torch.Tensor
    scale: float | torch.Tensor


def search_masked(hidden_pre: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's ``k`` best latents with non-candidates scored -inf, in a copy of all columns (no
    host read; non-candidates fill the rest when there are fewer than ``k`` candidates)."""
    return torch.where(candidates, hidden_pre, -torch.inf).topk(k, sorted=False).indices


@torch.no_grad()
def aux_selection(hidden_pre: torch.Tensor, underuse: torch.Tensor, d_in: int) -> AuxSelection | None:
    """Which latents each token's aux reconstruction uses, with no host read.

    ``hidden_pre``: ``[..., F]`` scores; ``underuse``: ``[F]`` weights in ``[0, 1]``. Each token takes
    its ``k_aux = d_in // 2`` best-scoring candidates (latents with weight > 0), all of them if there
    are fewer: a selection of fixed size ``min(k_aux, F)`` per token (:func:`search_masked`), with
    non-candidates filling it at weight 0, which adds exactly nothing to the loss or its gradients.
    None (no aux loss) when ``k_aux`` is 0 (``d_in = 1``): SAELens's AuxK would divide by it.
    """
    k_aux = d_in // 2
    if k_aux == 0:
        return None
    latents = search_masked(hidden_pre, underuse > 0, min(k_aux, hidden_pre.shape[-1]))
    scale = (underuse.sum() / k_aux).clamp(max=1.0)
    return AuxSelection(latents, underuse.to(hidden_pre.dtype)[latents], scale)


AuxSelector = Callable[[torch.Tensor, torch.Tensor, int], "AuxSelection | None"]


def aux_zipf_loss(
    sae_in: torch.Tensor,
    sae_out: torch.Tensor,
    hidden_pre: torch.Tensor,
    underuse: torch.Tensor,
    W_dec: torch.Tensor,
    rescale_acts_by_decoder_norm: bool,
    coefficient: float,
    select: AuxSelector = aux_selection,
) -> torch.Tensor:
    """The auxiliary loss for one batch (a scalar), on the dense activations.

    ``sae_in``, ``sae_out``: ``[B, d_in]``; ``hidden_pre``: ``[B, F]`` scores; ``underuse``: ``[F]``
    weights in ``[0, 1]``; ``W_dec``: ``[F, d_in]``. The residual is detached, so only the
    selected under-used latents (their encoder rows and decoder rows) receive gradient.
    ``select``: how the latents are chosen (:func:`aux_selection`, or a faster equivalent).
    """
    selection = select(hidden_pre, underuse, sae_in.shape[-1])
    if selection is None:
        return sae_out.new_tensor(0.0)
    values = hidden_pre.gather(-1, selection.latents) * selection.weights
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, selection.latents, values)
    recons = act_times_W_dec(aux_acts, W_dec, rescale_acts_by_decoder_norm)
    return aux_reconstruction_loss(recons, sae_in, sae_out, selection.scale, coefficient)


def aux_reconstruction_loss(
    recons: torch.Tensor,
    sae_in: torch.Tensor,
    sae_out: torch.Tensor,
    scale: float | torch.Tensor,
    coefficient: float,
) -> torch.Tensor:
    """``coefficient * scale * |recons - (sae_in - sae_out)|^2``, summed over d_in, mean over tokens.

    The residual ``sae_in - sae_out`` is detached.
    """
    residual = (sae_in - sae_out).detach()
    return coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()
