"""Zipf curves over latent ranks: fitting them, and turning them into Feature Choice capacities.

A latent's rank is its position when latents are sorted by a usage statistic, largest first
(rank 1 is the most used); ties go to the lower latent index. A Zipf curve gives rank ``r`` the
share ``r**-exponent / sum_s s**-exponent``.
"""

import math

import torch


def ranks_of(statistic: torch.Tensor) -> torch.Tensor:
    """1-based rank of every latent by ``statistic`` (largest first, ties to the lower index). ``[F] -> [F]``."""
    order = torch.sort(statistic, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, statistic.numel() + 1, device=statistic.device)
    return ranks


def zipf_shares(n: int, exponent: float | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Shares of ranks ``1..n`` under a Zipf law with ``exponent``; float64, sums to 1. ``-> [n]``."""
    weights = torch.arange(1, n + 1, device=device, dtype=torch.float64).pow(-exponent)
    return weights / weights.sum()


def fit_zipf(statistic: torch.Tensor, fit_fraction: float) -> tuple[float, float]:
    """Fit ``log s = log_scale - exponent * log rank`` to the head of the rank curve of ``statistic``.

    The head is the ``ceil(fit_fraction * F)`` highest ranks; zero entries are left out of the
    least-squares fit (their logarithm is undefined). The paper reports that latent densities
    follow a Zipf law except at the low-density end, so the head is where the law is fitted and
    the tail is what it is compared against. Returns ``(exponent, log_scale)``; ``(0.0, -inf)``
    when fewer than two positive points are available. :func:`fitted_zipf` is the same fit as
    device scalars, without a host read.
    """
    exponent, log_scale = fitted_zipf(statistic, fit_fraction)
    return float(exponent), float(log_scale)


def fitted_zipf(statistic: torch.Tensor, fit_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_zipf` as float64 scalars on ``statistic``'s device: a least-squares fit weighted by
    positivity (zeros weigh nothing), so no host read decides which points count."""
    values = torch.sort(statistic.detach().double().flatten(), descending=True).values
    head = values[: max(1, math.ceil(fit_fraction * values.numel()))]
    x = torch.arange(1, head.numel() + 1, dtype=torch.float64, device=head.device).log()
    positive = head > 0
    weight = positive.double()
    y = torch.where(positive, head, 1.0).log()
    n = weight.sum()
    x_mean = (weight * x).sum() / n.clamp(min=1)
    y_mean = (weight * y).sum() / n.clamp(min=1)
    x_centred = weight * (x - x_mean)
    spread = x_centred.pow(2).sum()
    slope = (x_centred * (y - y_mean)).sum() / spread.clamp(min=torch.finfo(torch.float64).tiny)
    fitted = n >= 2
    return torch.where(fitted, -slope, 0.0), torch.where(fitted, y_mean - slope * x_mean, -math.inf)


def zipf_capacities(
    demand: torch.Tensor,
    budget: int,
    n_tokens: int,
    exponent: float | torch.Tensor,
    min_capacity_ratio: float,
) -> torch.Tensor:
    """Real-valued per-latent capacities for one batch. ``[F] -> [F]`` (float64).

    Latents are ranked by ``demand``; rank ``r`` gets the share
    ``min_capacity_ratio / F + (1 - min_capacity_ratio) * zipf(r)`` of ``budget``, so every latent
    owns at least ``min_capacity_ratio`` of the uniform share (see :func:`capacities_from_shares`).
    """
    by_rank = zipf_shares(demand.numel(), exponent, demand.device)
    return capacities_from_shares(by_rank[ranks_of(demand) - 1], budget, n_tokens, min_capacity_ratio)


def demand_capacities(
    demand: torch.Tensor, budget: int, n_tokens: int, min_capacity_ratio: float
) -> torch.Tensor:
    """Capacities in proportion to ``demand`` itself (uniform while no latent has any). ``[F] -> [F]`` float64.

    Latent j gets the share ``min_capacity_ratio / F + (1 - min_capacity_ratio) * demand_j / sum(demand)``
    (see :func:`capacities_from_shares`): a latent is offered the tokens the data asked of it, no
    more, where a Zipf law fitted to the head can offer its top ranks the whole batch.
    """
    total = demand.double().sum()
    uniform = torch.full_like(demand, 1 / demand.numel(), dtype=torch.float64)
    shares = torch.where(
        total > 0, demand.double() / total.clamp(min=torch.finfo(torch.float64).tiny), uniform
    )
    return capacities_from_shares(shares, budget, n_tokens, min_capacity_ratio)


def capacities_from_shares(
    shares: torch.Tensor, budget: int, n_tokens: int, min_capacity_ratio: float
) -> torch.Tensor:
    """Per-latent capacities from shares of the budget (``[F]``, summing to 1), with the floor and the cap.

    Every latent owns ``min_capacity_ratio`` of the uniform share; no latent can take more than the
    ``n_tokens`` tokens of the batch: capacities over that cap are set to it and the excess is
    redistributed to the others in proportion to their shares (water filling). The result sums
    to ``budget`` and lies in ``[0, n_tokens]``. ``-> [F]`` float64.
    """
    n_latents = shares.numel()
    if budget > n_latents * n_tokens:
        raise ValueError(f"budget {budget} exceeds n_latents * n_tokens = {n_latents * n_tokens}")
    shares = min_capacity_ratio / n_latents + (1 - min_capacity_ratio) * shares.double()
    # Water filling in closed form (no host read): with the c largest shares capped at n_tokens, the
    # others share budget - c * n_tokens in proportion; c is the smallest count at which the largest
    # uncapped capacity fits under the cap (capping only raises the others' level, so the loop that
    # caps whatever exceeds, level by level, stops at that same c).
    ordered = torch.sort(shares, descending=True, stable=True)
    counts = torch.arange(n_latents, device=shares.device, dtype=torch.float64)
    rest = ordered.values.flip(0).cumsum(0).flip(0)  # shares of ranks c+1.. (summed smallest first)
    fits = ordered.values * (budget - counts * n_tokens) <= n_tokens * rest
    n_capped = fits.to(torch.uint8).argmax()  # the first c that fits (c = n_latents - 1 always does)
    capped = torch.empty_like(fits).scatter_(0, ordered.indices, counts < n_capped)
    free_shares = torch.where(capped, 0.0, shares)
    remaining = budget - n_tokens * n_capped.double()
    # Where the uncapped latents have no share left (zero shares, e.g. no demand and no floor), the
    # rest of the budget is spread evenly over them; it fits, since budget <= n_latents * n_tokens.
    free_total = free_shares.sum()
    even = torch.where(capped, 0.0, remaining / (n_latents - n_capped).clamp(min=1).double())
    level = torch.where(
        free_total > 0, remaining / free_total.clamp(min=torch.finfo(torch.float64).tiny), 0.0
    )
    proportional = torch.where(n_capped > 0, free_shares * level, shares * budget)  # none capped: as they are
    uncapped = torch.where(free_total > 0, proportional, even)
    return torch.where(capped, float(n_tokens), uncapped)


def round_capacities(
    capacities: torch.Tensor, carry: torch.Tensor, budget: int, n_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer capacities summing to ``budget`` exactly, with the rounding error carried over.

    ``capacities`` are the real targets (summing to ``budget``), ``carry`` the rounding error each
    latent was left with last batch (float64, sums to 0). Largest-remainder rounding of
    ``capacities + carry``: every latent gets the floor (within ``[0, n_tokens]``), the latents under
    the cap with the largest remainders (ties to the lower index) get one more until the budget is
    met, and no latent exceeds ``n_tokens``; should that not reach the budget (a latent at the cap
    holding a positive carry), the rest fills the others' room in the same order. A latent whose capacity is below one token is therefore served in a fraction of
    the batches, rotating, and over many batches receives its real capacity on average.
    Returns ``(integer capacities [F] long, new carry [F] float64)``.
    """
    target = capacities.double() + carry.double()
    rounded = target.floor().clamp(0, n_tokens)
    remainder = target - rounded
    shortfall = budget - rounded.sum()  # a device value: both corrections below are computed, one applies
    # More for the largest remainders among latents under the cap (ties to the lower index)...
    up = _spread(shortfall.clamp(min=0), n_tokens - rounded, remainder, descending=True)
    # ...or less for the smallest among latents above 0 (the carry's float drift, or targets below 0).
    down = _spread((-shortfall).clamp(min=0), rounded, remainder, descending=False)
    rounded = rounded + up - down
    return rounded.long(), target - rounded


def _spread(
    units: torch.Tensor, room: torch.Tensor, priority: torch.Tensor, descending: bool
) -> torch.Tensor:
    """``units`` (a float64 scalar, at most ``room.sum()``) spread over latents with ``room [F]``, by ``priority``.

    One each, in priority order (ties to the lower index), to up to ``units`` latents with room;
    what is left (only when a latent at a bound holds a large carry) fills the remaining room in the
    same order. No host read. ``-> [F]`` float64.
    """
    has_room = room > 0
    blocked = -math.inf if descending else math.inf
    order = _rank(torch.where(has_room, priority, blocked), descending=descending)
    first = (has_room & (order < units)).double()
    left = units - first.sum()
    room_left = room - first
    by_order = torch.empty_like(room_left).scatter_(0, order, room_left)  # room_left in priority order
    before = (by_order.cumsum(0) - by_order)[order]  # room ahead of each latent in that order
    return first + (left - before).clamp(min=0).minimum(room_left)


def _rank(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """0-based position of every entry in a stable sort of ``values``. ``[F] -> [F]``."""
    order = torch.sort(values, descending=descending, stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
