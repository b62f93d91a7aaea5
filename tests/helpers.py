"""Small shared helpers for the tests."""

from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput


def step_input(
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    coefficients: dict[str, float] | None = None,
    step: int = 0,
    logging: bool = False,
) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients=coefficients or {},
        dead_neuron_mask=dead,
        n_training_steps=step,
        is_logging_step=logging,
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


def tiny_train_config(run_dir: Path, architecture: str, **overrides: Any) -> Path:
    """Write an ``sae-mc train`` YAML for a seconds-long run on the tiny random model; return its path."""
    config = {
        "model_name": "tiny-random",
        "hook_name": "blocks.0.hook_resid_post",
        "dataset_path": "sotu",
        "streaming": False,
        "context_size": 32,
        "training_tokens": 6144,
        "train_batch_size_tokens": 256,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 8,
        "n_eval_batches": 1,
        "checkpoint_path": str(run_dir / "checkpoints"),
        "output_path": str(run_dir / "out"),
        "logger": {"log_to_wandb": False, "wandb_id": "run"},
        "sae": {"architecture": architecture, "d_in": 32, "d_sae": 64, "k": 4.0},
        "seed": 7,
        **overrides,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dense_acts(output: TrainStepOutput) -> torch.Tensor:
    """A training step's feature activations as a dense tensor (the sparse step returns sparse COO)."""
    acts = output.feature_acts.detach()
    return acts.to_dense() if acts.is_sparse else acts
