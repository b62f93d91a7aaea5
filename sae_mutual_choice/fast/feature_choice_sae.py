"""Feature Choice with the fast and distributed step: :mod:`sae_mutual_choice.upstream.feature_choice_sae`
plus :class:`~sae_mutual_choice.fast.base.FastStepMixin` and its config fields. Registered as
``feature_choice``; loads 0.4.x checkpoints, whose per-latent running threshold was named
``latent_threshold``.
"""

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_mutual_choice.fast.base import FastStepMixin, with_bias
from sae_mutual_choice.fast.collectives import sum_over_ranks
from sae_mutual_choice.fast.config import FastFields
from sae_mutual_choice.fast.selection import (
    Entries,
    feature_choice_entries,
    feature_choice_entries_over_ranks,
    mutual_choice_entries,
    mutual_choice_entries_over_ranks,
)
from sae_mutual_choice.upstream import feature_choice_sae as upstream
from sae_mutual_choice.upstream.adaptive_allocation import batch_budget

# 0.4.x checkpoint buffer -> its name now.
RENAMED_BUFFERS = {"latent_threshold": "topk_threshold", "latent_threshold_weight": "topk_threshold_weight"}


@dataclass
class FeatureChoiceTrainingSAEConfig(FastFields, upstream.FeatureChoiceTrainingSAEConfig):
    """The upstream Feature Choice config plus :class:`~sae_mutual_choice.fast.config.FastFields`."""


class FeatureChoiceTrainingSAE(FastStepMixin, upstream.FeatureChoiceTrainingSAE):
    """The upstream Feature Choice training SAE with the sparse and data-parallel steps."""

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]

    @override
    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        counts = self.batch_capacities(hidden_pre)
        if self.step_ranks > 1:
            return feature_choice_entries_over_ranks(hidden_pre, counts)
        return feature_choice_entries(hidden_pre, counts, batch_budget(self.cfg.k, hidden_pre.shape[0]))

    @override
    def demand_wins(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        if self.step_ranks > 1:
            return sum_over_ranks(mutual_choice_entries_over_ranks(scores, budget).counts(self.cfg.d_sae))
        return mutual_choice_entries(scores, budget).counts(self.cfg.d_sae)

    @override
    @torch.no_grad()
    def encoder_scores(self, x: torch.Tensor) -> torch.Tensor:
        # Latent-major storage ([F, B] transposed), so each latent's top-m reads one contiguous row.
        return with_bias(self.W_enc.t() @ x.t(), self.b_enc[:, None]).t()

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        for old, new in RENAMED_BUFFERS.items():
            if old in state_dict:
                state_dict[new] = state_dict.pop(old)
