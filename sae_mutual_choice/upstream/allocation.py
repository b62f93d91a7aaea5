"""The allocation rules: which (token, latent) pairs of a batch fire.

Pure tensor functions, no module state. Each takes the batch's scores ``[B, F]`` (SAELens's
``hidden_pre``: B tokens, F latents) and returns the sparse activations ``[B, F]``: the score where
a pair fires, 0 elsewhere. Only strictly positive scores fire, so a rule may fill fewer slots than
it is allowed. Ties at a selection boundary go to the lower index (token index for Feature
Choice, latent index for Token Choice, flat ``token * F + latent`` for Mutual Choice), so the
output never depends on the sorting kernel.
"""

from collections.abc import Callable

import torch


def batch_budget(k: float, n_tokens: int) -> int:
    """Total number of (token, latent) pairs a batch of ``n_tokens`` may fire: ``int(k * n_tokens)``.

    Rounded exactly as SAELens's BatchTopK rounds it (truncation), so the two rules agree.
    """
    return int(k * n_tokens)


def top_m_mask(
    scores: torch.Tensor, m: torch.Tensor | int, dim: int, check_ties_on_host: bool = False
) -> torch.Tensor:
    """Boolean mask of the ``m`` largest entries of ``scores`` along ``dim``.

    ``scores`` is 2-D; ``m`` is an int or a tensor with one count per slice (shape
    ``[scores.shape[1 - dim]]``), each clamped to ``scores.shape[dim]``. Ties at the boundary are
    resolved towards the lower index along ``dim``, so exactly ``m`` entries are selected.
    ``check_ties_on_host``: first read on the host whether any tie straddles a boundary, and skip
    the tie pass when none does (cheaper where a host read costs nothing, as on CPU).
    """
    n = scores.shape[dim]
    other = scores.shape[1 - dim]
    if isinstance(m, int):  # filled on the device, not copied from the host (a copy would sync on CUDA)
        m_max = min(max(m, 0), n) if other else 0
        counts = scores.new_full((), m_max, dtype=torch.long)
    else:
        counts = m.to(scores.device, torch.long).clamp(0, n)
        m_max = int(counts.max()) if counts.numel() else 0
    counts = counts.expand(other).unsqueeze(dim)
    if m_max == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if isinstance(m, int):
        # The m-th largest, from the shorter of two unsorted top-k's: the m largest or the n - m + 1 smallest.
        if 2 * m_max > n:
            boundary = scores.topk(n - m_max + 1, dim=dim, largest=False, sorted=False).values.amax(
                dim, keepdim=True
            )
        else:
            boundary = scores.topk(m_max, dim=dim, sorted=False).values.amin(dim, keepdim=True)
    else:
        top_values = scores.topk(m_max, dim=dim, sorted=True).values
        boundary = top_values.gather(dim, (counts - 1).clamp(min=0))
    above = scores > boundary
    tied = scores == boundary
    still_needed = counts - above.sum(dim, keepdim=True)
    # Where a tie straddles the boundary, keep the first tied entries along dim. Elsewhere this
    # keeps every tied entry, so it is applied without asking unless asking is cheap.
    if not check_ties_on_host or bool((tied.sum(dim, keepdim=True) > still_needed).any()):
        position = tied.cumsum(dim, dtype=torch.int32 if n < 2**31 else torch.int64)
        tied = tied & (position <= still_needed)
    return (above | tied) & (counts > 0)


def _fire(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Scores where selected and strictly positive, else 0 (gradient flows to fired pairs only)."""
    return torch.where(selected & (scores > 0), scores, scores.new_zeros(()))


def token_choice(scores: torch.Tensor, k: int) -> torch.Tensor:
    """TopK: every token keeps its ``k`` best latents. ``[B, F] -> [B, F]``."""
    return _fire(scores, top_m_mask(scores, k, dim=1))


def mutual_choice_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Boolean ``[B, F]`` mask of the ``budget`` largest scores of the whole batch."""
    flat = scores.reshape(-1, 1)
    return top_m_mask(flat, budget, dim=0).reshape(scores.shape)


def mutual_choice(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Mutual Choice: the ``budget`` largest (token, latent) scores of the batch fire. ``[B, F] -> [B, F]``."""
    return _fire(scores, mutual_choice_mask(scores, budget))


def feature_choice(scores: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Feature Choice: latent ``j`` keeps its ``capacities[j]`` best tokens. ``[B, F], [F] -> [B, F]``."""
    if capacities.shape != scores.shape[1:]:
        raise ValueError(
            f"capacities must have shape [{scores.shape[1]}] (one per latent), got {list(capacities.shape)}"
        )
    return _fire(scores, top_m_mask(scores, capacities, dim=0))


def over_tokens(rule: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``[B, F]`` rule so it takes scores ``[..., F]``: leading dimensions are flattened into B."""

    def apply(scores: torch.Tensor) -> torch.Tensor:
        return rule(scores.reshape(-1, scores.shape[-1])).reshape(scores.shape)

    return apply
