"""Feature Choice: every latent takes its best tokens, up to its capacity; capacities sum to the budget.

Capacities are uniform, or Zipf-shaped over latents ranked by *demand*: the share of the batch's
Mutual Choice selection each latent would win, a running average over training. Exported as a
JumpReLU SAE with one threshold per latent (see :mod:`sae_mutual_choice.fast.thresholds`); the running
estimate is a bias-corrected EMA of the smallest score each latent selected.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from sae_lens.saes.topk_sae import TopKTrainingSAE
from typing_extensions import override

from sae_mutual_choice.fast.base import AllocationSAEMixin, with_bias
from sae_mutual_choice.fast.collectives import min_over_ranks, sum_over_ranks
from sae_mutual_choice.fast.config import AuxLoss, check_choice, check_range
from sae_mutual_choice.fast.mutual_choice_sae import MutualChoiceTrainingSAEConfig
from sae_mutual_choice.fast.selection import (
    Entries,
    feature_choice_entries,
    feature_choice_entries_over_ranks,
    mutual_choice_entries,
    mutual_choice_entries_over_ranks,
)
from sae_mutual_choice.fast.thresholds import JumpReLUExportMixin
from sae_mutual_choice.upstream.allocation import batch_budget, feature_choice, over_tokens
from sae_mutual_choice.upstream.running import debiased, ema_update_
from sae_mutual_choice.upstream.zipf import demand_capacities, fitted_zipf, round_capacities, zipf_capacities

CAPACITIES = ("uniform", "zipf", "demand")


@dataclass
class FeatureChoiceTrainingSAEConfig(MutualChoiceTrainingSAEConfig):
    """Mutual Choice's fields (``k``: mean latents per token, the budget) plus the capacity shape.

    Args:
        capacity: ``"demand"`` (capacities in proportion to each latent's measured demand, the
            default: docs/method.md, "Defaults"), ``"zipf"`` (a Zipf law over demand ranks, the
            paper's shape) or ``"uniform"``.
        zipf_exponent: the Zipf exponent (>= 0), or None to fit it to the demand curve as
            training goes.
        min_capacity_ratio: every latent's capacity is at least this share (in [0, 1]) of the
            uniform capacity ``k * B / d_sae``, so no latent can be starved.
    """

    aux_loss: AuxLoss = field(default="aux_zipf", kw_only=True)  # docs/method.md, "Defaults"
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
            check_range("zipf_exponent", self.zipf_exponent, 0, float("inf"))
        check_range("min_capacity_ratio", self.min_capacity_ratio, 0, 1)


class FeatureChoiceTrainingSAE(JumpReLUExportMixin, AllocationSAEMixin, TopKTrainingSAE):
    """Feature Choice training SAE on SAELens's TopK encoder/decoder; saved as JumpReLU.

    A training step (:meth:`training_forward_pass`) updates the running statistics (demand, the
    capacity rounding carry); every other forward reads them only.
    """

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]
    latent_demand: torch.Tensor
    latent_demand_weight: torch.Tensor
    capacity_carry: torch.Tensor
    latent_threshold: torch.Tensor
    latent_threshold_weight: torch.Tensor

    def __init__(self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_allocation_state()
        d_sae = cfg.d_sae
        self.register_training_buffer("latent_demand", torch.zeros(d_sae))
        self.register_training_buffer("latent_demand_weight", torch.zeros(()))
        self.register_training_buffer("capacity_carry", torch.zeros(d_sae, dtype=torch.double))
        self.register_training_buffer("latent_threshold", torch.zeros(d_sae, dtype=torch.double))
        self.register_training_buffer("latent_threshold_weight", torch.zeros(d_sae, dtype=torch.double))
        self._init_export_state()

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # A bound method (not a closure), so that deepcopy rebinds it to the copy.
        return self.allocate_over_tokens

    def capacity_exponent(self) -> float | torch.Tensor:
        """The Zipf exponent the capacities use now (0 for uniform capacities); fitted on the device."""
        if self.cfg.capacity == "uniform":
            return 0.0
        if self.cfg.zipf_exponent is not None:
            return self.cfg.zipf_exponent
        demand = debiased(self.latent_demand, self.latent_demand_weight)
        fitted = fitted_zipf(demand, self.cfg.zipf_fit_fraction)[0].clamp(min=0)
        return torch.where(self.latent_demand_weight > 0, fitted, 0.0)  # no demand yet: uniform

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """Real-valued capacities of a batch of ``n_tokens`` tokens; sum to its budget. ``-> [F]`` float64."""
        demand = debiased(self.latent_demand, self.latent_demand_weight)
        budget = batch_budget(self.cfg.k, n_tokens)
        if self.cfg.capacity == "demand":
            return demand_capacities(demand, budget, n_tokens, self.cfg.min_capacity_ratio)
        exponent = self.capacity_exponent()
        self.step_metrics["capacity_zipf_exponent"] = exponent
        return zipf_capacities(demand, budget, n_tokens, exponent, self.cfg.min_capacity_ratio)

    def allocate_over_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        """Feature Choice on scores ``[..., F]``, leading dimensions flattened into one batch."""
        return over_tokens(self.allocate)(scores)

    def allocate(self, scores: torch.Tensor) -> torch.Tensor:
        """Feature Choice on one batch of scores ``[B, F] -> [B, F]``; in a data-parallel step, this rank's slice."""
        if self.step_ranks > 1:
            return self.joined_activations(scores)
        return feature_choice(scores, self.batch_capacities(scores))

    @override
    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        counts = self.batch_capacities(hidden_pre)
        if self.step_ranks > 1:
            return feature_choice_entries_over_ranks(hidden_pre, counts)
        return feature_choice_entries(hidden_pre, counts, batch_budget(self.cfg.k, hidden_pre.shape[0]))

    @override
    @torch.no_grad()
    def encoder_scores(self, x: torch.Tensor) -> torch.Tensor:
        # Latent-major storage ([F, B] transposed), so each latent's top-m reads one contiguous row.
        return with_bias(self.W_enc.t() @ x.t(), self.b_enc[:, None]).t()

    @torch.no_grad()
    def batch_capacities(self, scores: torch.Tensor) -> torch.Tensor:
        """Integer capacities for a batch of scores ``[B, F]``; in a training step, updates demand and carry first.

        Only :meth:`training_forward_pass` changes them (as SAELens's BatchTopK changes its threshold),
        so any other forward, in train mode or not, reads them: SAELens encodes more than once per
        forward with ``use_error_term``, and a stray ``encode`` must not move the export.

        In a data-parallel step ``scores`` is this rank's slice and the capacities are the joined batch's.
        """
        n_tokens = scores.shape[0] * self.step_ranks
        budget = batch_budget(self.cfg.k, n_tokens)
        if self.in_training_step and self.cfg.capacity != "uniform" and budget > 0:
            if self.step_ranks > 1:
                wins = mutual_choice_entries_over_ranks(scores, budget)
                won = sum_over_ranks(wins.counts(self.cfg.d_sae))
            else:
                won = mutual_choice_entries(scores, budget).counts(self.cfg.d_sae)
            ema_update_(self.latent_demand, self.latent_demand_weight, won / budget, self.statistics_rate)
        counts, carry = round_capacities(self.capacities(n_tokens), self.capacity_carry, budget, n_tokens)
        if self.in_training_step:
            self.capacity_carry.copy_(carry)
        return counts

    @override
    @torch.no_grad()
    def update_running_statistics(self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int) -> None:
        # Each latent's smallest fired score, into its bias-corrected running threshold.
        super().update_running_statistics(counts, smallest, n_tokens)
        smallest = smallest.to(self.latent_threshold.dtype)
        if self.step_ranks > 1:
            smallest = min_over_ranks(smallest)
        fired = torch.isfinite(smallest)
        ema_update_(
            self.latent_threshold,
            self.latent_threshold_weight,
            torch.where(fired, smallest, 0.0),
            self.cfg.topk_threshold_lr,
            where=fired,
        )

    def ema_thresholds(self) -> torch.Tensor:
        """Per-latent bias-corrected running thresholds ``[F]``; inf for a latent that never fired."""
        value = debiased(self.latent_threshold, self.latent_threshold_weight, unset=torch.inf)
        return value.to(self.b_enc.dtype)

    def calibration_counts(self, n_tokens: int) -> torch.Tensor:
        """How many of ``n_tokens`` tokens each latent fires on at inference: its capacity. ``-> [F]``."""
        budget = batch_budget(self.cfg.k, n_tokens)
        zero_carry = torch.zeros(self.cfg.d_sae, dtype=torch.double, device=self.W_dec.device)
        return round_capacities(self.capacities(n_tokens), zero_carry, budget, n_tokens)[0]

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            self.latent_threshold /= scaling_factor  # as the calibrated thresholds, see there
