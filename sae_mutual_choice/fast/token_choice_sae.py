"""Token Choice (TopK): every token takes its k best latents. Exported as SAELens ``topk``.

Not part of the SAELens contribution (SAELens's ``topk`` selects the same pairs): this is the
shared adaptive-allocation base with the per-token rule, so that Token Choice trains with the same
steps, running statistics and aux-loss choice as Mutual and Feature Choice, for comparisons.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAEConfig
from typing_extensions import override

from sae_mutual_choice.fast.base import FastStepMixin
from sae_mutual_choice.fast.config import FastFields
from sae_mutual_choice.fast.selection import Entries, token_choice_entries
from sae_mutual_choice.upstream.adaptive_allocation import (
    AdaptiveAllocationTrainingSAE,
    AdaptiveAllocationTrainingSAEConfig,
    fire,
    over_tokens,
    top_m_mask,
)


def token_choice(scores: torch.Tensor, k: int) -> torch.Tensor:
    """TopK: every token keeps its ``k`` best latents (ties to the lower latent index). ``[B, F] -> [B, F]``."""
    return fire(scores, top_m_mask(scores, k, dim=1))


@dataclass
class TokenChoiceTrainingSAEConfig(FastFields, AdaptiveAllocationTrainingSAEConfig):
    """SAELens's TopK config plus the shared adaptive-allocation fields and :class:`FastFields`."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "token_choice"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool):
            raise ValueError(f"k must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}")
        super().__post_init__()

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


class TokenChoiceTrainingSAE(FastStepMixin, AdaptiveAllocationTrainingSAE):
    """SAELens's TopK training SAE with deterministic ties and the aux-loss options here."""

    cfg: TokenChoiceTrainingSAEConfig  # type: ignore[assignment]

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # A bound method (not a closure), so that deepcopy rebinds it to the copy.
        return self.activate

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Token Choice on scores ``[..., F]``."""
        k = self.cfg.k
        return over_tokens(lambda flat: token_choice(flat, k))(scores)

    @override
    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        return token_choice_entries(hidden_pre, self.cfg.k)
