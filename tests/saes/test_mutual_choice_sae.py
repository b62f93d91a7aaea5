from pathlib import Path
from typing import Any

import pytest
import torch
from adaptive_allocation_helpers import build_sae as build
from adaptive_allocation_helpers import step_input

from sae_lens import SAE, JumpReLUSAE
from sae_lens.saes.batchtopk_sae import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
)
from sae_mutual_choice.upstream.mutual_choice_sae import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    calibrate_thresholds,
    mutual_choice,
)


def build_sae(**kwargs: Any) -> MutualChoiceTrainingSAE:
    return build(MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, **kwargs)


def test_mutual_choice_fires_the_largest_positive_scores_of_the_batch():
    scores = torch.tensor([[3.0, 1.0, -1.0], [2.0, 2.0, 0.5]])

    acts = mutual_choice(scores, budget=3)

    expected = torch.tensor([[3.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    assert torch.equal(acts, expected)
    assert torch.equal(mutual_choice(scores - 5.0, budget=3), torch.zeros(2, 3))


def test_mutual_choice_breaks_ties_towards_the_lower_flat_index():
    scores = torch.tensor([[1.0, 2.0], [2.0, 2.0]])

    acts = mutual_choice(scores, budget=2)

    assert torch.equal(acts, torch.tensor([[0.0, 2.0], [2.0, 0.0]]))


def test_mutual_choice_selects_what_batchtopk_selects_on_the_same_weights():
    sae = build_sae(k=3.5)
    batchtopk = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=3.5)
    )
    batchtopk.load_state_dict(sae.state_dict(), strict=False)
    x = torch.randn(3, 10, 16)

    ours = sae.encode(x)
    theirs = batchtopk.encode(x)

    assert torch.equal(ours, theirs)
    assert int((ours > 0).sum()) == 105


def test_training_step_keeps_a_debiased_running_threshold():
    sae = build_sae()
    x = torch.randn(32, 16)

    output = sae.training_forward_pass(step_input(x))

    smallest = output.feature_acts[output.feature_acts > 0].min()
    threshold = sae.topk_threshold / sae.topk_threshold_weight
    torch.testing.assert_close(threshold.float(), smallest)
    logged = torch.as_tensor(output.metrics["topk_threshold"])
    torch.testing.assert_close(logged.float(), smallest)
    assert int((output.feature_acts > 0).sum()) <= 128


def test_state_changes_only_in_training_forward_pass():
    sae = build_sae(aux_loss="aux_zipf")
    sae.training_forward_pass(step_input(torch.randn(32, 16)))
    state = {name: value.clone() for name, value in sae.state_dict().items()}

    sae(torch.randn(32, 16))
    sae.encode(torch.randn(32, 16))

    for name, value in sae.state_dict().items():
        assert torch.equal(value.nan_to_num(), state[name].nan_to_num()), name


def test_calibrated_export_fires_the_budget_on_the_calibration_tokens(
    tmp_path: Path,
):
    sae = build_sae()
    for _ in range(3):
        sae.training_forward_pass(step_input(torch.randn(32, 16)))
    activations = torch.randn(200, 16)

    calibrate_thresholds(sae, activations)
    sae.save_inference_model(tmp_path)
    exported = SAE.load_from_disk(tmp_path)

    assert isinstance(exported, JumpReLUSAE)
    assert exported.cfg.metadata.training_architecture == "mutual_choice"
    assert int((exported.encode(activations) > 0).sum()) == 800


def test_export_from_the_sample_of_training_inputs_fires_about_k_per_token(
    tmp_path: Path,
):
    sae = build_sae()
    inputs = torch.randn(4, 64, 16)
    for batch in inputs:
        sae.training_forward_pass(step_input(batch))

    sae.save_inference_model(tmp_path)
    exported = SAE.load_from_disk(tmp_path)

    l0 = (exported.encode(inputs.reshape(-1, 16)) > 0).sum(-1).float().mean()
    assert 3.0 < float(l0) < 5.0
    assert sae.calibration_inputs.shape == (256, 16)


@pytest.mark.parametrize(
    ("d_in", "d_sae", "expected"),
    [(2304, 16384, 16366), (768, 24576, 24496), (576, 2304, 28976), (64, 256, 65536)],
)
def test_the_default_sample_takes_half_the_parameter_bytes_or_64_mib(
    d_in: int, d_sae: int, expected: int
):
    cfg = MutualChoiceTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=32.0, device="meta")
    sae = MutualChoiceTrainingSAE(cfg)

    n = sae.calibration_sample_size()

    parameter_bytes = sum(p.numel() * 4 for p in sae.parameters())
    assert n == expected
    assert n * (d_in * 4 + 12) <= max(parameter_bytes / 2, 64 * 2**20)


def test_the_default_sample_is_allocated_by_the_first_training_step():
    sae = build_sae(threshold_calibration_tokens=None)
    assert sae.calibration_inputs.numel() == 0

    sae.training_forward_pass(step_input(torch.randn(32, 16)))

    assert sae.calibration_inputs.shape == (65536, 16)


def test_an_sae_that_never_trained_has_no_threshold_to_export(tmp_path: Path):
    sae = build_sae()

    with pytest.raises(ValueError, match="no threshold to export"):
        sae.save_inference_model(tmp_path)
    assert sae.calibration_inputs.numel() == 0


def test_calibrate_thresholds_refuses_activations_of_another_width():
    sae = build_sae()

    with pytest.raises(ValueError, match="last dimension d_in=16"):
        calibrate_thresholds(sae, torch.randn(10, 8))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("topk_threshold_lr", 0.0, "topk_threshold_lr must be a finite number"),
        ("threshold_calibration_tokens", -1, "threshold_calibration_tokens must"),
        ("k", 65.0, "k must be a finite number in \\(0, 64\\]"),
    ],
)
def test_config_errors_name_the_field(field: str, value: Any, message: str):
    with pytest.raises(ValueError, match=message):
        build_sae(**{field: value})
