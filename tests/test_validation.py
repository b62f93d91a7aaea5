"""Bad input gets a ValueError naming the field (or the input) and the allowed range."""

import math

import pytest
import torch
from helpers import dense_acts, step_input

from sae_mutual_choice import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    TokenChoiceTrainingSAE,
    TokenChoiceTrainingSAEConfig,
)

CONFIGS = {
    "token_choice": (TokenChoiceTrainingSAE, TokenChoiceTrainingSAEConfig, 4),
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, 4.0),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, 4.0),
}


def _config(arch: str, **kwargs):
    _, config_class, k = CONFIGS[arch]
    return config_class(**{"d_in": 8, "d_sae": 32, "k": k, **kwargs})


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", 0, r"k must be .*\(0, 32\]"),
        ("k", -3, r"k must be"),
        ("k", 33, r"k must be .*\(0, 32\]"),
        ("aux_loss", "auxk", r"aux_loss must be one of \['aux_zipf', 'aux_k', 'none'\]"),
        ("aux_loss_coefficient", -1.0, r"aux_loss_coefficient must be .*\[0, inf\]"),
        ("aux_loss_coefficient", math.nan, r"aux_loss_coefficient must be a finite number"),
        ("aux_loss_warm_up_steps", -1, r"aux_loss_warm_up_steps must be an integer >= 0"),
        ("usage_window", 0, r"usage_window must be an integer >= 1"),
        ("zipf_fit_fraction", 0.0, r"zipf_fit_fraction must be .*\(0, 1\]"),
        ("zipf_fit_fraction", 1.5, r"zipf_fit_fraction must be .*\(0, 1\]"),
        ("underuse_ratio", 0.0, r"underuse_ratio must be .*\(0, 1\]"),
        ("d_sae", 0, r"d_sae must be"),
    ],
)
def test_bad_common_fields(arch, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(arch, **{field: value})


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize("k", [math.nan, math.inf, -math.inf])
def test_non_finite_k(arch, k):
    with pytest.raises(ValueError, match="k must be a finite number"):
        _config(arch, k=k)


def test_token_choice_needs_an_integer_k():
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, d_sae=32\], got 2.5"):
        _config("token_choice", k=2.5)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_sparse_activations_are_refused_alike(arch):
    with pytest.raises(ValueError, match=f"use_sparse_activations must be False for {arch}"):
        _config(arch, use_sparse_activations=True)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("topk_threshold_lr", 0.0, r"topk_threshold_lr must be .*\(0, 1\]"),
        ("threshold_calibration_tokens", -1, r"threshold_calibration_tokens must be an integer >= 0"),
    ],
)
def test_bad_threshold_fields(arch, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(arch, **{field: value})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("capacity", "zipfian", r"capacity must be one of \['uniform', 'zipf', 'demand'\]"),
        ("zipf_exponent", -0.5, r"zipf_exponent must be .*\[0, inf\]"),
        ("zipf_exponent", math.nan, r"zipf_exponent must be a finite number"),
        ("min_capacity_ratio", 1.5, r"min_capacity_ratio must be .*\[0, 1\]"),
        ("min_capacity_ratio", -0.1, r"min_capacity_ratio must be .*\[0, 1\]"),
    ],
)
def test_bad_feature_choice_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        _config("feature_choice", **{field: value})


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("aux_loss", ["aux_zipf", "aux_k"])
@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
def test_aux_loss_refuses_run_time_normalisation(arch, aux_loss, normalize):
    with pytest.raises(ValueError, match=f"aux_loss='{aux_loss}' does not support normalize_activations"):
        _config(arch, normalize_activations=normalize, aux_loss=aux_loss)
    _config(arch, normalize_activations=normalize, aux_loss="none")  # allowed without an aux loss


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(4, 7), r"last dimension d_in=8, got shape \[4, 7\]"),
        (torch.randn(0, 8), r"at least one token, got shape \[0, 8\]"),
        (torch.tensor([[math.nan] + [0.0] * 7]), "NaN or infinite"),
        (torch.tensor([[math.inf] + [0.0] * 7]), "NaN or infinite"),
    ],
)
def test_bad_activations(arch, x, message):
    sae_class = CONFIGS[arch][0]
    sae = sae_class(_config(arch))
    with pytest.raises(ValueError, match=message):
        sae.training_forward_pass(step_input(x))
    with pytest.raises(ValueError, match=message):
        sae.encode(x)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_batch_of_one_token(arch):
    """A one-token batch is legal: its budget is int(k), and Feature Choice's capacities are 0 or 1."""
    sae = CONFIGS[arch][0](_config(arch, k=4.5))
    out = sae.training_forward_pass(step_input(torch.randn(1, 8)))
    assert int((dense_acts(out) > 0).sum()) <= 4


def test_default_capacity_follows_the_evidence():
    """docs/method.md "Defaults": Feature Choice's capacities in proportion to demand."""
    assert _config("feature_choice").capacity == "demand"


def test_default_aux_loss_follows_the_evidence():
    """docs/method.md "Defaults": AuxK for Token and Mutual Choice, aux_zipf for Feature Choice."""
    assert {arch: _config(arch).aux_loss for arch in CONFIGS} == {
        "token_choice": "aux_k",
        "mutual_choice": "aux_k",
        "feature_choice": "aux_zipf",
    }
