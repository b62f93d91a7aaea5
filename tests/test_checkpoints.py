"""Checkpoints written by 0.4.4 (before the upstream layer) still load, export the same SAE, and train on.

tests/data/checkpoints_0_4_4 holds, per architecture, a training checkpoint of a tiny SAE after three
training steps and the inference SAE 0.4.4 exported from it, both written by 0.4.4 itself.
"""

from pathlib import Path

import pytest
import torch
from helpers import step_input
from safetensors.torch import load_file

from sae_mutual_choice.app.checkpoints import load_training_checkpoint

DATA = Path(__file__).parent / "data" / "checkpoints_0_4_4"
# 0.4.4's Feature Choice kept its per-latent running threshold under another name.
RENAMED = {"latent_threshold": "topk_threshold", "latent_threshold_weight": "topk_threshold_weight"}


@pytest.mark.parametrize("architecture", ["token_choice", "mutual_choice", "feature_choice"])
def test_a_0_4_4_checkpoint_loads_every_buffer_and_exports_the_same_sae(architecture, tmp_path):
    stored = load_file(DATA / architecture / "checkpoint" / "sae_weights.safetensors")

    sae = load_training_checkpoint(DATA / architecture / "checkpoint")
    sae.save_inference_model(tmp_path)

    state = sae.state_dict()
    for name, value in stored.items():
        assert torch.equal(state[RENAMED.get(name, name)], value), name
    exported = load_file(tmp_path / "sae_weights.safetensors")
    expected = load_file(DATA / architecture / "export" / "sae_weights.safetensors")
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name


@pytest.mark.parametrize("architecture", ["token_choice", "mutual_choice", "feature_choice"])
def test_a_0_4_4_checkpoint_trains_on(architecture):
    sae = load_training_checkpoint(DATA / architecture / "checkpoint")
    before = sae.latent_usage.clone()

    output = sae.training_forward_pass(step_input(torch.randn(8, sae.cfg.d_in)))

    assert torch.isfinite(output.loss)
    assert not torch.equal(sae.latent_usage, before)
