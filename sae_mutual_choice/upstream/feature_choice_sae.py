"""Feature Choice SAEs (Ayonrinde 2024, arXiv:2411.02124), saved as JumpReLU SAEs.

Every latent takes its best tokens up to its capacity, and the capacities of a batch
sum to its budget ``int(k * B)``, so hard tokens get more latents and no latent is
starved. Capacities are uniform, or follow the latents' *demand*: the share of the
batch's Mutual Choice selection each latent would win, a running average over training
(in proportion to it, or Zipf-shaped over its ranks, the paper's shape). Exported as a
JumpReLU SAE with one threshold per latent (see :mod:`mutual_choice_sae` for where the
thresholds come from).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from typing_extensions import override

from sae_mutual_choice.upstream.adaptive_allocation import (
    AuxLoss,
    batch_budget,
    check_choice,
    check_range,
    debiased,
    ema_update_,
    fire,
    fitted_zipf,
    over_tokens,
    ranks_of,
    round_capacities,
    top_m_mask,
)
from sae_mutual_choice.upstream.mutual_choice_sae import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    mutual_choice_mask,
)

CAPACITIES = ("uniform", "zipf", "demand")


def feature_choice(scores: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Feature Choice: latent ``j`` keeps its ``capacities[j]`` best tokens.

    Only positive scores fire; ties go to the lower token index.

    Args:
        scores: (batch_size, d_sae) scores.
        capacities: (d_sae,) integer capacities.

    Returns:
        (batch_size, d_sae) activations.
    """
    if capacities.shape != scores.shape[1:]:
        raise ValueError(
            f"capacities must have shape [{scores.shape[1]}] (one per latent), "
            f"got {list(capacities.shape)}"
        )
    return fire(scores, top_m_mask(scores, capacities, dim=0))


def zipf_shares(
    n: int, exponent: float | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Shares of ranks 1..n under a Zipf law; float64, summing to 1. (n,)."""
    ranks = torch.arange(1, n + 1, device=device, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    return weights / weights.sum()


def zipf_capacities(
    demand: torch.Tensor,
    budget: int,
    n_tokens: int,
    exponent: float | torch.Tensor,
    min_capacity_ratio: float,
) -> torch.Tensor:
    """Zipf-shaped real-valued capacities of one batch, (d_sae,) float64.

    Latents are ranked by ``demand``; rank ``r`` gets the share
    ``min_capacity_ratio / d_sae + (1 - min_capacity_ratio) * zipf(r)`` of ``budget``
    (see :func:`capacities_from_shares`).
    """
    by_rank = zipf_shares(demand.numel(), exponent, demand.device)
    shares = by_rank[ranks_of(demand) - 1]
    return capacities_from_shares(shares, budget, n_tokens, min_capacity_ratio)


def demand_capacities(
    demand: torch.Tensor, budget: int, n_tokens: int, min_capacity_ratio: float
) -> torch.Tensor:
    """Real-valued capacities in proportion to ``demand``, (d_sae,) float64.

    Latent ``j`` gets the share
    ``min_capacity_ratio / d_sae + (1 - min_capacity_ratio) * demand_j / sum(demand)``
    (uniform while no latent has any demand): a latent is offered the tokens the data
    asked of it, where a Zipf law fitted to the head can offer its top ranks the
    whole batch.
    """
    total = demand.double().sum()
    uniform = torch.full_like(demand, 1 / demand.numel(), dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    shares = torch.where(total > 0, demand.double() / total.clamp(min=tiny), uniform)
    return capacities_from_shares(shares, budget, n_tokens, min_capacity_ratio)


def capacities_from_shares(
    shares: torch.Tensor, budget: int, n_tokens: int, min_capacity_ratio: float
) -> torch.Tensor:
    """Per-latent capacities from shares of the budget, with the floor and the cap.

    Every latent owns ``min_capacity_ratio`` of the uniform share; no latent takes
    more than the batch's ``n_tokens`` tokens: capacities over that cap are set to it
    and the excess goes to the others in proportion to their shares (water filling).

    Args:
        shares: (d_sae,) shares summing to 1.
        budget: the batch's budget, at most ``d_sae * n_tokens``.
        n_tokens: the batch's tokens.
        min_capacity_ratio: the floor, as a share of the uniform share.

    Returns:
        (d_sae,) float64 capacities in [0, n_tokens], summing to ``budget``.
    """
    n_latents = shares.numel()
    if budget > n_latents * n_tokens:
        raise ValueError(
            f"budget {budget} exceeds n_latents * n_tokens = {n_latents * n_tokens}"
        )
    shares = min_capacity_ratio / n_latents + (1 - min_capacity_ratio) * shares.double()
    # Water filling in closed form (no host read): with the c largest shares capped,
    # the others share budget - c * n_tokens in proportion; c is the smallest count at
    # which the largest uncapped capacity fits under the cap.
    ordered = torch.sort(shares, descending=True, stable=True)
    counts = torch.arange(n_latents, device=shares.device, dtype=torch.float64)
    # Shares of ranks c+1.., summed smallest first.
    rest = ordered.values.flip(0).cumsum(0).flip(0)
    fits = ordered.values * (budget - counts * n_tokens) <= n_tokens * rest
    # The first c that fits (c = n_latents - 1 always does).
    n_capped = fits.to(torch.uint8).argmax()
    capped = torch.empty_like(fits).scatter_(0, ordered.indices, counts < n_capped)
    free_shares = torch.where(capped, 0.0, shares)
    remaining = budget - n_tokens * n_capped.double()
    # Where the uncapped latents have no share left (no demand and no floor), the rest
    # of the budget is spread evenly over them; it fits.
    free_total = free_shares.sum()
    n_free = (n_latents - n_capped).clamp(min=1).double()
    even = torch.where(capped, 0.0, remaining / n_free)
    tiny = torch.finfo(torch.float64).tiny
    level = torch.where(free_total > 0, remaining / free_total.clamp(min=tiny), 0.0)
    # None capped: the capacities as they are.
    proportional = torch.where(n_capped > 0, free_shares * level, shares * budget)
    uncapped = torch.where(free_total > 0, proportional, even)
    return torch.where(capped, float(n_tokens), uncapped)


@dataclass
class FeatureChoiceTrainingSAEConfig(MutualChoiceTrainingSAEConfig):
    """Configuration for training a FeatureChoiceTrainingSAE, saved as JumpReLU.

    Args:
        capacity (str): ``"demand"`` (capacities in proportion to each latent's
            measured demand), ``"zipf"`` (a Zipf law over demand ranks, the paper's
            shape) or ``"uniform"``.
        zipf_exponent (float | None): the Zipf exponent (>= 0), or None to fit it to
            the demand curve as training goes.
        min_capacity_ratio (float): every latent's capacity is at least this share,
            in [0, 1], of the uniform capacity ``k * B / d_sae``, so that no latent
            is starved.
        aux_loss (str): see AdaptiveAllocationTrainingSAEConfig; defaults to
            ``"aux_zipf"``, which kept more latents alive with Feature Choice.
        usage_window (int): see AdaptiveAllocationTrainingSAEConfig; here also the
            time constant of the demand the capacities follow. Defaults to 100, so
            that a latent's capacity keeps up with what its encoder learns.
        k (float): mean number of latents per token: the capacities of a batch of B
            tokens sum to ``int(k * B)``.
    """

    aux_loss: AuxLoss = "aux_zipf"
    usage_window: int = 100
    capacity: Literal["uniform", "zipf", "demand"] = "demand"
    zipf_exponent: float | None = None
    min_capacity_ratio: float = 0.1

    @override
    @classmethod
    def architecture(cls) -> str:
        return "feature_choice"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("capacity", self.capacity, CAPACITIES)
        if self.zipf_exponent is not None:
            check_range("zipf_exponent", self.zipf_exponent, 0, math.inf)
        check_range("min_capacity_ratio", self.min_capacity_ratio, 0, 1)


class FeatureChoiceTrainingSAE(MutualChoiceTrainingSAE):
    """Feature Choice training SAE; saved as a JumpReLU SAE with per-latent thresholds.

    Its running statistics (``latent_demand``, the rounding carry ``capacity_carry``,
    the per-latent ``topk_threshold``) change only in :meth:`training_forward_pass`;
    every other forward reads them.
    """

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]
    latent_demand: torch.Tensor
    latent_demand_weight: torch.Tensor
    capacity_carry: torch.Tensor

    def __init__(
        self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False
    ):
        super().__init__(cfg, use_error_term)
        self.register_training_buffer("latent_demand", torch.zeros(cfg.d_sae))
        self.register_training_buffer("latent_demand_weight", torch.zeros(()))
        carry = torch.zeros(cfg.d_sae, dtype=torch.double)
        self.register_training_buffer("capacity_carry", carry)

    @override
    def threshold_shape(self) -> tuple[int, ...]:
        return (self.cfg.d_sae,)

    @override
    def threshold_statistic(self, smallest: torch.Tensor) -> torch.Tensor:
        return smallest

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.activate

    @override
    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        return over_tokens(lambda s: feature_choice(s, self.batch_capacities(s)))(
            scores
        )

    def capacity_exponent(self) -> float | torch.Tensor:
        """The Zipf exponent of the capacities now (0: uniform); fitted on the device."""
        if self.cfg.capacity == "uniform":
            return 0.0
        if self.cfg.zipf_exponent is not None:
            return self.cfg.zipf_exponent
        demand = debiased(self.latent_demand, self.latent_demand_weight)
        fitted = fitted_zipf(demand, self.cfg.zipf_fit_fraction)[0].clamp(min=0)
        return torch.where(self.latent_demand_weight > 0, fitted, 0.0)

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """Real-valued capacities of ``n_tokens`` tokens, summing to the budget.

        (d_sae,) float64.
        """
        demand = debiased(self.latent_demand, self.latent_demand_weight)
        budget = batch_budget(self.cfg.k, n_tokens)
        ratio = self.cfg.min_capacity_ratio
        if self.cfg.capacity == "demand":
            return demand_capacities(demand, budget, n_tokens, ratio)
        exponent = self.capacity_exponent()
        self.step_metrics["capacity_zipf_exponent"] = exponent
        return zipf_capacities(demand, budget, n_tokens, exponent, ratio)

    def tokens_in_batch(self, scores: torch.Tensor) -> int:
        """The number of tokens of the batch whose scores (batch_size, d_sae) these are."""
        return scores.shape[0]

    def demand_wins(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Each latent's pairs in the batch's Mutual Choice selection, (d_sae,)."""
        return mutual_choice_mask(scores, budget).sum(0)

    @torch.no_grad()
    def batch_capacities(self, scores: torch.Tensor) -> torch.Tensor:
        """Integer capacities for a batch of scores (batch_size, d_sae); (d_sae,).

        In a training step, demand and the rounding carry are updated first; any
        other forward only reads them, as BatchTopK changes its threshold only in
        training steps.
        """
        n_tokens = self.tokens_in_batch(scores)
        budget = batch_budget(self.cfg.k, n_tokens)
        if self.in_training_step and self.cfg.capacity != "uniform" and budget > 0:
            won = self.demand_wins(scores, budget)
            rate = self.statistics_rate
            demand, weight = self.latent_demand, self.latent_demand_weight
            ema_update_(demand, weight, won / budget, rate)
        counts, carry = round_capacities(
            self.capacities(n_tokens), self.capacity_carry, budget, n_tokens
        )
        if self.in_training_step:
            self.capacity_carry.copy_(carry)
        return counts

    @override
    def calibration_counts(self, n_tokens: int) -> torch.Tensor:
        """How many of ``n_tokens`` tokens each latent fires on: its capacity."""
        budget = batch_budget(self.cfg.k, n_tokens)
        carry = torch.zeros(
            self.cfg.d_sae, dtype=torch.double, device=self.W_dec.device
        )
        return round_capacities(self.capacities(n_tokens), carry, budget, n_tokens)[0]
