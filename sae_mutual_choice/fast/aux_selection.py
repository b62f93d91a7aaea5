"""The aux loss's candidate search with host reads, where they cost nothing (CPU).

Same selection as :func:`sae_mutual_choice.upstream.adaptive_allocation.aux_selection`, by a cheaper search
when the number of candidates (under-used latents) can be read: only their columns, or every
column unmasked when all latents are candidates; none at all when there is no candidate.
"""

import torch

from sae_mutual_choice.fast.host_reads import host_reads_are_free
from sae_mutual_choice.upstream.adaptive_allocation import AuxSelection, search_masked
from sae_mutual_choice.upstream.adaptive_allocation import aux_selection as fixed_size_aux_selection


def search_columns(hidden_pre: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's ``k`` best candidates (``k`` at most their number), from a copy of their columns
    (a host read: ``nonzero``). ``-> [..., k]`` latent ids."""
    columns = candidates.nonzero().squeeze(1)
    return columns[hidden_pre[..., columns].topk(k, sorted=False).indices]


def search_unmasked(hidden_pre: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:  # noqa: ARG001
    """Each token's ``k`` best latents, when every latent is a candidate (no copy)."""
    return hidden_pre.topk(k, sorted=False).indices


# Up to this share of the latents as candidates, search_columns is faster than search_masked
# (benchmarks/aux_selection.py, CPU; above it, about even).
COLUMNS_SEARCH_SHARE = 0.8


@torch.no_grad()
def aux_selection(hidden_pre: torch.Tensor, underuse: torch.Tensor, d_in: int) -> AuxSelection | None:
    """:func:`~sae_mutual_choice.upstream.adaptive_allocation.aux_selection`, searched faster where host reads are free.

    There the number of candidates is read: None when there is none; :func:`search_columns` up to
    ``COLUMNS_SEARCH_SHARE`` of the latents, :func:`search_unmasked` when every latent is one, else
    :func:`search_masked`; each token takes ``min(d_in // 2, candidates)`` latents. Elsewhere, the
    fixed-size selection.
    """
    k_aux = d_in // 2
    if k_aux == 0 or not host_reads_are_free(hidden_pre):
        return fixed_size_aux_selection(hidden_pre, underuse, d_in)
    candidates = underuse > 0
    n_latents = hidden_pre.shape[-1]
    n_candidates = int(candidates.sum())
    if n_candidates == 0:
        return None
    scale = min(float(underuse.sum()) / k_aux, 1.0)  # as SAELens's AuxK computes it
    if n_candidates == n_latents:
        search = search_unmasked
    elif n_candidates <= COLUMNS_SEARCH_SHARE * n_latents:
        search = search_columns
    else:
        search = search_masked
    latents = search(hidden_pre, candidates, min(k_aux, n_candidates))
    return AuxSelection(latents, underuse.to(hidden_pre.dtype)[latents], scale)
