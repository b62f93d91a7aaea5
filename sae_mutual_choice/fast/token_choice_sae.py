"""Token Choice (TopK): every token takes its k best latents. Exported as SAELens ``topk``."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from torch import nn
from typing_extensions import override

from sae_mutual_choice.fast.base import AllocationSAEMixin
from sae_mutual_choice.fast.config import AllocationFields, validate_common
from sae_mutual_choice.fast.selection import Entries, token_choice_entries
from sae_mutual_choice.upstream.allocation import over_tokens, token_choice


@dataclass
class TokenChoiceTrainingSAEConfig(AllocationFields, TopKTrainingSAEConfig):
    """SAELens's TopK config plus our shared fields (see :class:`AllocationFields`)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "token_choice"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_common(self, integer_k=True)

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


class TokenChoice(nn.Module):
    """Token Choice activation: scores ``[..., F]`` -> activations ``[..., F]``."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return over_tokens(partial(token_choice, k=self.k))(scores)


class TokenChoiceTrainingSAE(AllocationSAEMixin, TopKTrainingSAE):
    """SAELens's TopK training SAE with deterministic ties and the aux-loss options here."""

    cfg: TokenChoiceTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: TokenChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_allocation_state()

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return TokenChoice(self.cfg.k)

    @override
    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        return token_choice_entries(hidden_pre, self.cfg.k)
