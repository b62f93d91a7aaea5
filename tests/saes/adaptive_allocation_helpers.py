from collections.abc import Callable
from typing import Any, TypeVar

import torch

from sae_lens.saes.sae import TrainStepInput

T = TypeVar("T")

SMALL_SAE: dict[str, Any] = {
    "d_in": 16,
    "d_sae": 64,
    "k": 4.0,
    "threshold_calibration_tokens": 256,
}


def build_sae(
    sae_class: Callable[[Any], T], config_class: Callable[..., Any], **kwargs: Any
) -> T:
    return sae_class(config_class(**{**SMALL_SAE, **kwargs}))


def step_input(x: torch.Tensor, d_sae: int = 64) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"aux_loss": 1.0},
        dead_neuron_mask=torch.zeros(d_sae, dtype=torch.bool),
        n_training_steps=0,
        is_logging_step=False,
    )
