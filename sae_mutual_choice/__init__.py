"""Feature Choice and Mutual Choice sparse autoencoders for SAELens (Ayonrinde 2024, arXiv 2411.02124).

Importing the package registers the training architectures ``token_choice``, ``mutual_choice`` and
``feature_choice`` with SAELens (a second import is harmless). Trained SAEs are exported as
SAELens ``topk`` (Token Choice) or ``jumprelu`` (Mutual and Feature Choice) SAEs, which load
without this package.
"""

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class

from sae_mutual_choice.fast.feature_choice_sae import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
from sae_mutual_choice.fast.mutual_choice_sae import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_mutual_choice.fast.token_choice_sae import (
    TokenChoiceTrainingSAE,
    TokenChoiceTrainingSAEConfig,
    token_choice,
)
from sae_mutual_choice.upstream.adaptive_allocation import aux_zipf_loss, batch_budget, underuse_weights
from sae_mutual_choice.upstream.feature_choice_sae import feature_choice
from sae_mutual_choice.upstream.mutual_choice_sae import calibrate_thresholds, mutual_choice

ARCHITECTURES = {
    "token_choice": (TokenChoiceTrainingSAE, TokenChoiceTrainingSAEConfig),
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig),
}


def register() -> None:
    """Register the training architectures with SAELens; architectures already registered are left alone."""
    for name, (sae_class, config_class) in ARCHITECTURES.items():
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, sae_class, config_class)


register()

__all__ = [
    "ARCHITECTURES",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
    "MutualChoiceTrainingSAE",
    "MutualChoiceTrainingSAEConfig",
    "TokenChoiceTrainingSAE",
    "TokenChoiceTrainingSAEConfig",
    "aux_zipf_loss",
    "batch_budget",
    "calibrate_thresholds",
    "feature_choice",
    "mutual_choice",
    "register",
    "token_choice",
    "underuse_weights",
]
