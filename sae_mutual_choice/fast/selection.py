"""Fast exact selection: the (token, latent) pairs each allocation rule fires, as index lists.

The sparse training path (:mod:`sae_mutual_choice.fast.sparse_step`) never builds a dense ``[B, F]``
activation tensor; it asks these functions which pairs fire. Each returns exactly the pairs that
the dense rule (:mod:`sae_mutual_choice.upstream`) fires on the same scores (ties included),
sorted by flat index ``token * F + latent``; the tests compare the two on tied and untied scores.

- Token Choice: one per-token ``topk(k + 1)``; the extra column proves that no tie crosses the
  boundary, else the dense rule decides that token.
- Mutual Choice: a cut estimated from a lattice sample of the scores (about 1,024 of the budget's
  pairs expected in it, lowered by four standard deviations of that count) lets the pairs at or
  above it through as candidates, about 1.1 × the budget; one global order statistic over them
  finishes. The count of candidates is read anyway (``nonzero``): if it is under the budget, the
  estimate was too high and a cut that is provably low enough (the budget-th largest of per-row
  shortlists) replaces it. Exact either way, with no flat top-k over all B·F scores.
- Feature Choice: latents are grouped by capacity into power-of-two widths and each group takes
  one ``topk`` over its latents' contiguous rows of the latent-major scores ``[F, B]``; a latent
  whose width cannot prove its boundary falls back to the dense rule. Without free host reads, given
  the batch's budget: every latent ranks its tokens by a tie-free key (score, then lower token), one
  ``topk`` of a fixed width serves every latent whose capacity fits it, and the few that do not (at
  most budget / (width + 1), a bound known on the host) rank all their tokens; no host read.
"""

import math
from typing import NamedTuple

import torch

from sae_mutual_choice.fast.collectives import joined_boundaries, world_size
from sae_mutual_choice.fast.host_reads import host_reads_are_free
from sae_mutual_choice.upstream.adaptive_allocation import firing_statistics as dense_firing_statistics
from sae_mutual_choice.upstream.adaptive_allocation import top_m_mask

# Feature Choice without host reads: the shared shortlist's width, relative to the mean capacity.
# Wider: a larger topk over every latent; narrower: more latents (up to budget / (width + 1)) ranked in full.
SHORTLIST_OVER_MEAN_CAPACITY = 8
# Tie-free keys of a block of latents at a time: at most this many bytes.
KEY_BLOCK_BYTES = 1 << 27

# Mutual Choice's estimated cut: the sample holds about this many of the budget's pairs (every
# (budget // it)-th score), and the cut is lowered by CUT_MARGIN_SIGMAS standard deviations of that count
# (sqrt(1024) = 32: 1.125 x the budget pass). More: a larger sample to rank, a tighter cut.
CUT_SAMPLE_WINNERS = 1024
# Four standard deviations: were the sample random, an estimate too high (and the bound cut's second
# pass) about once in 30,000 selections.
CUT_MARGIN_SIGMAS = 4
# Mutual Choice's bound cut: each row's shortlist, relative to its even share of the budget. With one
# share, rows holding far more (large-norm tokens, frequent latents) pull the cut down: on the demo's
# activations and trained SAE, 12 (rows = tokens) to 34 (rows = latents) x the budget became candidates
# to sort. Four shares let 1.0-2.9 x through (benchmarks/mc_shortlist.py, docs/performance.md).
SHORTLIST_OVER_ROW_SHARE = 4
# Mutual Choice over ranks: the first round's list, relative to the rank's expected share of the
# budget (budget / ranks). 1.5 leaves a margin of half a share before a second, full round is needed.
FIRST_ROUND_SHARE = 1.5


class Entries(NamedTuple):
    """Selected pairs, sorted by flat index: ``rows[i]`` is the token, ``cols[i]`` the latent.

    ``fires``: which pairs fire (their score is positive), where the selection kept a fixed number
    of pairs instead of reading how many fire (no host read, :mod:`sae_mutual_choice.fast.host_reads`);
    None when every pair fires.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    fires: torch.Tensor | None = None

    def firing(self) -> torch.Tensor:
        """Which pairs fire (all, when ``fires`` is None). ``-> [pairs]`` bool."""
        return torch.ones_like(self.rows, dtype=torch.bool) if self.fires is None else self.fires

    def counts(self, n_latents: int) -> torch.Tensor:
        """Fired pairs per latent, without a host read. ``-> [n_latents]`` long."""
        counts = torch.zeros(n_latents, dtype=torch.long, device=self.cols.device)
        return counts.index_add_(0, self.cols, self.firing().long())


def no_entries(like: torch.Tensor) -> Entries:
    """No pairs (on ``like``'s device)."""
    empty = like.new_zeros(0, dtype=torch.long)
    return Entries(empty, empty)


def entries_from_flat(flat: torch.Tensor, n_latents: int, in_order: bool = False) -> Entries:
    """Entries from flat indices ``token * F + latent``: in any order, or ``in_order`` (ascending) already."""
    if not in_order:
        flat = flat.sort().values
    return Entries(flat.div(n_latents, rounding_mode="floor"), flat.remainder(n_latents))


def positive_entries(scores: torch.Tensor, entries: Entries) -> Entries:
    """The entries whose score is strictly positive (only those fire): kept, where host reads are
    free; else all entries, marked in ``fires``."""
    keep = scores[entries.rows, entries.cols] > 0
    if not host_reads_are_free(scores):
        return Entries(entries.rows, entries.cols, keep)
    return Entries(entries.rows[keep], entries.cols[keep])


def token_choice_entries(scores: torch.Tensor, k: int) -> Entries:
    """The pairs :func:`~sae_mutual_choice.fast.token_choice_sae.token_choice` fires on ``scores [B, F]``."""
    n_tokens, n_latents = scores.shape
    k = min(k, n_latents)
    width = min(k + 1, n_latents)
    top = scores.topk(width, dim=1, sorted=True)
    latents = top.indices[:, :k].clone()
    if width > k and k > 0:
        crossing = (top.values[:, k] == top.values[:, k - 1]).nonzero().squeeze(1)
        if crossing.numel():
            mask = top_m_mask(scores[crossing], k, dim=1, check_ties_on_host=host_reads_are_free(scores))
            latents[crossing] = mask.nonzero()[:, 1].view(-1, k)
    tokens = torch.arange(n_tokens, device=scores.device)[:, None]
    flat = (tokens * n_latents + latents).reshape(-1)
    return positive_entries(scores, entries_from_flat(flat, n_latents))


def _latent_major(scores: torch.Tensor) -> bool:
    """Whether ``scores [B, F]`` is stored latent by latent (a transposed ``[F, B]`` tensor)."""
    return scores.stride(0) == 1 and scores.stride(1) != 1


def candidate_cut(rows: torch.Tensor, budget: int) -> torch.Tensor:
    """A score no larger than the ``budget``-th largest of ``rows [R, C]``: the ``budget``-th largest of
    each row's ``SHORTLIST_OVER_ROW_SHARE × ceil(budget / R)`` best (a subset's order statistic)."""
    per_row = min(rows.shape[1], SHORTLIST_OVER_ROW_SHARE * math.ceil(budget / rows.shape[0]))
    shortlist = rows.topk(per_row, dim=1, sorted=False).values.reshape(-1)
    return shortlist.kthvalue(shortlist.numel() - budget + 1).values


def estimated_cut(rows: torch.Tensor, budget: int) -> torch.Tensor | None:
    """A score probably (not certainly) at most the ``budget``-th largest of ``rows [R, C]``, and close to it.

    Every ``stride``-th score of the flat ``rows`` (``stride`` about ``budget / CUT_SAMPLE_WINNERS``, made
    coprime with C so that the sample visits every column) is expected to hold ``e`` of the budget's pairs;
    the cut is the sample's ``e + CUT_MARGIN_SIGMAS·sqrt(e)``-th largest score. A stratified sample, so
    heavy rows or columns do not bias it. None when the budget is too small to sample (stride under 2).
    """
    stride = budget // CUT_SAMPLE_WINNERS
    if stride < 2:
        return None
    while math.gcd(stride, rows.shape[1]) != 1:
        stride += 1
    sample = rows.reshape(-1)[::stride]
    expected = budget * sample.numel() / rows.numel()
    rank = min(sample.numel(), math.ceil(expected + CUT_MARGIN_SIGMAS * math.sqrt(expected)))
    return sample.topk(rank, sorted=False).values.min()


def _candidates(rows: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """Positions ``[n, 2]`` of the positive scores of ``rows`` at or above ``cut`` (only positive
    scores fire). ``nonzero``: a host read, of the count."""
    smallest_positive = torch.nextafter(cut.new_zeros(()), cut.new_ones(()))
    return (rows >= torch.maximum(cut, smallest_positive)).nonzero()


def mutual_choice_candidates(rows: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions ``[n, 2]`` in ``rows [R, C]`` of Mutual Choice's candidates: the positive scores at or
    above the estimated cut, or the bound cut where the estimate let fewer than ``budget`` through
    (it may then have missed pairs of the selection; the bound cut cannot). One host read, rarely two."""
    cut = estimated_cut(rows, budget)
    candidates = None if cut is None else _candidates(rows, cut)
    if candidates is None or candidates.shape[0] < budget:
        candidates = _candidates(rows, candidate_cut(rows, budget))
    return candidates


def mutual_choice_entries(scores: torch.Tensor, budget: int) -> Entries:
    """The pairs :func:`~sae_mutual_choice.upstream.mutual_choice_sae.mutual_choice` fires on ``scores [B, F]``.

    ``scores`` may be token-major or latent-major; the cuts read its rows along the memory-contiguous
    dimension.
    """
    n_latents = scores.shape[1]
    if budget <= 0:
        return no_entries(scores)
    latent_major = _latent_major(scores)
    rows_view = scores.t() if latent_major else scores
    candidates = mutual_choice_candidates(rows_view, budget)
    values = rows_view[candidates[:, 0], candidates[:, 1]]
    if latent_major:  # nonzero lists them latent by latent: into flat (token-major) order
        flat, order = (candidates[:, 1] * n_latents + candidates[:, 0]).sort()
        values = values[order]
    else:  # nonzero lists them in flat order already
        flat = candidates[:, 0] * n_latents + candidates[:, 1]
    keep = top_m_mask(values[:, None], budget, dim=0, check_ties_on_host=host_reads_are_free(values))[:, 0]
    # Exactly min(budget, candidates) are kept (a size known here): take them in flat order.
    kept = torch.nonzero_static(keep, size=min(budget, flat.shape[0]))[:, 0]
    return entries_from_flat(flat[kept], n_latents, in_order=True)


def feature_choice_entries(scores: torch.Tensor, counts: torch.Tensor, total: int | None = None) -> Entries:
    """The pairs :func:`~sae_mutual_choice.upstream.feature_choice_sae.feature_choice` fires on ``scores [B, F]``.

    ``counts [F]``: each latent's capacity (integers). ``total``: their sum (each clamped to B),
    known on the host (the batch's budget); with it, where host reads are not free, the selection
    makes none (:func:`_feature_choice_entries_fixed`; scores of at most 32 bits). Fastest when
    ``scores`` is latent-major (``scores.t()`` contiguous): every latent's tokens are then one
    contiguous row.
    """
    n_tokens, n_latents = scores.shape
    by_latent = scores.t()
    counts = counts.to(scores.device, torch.long).clamp(0, n_tokens)
    if total is not None and scores.element_size() <= 4 and not host_reads_are_free(scores):
        return _feature_choice_entries_fixed(scores, counts, total)
    # The smallest power of two above each count: room to see past the boundary.
    widths = (2 ** torch.log2(counts.double() + 1).ceil()).long().clamp(max=n_tokens)
    widths = torch.where(counts == n_tokens, n_tokens, widths)
    pieces = []
    for width in widths[counts > 0].unique().tolist():
        latents = ((widths == width) & (counts > 0)).nonzero().squeeze(1)
        rows = by_latent[latents]
        need = counts[latents]
        top = rows.topk(width, dim=1, sorted=True)
        # Within the shortlist, order by token so that top_m_mask's ties go to the lower token.
        tokens, order = top.indices.sort(dim=1)
        chosen = top_m_mask(
            top.values.gather(1, order), need, dim=1, check_ties_on_host=host_reads_are_free(rows)
        )
        if width < n_tokens:
            boundary = top.values.gather(1, (need - 1)[:, None])[:, 0]
            unproven = (top.values[:, -1] == boundary).nonzero().squeeze(1)
            if unproven.numel():
                full = top_m_mask(
                    rows[unproven], need[unproven], dim=1, check_ties_on_host=host_reads_are_free(rows)
                )
                extra = full.nonzero()
                pieces.append(extra[:, 1] * n_latents + latents[unproven][extra[:, 0]])
                chosen[unproven] = False
        picked = chosen.nonzero()
        pieces.append(tokens[picked[:, 0], picked[:, 1]] * n_latents + latents[picked[:, 0]])
    if not pieces:
        return no_entries(scores)
    return positive_entries(scores, entries_from_flat(torch.cat(pieces), n_latents))


def _feature_choice_entries_fixed(scores: torch.Tensor, counts: torch.Tensor, total: int) -> Entries:
    """:func:`feature_choice_entries` without a host read; ``counts`` clamped, summing to ``total``.

    Each latent ranks its tokens by :func:`_ranked_tokens` (the dense rule's order, so no tie needs
    a check). Latents whose count fits the shortlist take its head; at most ``total // (width + 1)``
    latents have a larger count, and the ones with the largest counts rank all their tokens. The
    selection is exactly ``total`` pairs, picked by ``nonzero_static`` (a size known on the host).
    """
    n_tokens, n_latents = scores.shape
    by_latent = scores.t()
    target = max(1.0, SHORTLIST_OVER_MEAN_CAPACITY * total / n_latents)
    width = min(n_tokens, 1 << math.ceil(math.log2(target)))
    n_head = min(n_latents, total // (width + 1)) if width < n_tokens else 0
    torch._assert_async(counts.sum() == total, "feature_choice_entries: counts must sum to total")
    latents = torch.arange(n_latents, device=scores.device)
    flat = [_ranked_tokens(by_latent, latents, width) * n_latents + latents[:, None]]
    take = [(torch.arange(width, device=scores.device) < counts[:, None]) & (counts <= width)[:, None]]
    if n_head:
        head = counts.topk(n_head).indices
        flat.append(_ranked_tokens(by_latent, head, n_tokens) * n_latents + head[:, None])
        beyond = counts[head] > width
        take.append((torch.arange(n_tokens, device=scores.device) < counts[head][:, None]) & beyond[:, None])
    picked = torch.nonzero_static(torch.cat([t.reshape(-1) for t in take]), size=total)[:, 0]
    chosen = torch.cat([f.reshape(-1) for f in flat])[picked]
    return positive_entries(scores, entries_from_flat(chosen, n_latents))


def _ranked_tokens(by_latent: torch.Tensor, latents: torch.Tensor, width: int) -> torch.Tensor:
    """For each of ``latents``, the tokens of its ``width`` largest scores in ``by_latent [F, B]``, best
    first, ties to the lower token (the dense rules' order). ``-> [len(latents), width]``.

    Ranked by an int64 key, unique per row: the score's float32 bits mapped to integers of the same
    order, then the token, reversed. (-0.0 sorts below 0.0; neither fires.) Keys are built
    ``KEY_BLOCK_BYTES`` at a time.
    """
    n_tokens = by_latent.shape[1]
    reversed_token = torch.arange(n_tokens - 1, -1, -1, device=by_latent.device)
    block = max(1, KEY_BLOCK_BYTES // (8 * n_tokens))
    ranked = []
    for start in range(0, latents.shape[0], block):
        bits = by_latent[latents[start : start + block]].float().contiguous().view(torch.int32)
        keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() << 32) | reversed_token
        ranked.append(keys.topk(width, dim=1, sorted=True).indices)
    return torch.cat(ranked)


def mutual_choice_entries_over_ranks(scores: torch.Tensor, budget: int) -> Entries:
    """This rank's pairs of the joined batch's Mutual Choice selection; ``budget`` is the joined batch's.

    The rank selects its own best pairs (the single-process rule), sends their scores
    (:func:`~sae_mutual_choice.fast.collectives.joined_boundaries`), and keeps those above the joined
    boundary and its share of the pairs at it, in flat order. It first sends
    ``FIRST_ROUND_SHARE`` times its expected share of the budget; only if some rank's list did
    not reach the boundary does every rank send its full ``budget`` best (exact either way). Every
    rank must pass the same budget.
    """
    if budget <= 0:
        return no_entries(scores)
    full = min(budget, scores.numel())
    first = min(full, math.ceil(FIRST_ROUND_SHARE * budget / world_size()))
    for n_sent in dict.fromkeys((first, full)):
        local = mutual_choice_entries(scores, n_sent)  # flat order, positive scores only (no fires)
        values = scores[local.rows, local.cols]
        sent = torch.cat([values, values.new_full((n_sent - values.shape[0],), -torch.inf)])
        groups = torch.zeros(n_sent, dtype=torch.long, device=scores.device)
        boundary, taken, covered = joined_boundaries(
            sent, groups, torch.tensor([budget], device=scores.device)
        )
        if covered or n_sent == full:
            break
    keep = _joined_keep(values, groups[: values.shape[0]], boundary, taken)
    return Entries(local.rows[keep], local.cols[keep])


def feature_choice_entries_over_ranks(scores: torch.Tensor, counts: torch.Tensor) -> Entries:
    """This rank's pairs of the joined batch's Feature Choice selection; ``counts [F]`` are the joined capacities.

    The rank selects each latent's ``min(m_j, B_local)`` best tokens (the single-process rule),
    sends their scores, ``sum m_j`` at most, and keeps per latent those above the joined boundary
    and its share of the tokens at it, in token order. Every rank must pass the same counts.
    """
    n_tokens, n_latents = scores.shape
    counts = counts.to(scores.device, torch.long)
    n_sent = counts.clamp(0, n_tokens)
    local = _firing_only(feature_choice_entries(scores, n_sent))
    order = (local.cols * n_tokens + local.rows).argsort()  # latent by latent, tokens in order
    rows, cols = local.rows[order], local.cols[order]
    values = scores[rows, cols]
    starts = n_sent.cumsum(0) - n_sent
    real = torch.bincount(cols, minlength=n_latents)
    within = torch.arange(cols.shape[0], device=cols.device) - (real.cumsum(0) - real)[cols]
    sent = values.new_full((int(n_sent.sum()),), -torch.inf).index_copy_(0, starts[cols] + within, values)
    groups = torch.arange(n_latents, device=scores.device).repeat_interleave(n_sent)
    boundary, taken, _ = joined_boundaries(sent, groups, counts)  # full lists: exact
    keep = _joined_keep(values, cols, boundary, taken)
    return entries_from_flat(rows[keep] * n_latents + cols[keep], n_latents)


def _firing_only(entries: Entries) -> Entries:
    """The entries that fire, as a list of those only (a host read where ``fires`` is set)."""
    if entries.fires is None:
        return entries
    return Entries(entries.rows[entries.fires], entries.cols[entries.fires])


def _joined_keep(
    values: torch.Tensor, groups: torch.Tensor, boundary: torch.Tensor, taken: torch.Tensor
) -> torch.Tensor:
    """Mask of ``values`` (grouped, in tie order within a group) above their group's boundary or
    among the first ``taken`` of the group at it."""
    at = boundary[groups]
    tied = values == at
    n_groups = boundary.shape[0]
    tied_per_group = torch.zeros(n_groups, dtype=torch.long, device=values.device).index_add_(
        0, groups, tied.long()
    )
    tie_rank = tied.long().cumsum(0) - (tied_per_group.cumsum(0) - tied_per_group)[groups]
    return (values > at) | (tied & (tie_rank <= taken[groups]))


def firing_statistics(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, how many pairs fired and the smallest fired activation (inf where none), from
    activations ``[..., F]``, dense or sparse COO (coalesced); computed without a host read. ``-> ([F], [F])``."""
    if not feature_acts.is_sparse:
        return dense_firing_statistics(feature_acts)
    n_latents = feature_acts.shape[-1]
    acts = feature_acts.detach().coalesce()
    cols, values = acts.indices()[-1], acts.values()
    fired = values > 0
    counts = torch.zeros(n_latents, dtype=torch.long, device=cols.device).index_add_(0, cols, fired.long())
    smallest = values.new_full((n_latents,), torch.inf).scatter_reduce_(
        0, cols, torch.where(fired, values, torch.inf), "amin"
    )
    return counts, smallest
