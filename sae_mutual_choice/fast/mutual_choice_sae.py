"""Mutual Choice with the fast and distributed step: :mod:`sae_mutual_choice.upstream.mutual_choice_sae`
plus :class:`~sae_mutual_choice.fast.base.FastStepMixin` and its config fields. Registered as
``mutual_choice``; saves and loads as the upstream class does.
"""

from dataclasses import dataclass

import torch
from typing_extensions import override

from sae_mutual_choice.fast.base import FastStepMixin
from sae_mutual_choice.fast.config import FastFields
from sae_mutual_choice.fast.selection import Entries, mutual_choice_entries, mutual_choice_entries_over_ranks
from sae_mutual_choice.upstream import mutual_choice_sae as upstream
from sae_mutual_choice.upstream.adaptive_allocation import batch_budget


@dataclass
class MutualChoiceTrainingSAEConfig(FastFields, upstream.MutualChoiceTrainingSAEConfig):
    """The upstream Mutual Choice config plus :class:`~sae_mutual_choice.fast.config.FastFields`."""


class MutualChoiceTrainingSAE(FastStepMixin, upstream.MutualChoiceTrainingSAE):
    """The upstream Mutual Choice training SAE with the sparse and data-parallel steps."""

    cfg: MutualChoiceTrainingSAEConfig  # type: ignore[assignment]

    @override
    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        budget = batch_budget(self.cfg.k, hidden_pre.shape[0] * self.step_ranks)
        if self.step_ranks > 1:
            return mutual_choice_entries_over_ranks(hidden_pre, budget)
        return mutual_choice_entries(hidden_pre, budget)
