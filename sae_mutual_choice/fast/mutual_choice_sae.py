"""Mutual Choice: the budget's worth of largest (token, latent) scores of the whole batch fire.

Built on SAELens's BatchTopK (which selects the same pairs). Exported as a JumpReLU SAE with one
global threshold (see :mod:`sae_mutual_choice.fast.thresholds` for where it comes from); the running
estimate is a *bias-corrected* EMA of the smallest selected score of each batch.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from sae_mutual_choice.fast.base import AllocationSAEMixin
from sae_mutual_choice.fast.collectives import min_over_ranks
from sae_mutual_choice.fast.config import AllocationFields, check_integer, check_range, validate_common
from sae_mutual_choice.fast.selection import Entries, mutual_choice_entries, mutual_choice_entries_over_ranks
from sae_mutual_choice.fast.thresholds import JumpReLUExportMixin
from sae_mutual_choice.upstream.allocation import batch_budget, mutual_choice, over_tokens
from sae_mutual_choice.upstream.running import debiased, ema_update_


@dataclass
class MutualChoiceTrainingSAEConfig(AllocationFields, BatchTopKTrainingSAEConfig):
    """SAELens's BatchTopK config plus our shared fields (see :class:`AllocationFields`).

    ``k`` (float) is the mean number of latents per token; a batch of B tokens fires at most
    ``int(k * B)`` pairs. ``topk_threshold_lr`` is the rate of the running threshold estimate;
    0.1 rather than BatchTopK's 0.01, because the per-batch boundary is an order statistic of many
    pairs (little noise) and a slow average trails the threshold as it rises during training.
    ``threshold_calibration_tokens``: the size of the uniform sample of training inputs the SAE keeps
    to calibrate its exported thresholds (exact on the sample, for counts corrected for its mean
    input norm; 0: export the running estimate instead); the exported L0's sampling noise falls as
    its square root (docs/method.md, "Inference export").
    """

    topk_threshold_lr: float = 0.1
    threshold_calibration_tokens: int = 65536

    @override
    @classmethod
    def architecture(cls) -> str:
        return "mutual_choice"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common(self, integer_k=False)
        check_range("topk_threshold_lr", self.topk_threshold_lr, 0, 1, low_open=True)
        check_integer("threshold_calibration_tokens", self.threshold_calibration_tokens, 0)


class MutualChoice(nn.Module):
    """Mutual Choice activation with budget ``int(k * B)``: scores ``[..., F]`` -> activations ``[..., F]``."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return over_tokens(lambda flat: mutual_choice(flat, batch_budget(self.k, flat.shape[0])))(scores)


class MutualChoiceTrainingSAE(JumpReLUExportMixin, AllocationSAEMixin, BatchTopKTrainingSAE):
    """SAELens's BatchTopK training SAE with deterministic ties, our aux losses and a debiased threshold."""

    cfg: MutualChoiceTrainingSAEConfig  # type: ignore[assignment]
    topk_threshold_weight: torch.Tensor

    def __init__(self, cfg: MutualChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_allocation_state()
        self.register_training_buffer("topk_threshold_weight", torch.zeros((), dtype=torch.double))
        self._init_export_state()

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # A bound method (not a closure), so that deepcopy rebinds it to the copy.
        return self.activate

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Mutual Choice on scores ``[..., F]``; in a data-parallel step, this rank's slice of the joined selection."""
        if self.step_ranks > 1:
            return self.joined_activations(scores)
        return MutualChoice(self.cfg.k)(scores)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        # SAELens logs its raw EMA under this name; log the bias-corrected estimate instead.
        output.metrics["topk_threshold"] = debiased(self.topk_threshold, self.topk_threshold_weight)
        return output

    @override
    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        budget = batch_budget(self.cfg.k, hidden_pre.shape[0] * self.step_ranks)
        if self.step_ranks > 1:
            return mutual_choice_entries_over_ranks(hidden_pre, budget)
        return mutual_choice_entries(hidden_pre, budget)

    @override
    def update_topk_threshold(self, acts_topk: torch.Tensor) -> None:
        """Nothing: the threshold is updated in :meth:`update_running_statistics`, for both training steps."""

    @override
    @torch.no_grad()
    def update_running_statistics(self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int) -> None:
        # SAELens's raw EMA of the smallest fired score; the weight records how far it is from its start at 0.
        super().update_running_statistics(counts, smallest, n_tokens)
        smallest = smallest.min()
        if self.step_ranks > 1:
            smallest = min_over_ranks(smallest)
        fired = torch.isfinite(smallest)  # some pair fired in the (joined) batch
        smallest = torch.where(fired, smallest, 0).to(self.topk_threshold.dtype)
        lr = self.cfg.topk_threshold_lr
        ema_update_(self.topk_threshold, self.topk_threshold_weight, smallest, lr, where=fired)

    def ema_thresholds(self) -> torch.Tensor:
        """The bias-corrected running threshold for every latent (one global value); inf before any update."""
        value = debiased(self.topk_threshold, self.topk_threshold_weight, unset=torch.inf)
        return torch.ones_like(self.b_enc) * value.to(self.b_enc.dtype)

    def calibration_counts(self, n_tokens: int) -> int:
        """How many (token, latent) pairs of ``n_tokens`` tokens fire at inference: the budget."""
        return batch_budget(self.cfg.k, n_tokens)
