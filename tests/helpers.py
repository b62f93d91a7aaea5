"""Small shared helpers for the tests."""

import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput


def step_input(
    x: torch.Tensor, dead: torch.Tensor | None = None, coefficients: dict[str, float] | None = None
) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients=coefficients or {},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def copy_parameters(source: TrainingSAE, target: TrainingSAE) -> None:
    """Give ``target`` the parameters of ``source`` (buffers are left alone)."""
    with torch.no_grad():
        for name, param in source.named_parameters():
            getattr(target, name).copy_(param)


def forward_and_grads(
    sae: TrainingSAE, inp: TrainStepInput
) -> tuple[TrainStepOutput, dict[str, torch.Tensor]]:
    sae.zero_grad()
    out = sae.training_forward_pass(inp)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    return out, grads
