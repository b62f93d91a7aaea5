from pathlib import Path
from typing import Any

import pytest
import torch
from adaptive_allocation_helpers import build_sae as build
from adaptive_allocation_helpers import step_input

from sae_lens import SAE, JumpReLUSAE
from sae_mutual_choice.upstream.feature_choice_sae import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    capacities_from_shares,
    feature_choice,
)
from sae_mutual_choice.upstream.mutual_choice_sae import calibrate_thresholds


def build_sae(**kwargs: Any) -> FeatureChoiceTrainingSAE:
    return build(FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, **kwargs)


def test_feature_choice_gives_each_latent_its_best_tokens():
    scores = torch.tensor([[3.0, 1.0, 0.5], [2.0, 4.0, -1.0], [1.0, 1.0, -2.0]])

    acts = feature_choice(scores, torch.tensor([2, 1, 3]))

    expected = torch.tensor([[3.0, 0.0, 0.5], [2.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(acts, expected)


def test_feature_choice_refuses_capacities_of_another_shape():
    with pytest.raises(ValueError, match="capacities must have shape \\[3\\]"):
        feature_choice(torch.zeros(2, 3), torch.tensor([1, 1]))


def test_capacities_are_capped_at_the_batch_and_sum_to_the_budget():
    shares = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)

    capacities = capacities_from_shares(
        shares, budget=12, n_tokens=5, min_capacity_ratio=0
    )

    torch.testing.assert_close(
        capacities, torch.tensor([5.0, 14 / 3, 7 / 3], dtype=torch.float64)
    )


@pytest.mark.parametrize("capacity", ["demand", "zipf", "uniform"])
def test_training_step_fires_each_latent_within_its_capacity(capacity: str):
    sae = build_sae(capacity=capacity)
    x = torch.randn(32, 16)
    sae.training_forward_pass(step_input(x))
    carry = sae.capacity_carry.clone()
    capacities = sae.batch_capacities(torch.randn(32, 64))

    output = sae.training_forward_pass(step_input(x))

    assert int(capacities.sum()) == 128
    assert torch.equal(sae.capacity_carry, carry) is (capacity == "uniform")
    fired = (output.feature_acts > 0).sum(0)
    assert int(fired.sum()) <= 128
    assert bool((fired <= 32).all())


def test_demand_follows_the_mutual_choice_wins():
    sae = build_sae(usage_window=1)
    x = torch.randn(32, 16)

    sae.training_forward_pass(step_input(x))

    _, hidden_pre = sae.encode_with_hidden_pre(x)
    flat = hidden_pre.detach().flatten()
    wins = torch.zeros(64 * 32)
    wins[flat.topk(128).indices] = 1.0
    expected = wins.reshape(32, 64).sum(0) / 128
    torch.testing.assert_close(sae.latent_demand / sae.latent_demand_weight, expected)


def test_demand_follows_the_wins_over_100_steps_by_default():
    """The demand's time constant defaults to 100 steps for Feature Choice (1000 for
    the statistics of the other architectures)."""
    sae = build_sae()
    assert sae.cfg.usage_window == 100
    wins = []
    for _ in range(2):
        x = torch.randn(32, 16)
        flat = sae.encode_with_hidden_pre(x)[1].detach().flatten()
        won = torch.zeros(64 * 32)
        won[flat.topk(128).indices] = 1.0
        wins.append(won.reshape(32, 64).sum(0) / 128)
        sae.training_forward_pass(step_input(x))

    rate = 1 / 100
    expected = ((1 - rate) * rate * wins[0] + rate * wins[1]) / (1 - (1 - rate) ** 2)
    demand = sae.latent_demand / sae.latent_demand_weight
    torch.testing.assert_close(demand, expected)


def test_calibrated_export_fires_each_latent_on_its_capacity(tmp_path: Path):
    sae = build_sae()
    for _ in range(3):
        sae.training_forward_pass(step_input(torch.randn(32, 16)))
    activations = torch.randn(200, 16)

    calibrate_thresholds(sae, activations)
    sae.save_inference_model(tmp_path)
    exported = SAE.load_from_disk(tmp_path)

    assert isinstance(exported, JumpReLUSAE)
    fired = (exported.encode(activations) > 0).sum(0)
    capacities = sae.calibration_counts(200)
    assert int(capacities.sum()) == 800
    assert torch.equal(
        fired, capacities.minimum((sae.encode(activations) > 0).sum(0) * 0 + 200)
    )


def test_checkpoints_keep_the_running_statistics(tmp_path: Path):
    sae = build_sae()
    for _ in range(2):
        sae.training_forward_pass(step_input(torch.randn(32, 16)))

    sae.save_model(tmp_path)
    loaded = build_sae()
    loaded.load_weights_from_checkpoint(tmp_path)

    for name in ("latent_demand", "capacity_carry", "topk_threshold", "latent_usage"):
        torch.testing.assert_close(
            getattr(loaded, name), getattr(sae, name).to(getattr(loaded, name).dtype)
        )


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="capacity must be one of"):
        build_sae(capacity="zipfian")
    with pytest.raises(ValueError, match="min_capacity_ratio must be a finite number"):
        build_sae(min_capacity_ratio=1.5)
