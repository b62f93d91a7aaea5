import math
from typing import Any

import pytest
import torch

from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_mutual_choice.upstream.adaptive_allocation import (
    AdaptiveAllocationTrainingSAEConfig,
    aux_zipf_loss,
    batch_budget,
    debiased,
    ema_update_,
    fitted_zipf,
    round_capacities,
    top_m_mask,
    underuse_weights,
)


def test_batch_budget_truncates_as_batchtopk_does():
    assert batch_budget(2.5, 3) == 7
    assert batch_budget(0.4, 2) == 0


def test_top_m_mask_breaks_ties_towards_the_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 0.0]])

    mask = top_m_mask(scores, 2, dim=1)

    expected = torch.tensor([[False, True, True, False], [True, True, False, False]])
    assert torch.equal(mask, expected)


def test_top_m_mask_takes_one_count_per_column():
    scores = torch.tensor([[3.0, 1.0, 0.5], [2.0, 4.0, 0.1], [1.0, 0.0, 0.3]])

    mask = top_m_mask(scores, torch.tensor([2, 0, 5]), dim=0)

    expected = torch.tensor(
        [[True, False, True], [True, False, True], [False, False, True]]
    )
    assert torch.equal(mask, expected)


def test_ema_update_is_debiased_from_the_first_update():
    raw, weight = torch.zeros(2), torch.zeros(())

    ema_update_(raw, weight, torch.tensor([4.0, -2.0]), rate=0.01)

    torch.testing.assert_close(debiased(raw, weight), torch.tensor([4.0, -2.0]))
    assert debiased(torch.zeros(1), torch.zeros(()), unset=math.inf).isinf().all()


def test_fitted_zipf_recovers_the_exponent_of_a_zipf_curve():
    ranks = torch.arange(1, 101, dtype=torch.float64)
    curve = 0.3 * ranks.pow(-1.2)

    exponent, log_scale = fitted_zipf(curve[torch.randperm(100)], fit_fraction=0.5)

    assert float(exponent) == pytest.approx(1.2, abs=1e-9)
    assert float(log_scale) == pytest.approx(math.log(0.3), abs=1e-9)
    assert float(fitted_zipf(torch.zeros(10), 0.5)[0]) == 0.0


def test_round_capacities_meets_the_budget_and_carries_the_remainders():
    capacities = torch.tensor([2.5, 1.25, 0.25], dtype=torch.float64)
    carry = torch.zeros(3, dtype=torch.float64)
    rounds = []

    for _ in range(4):
        counts, carry = round_capacities(capacities, carry, budget=4, n_tokens=3)
        rounds.append(counts.tolist())

    # Remainder ties go to the lower index; over four batches each latent gets
    # exactly four times its capacity.
    assert rounds == [[3, 1, 0], [2, 2, 0], [2, 1, 1], [3, 1, 0]]
    torch.testing.assert_close(carry, torch.zeros(3, dtype=torch.float64))


def test_underuse_weights_are_zero_on_a_zipf_curve_and_one_at_no_firing():
    usage = torch.arange(1, 11, dtype=torch.float64).pow(-1.0)
    weights, exponent = underuse_weights(usage, 0.5, 0.5)
    assert torch.equal(weights, torch.zeros(10, dtype=torch.float64))
    assert float(exponent) == pytest.approx(1.0)

    usage[7:] = 0.0
    weights, _ = underuse_weights(usage, 0.5, 0.5)
    assert weights[7:].tolist() == [1.0, 1.0, 1.0]
    assert weights[:7].tolist() == [0.0] * 7


@pytest.mark.parametrize("rescale_acts_by_decoder_norm", [True, False])
def test_aux_zipf_loss_with_the_dead_mask_is_topk_aux_loss(
    rescale_acts_by_decoder_norm: bool,
):
    cfg = TopKTrainingSAEConfig(
        d_in=8,
        d_sae=32,
        k=4,
        aux_loss_coefficient=0.7,
        rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm,
    )
    sae = TopKTrainingSAE(cfg)
    x = torch.randn(16, 8)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[torch.randperm(32)[:9]] = True

    ours = aux_zipf_loss(
        x,
        sae_out,
        hidden_pre,
        dead.float(),
        sae.W_dec,
        rescale_acts_by_decoder_norm,
        0.7,
    )
    theirs = sae.calculate_topk_aux_loss(x, sae_out, hidden_pre, dead)

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", 0.0, "k must be a finite number in \\(0, 32\\]"),
        ("aux_loss", "auxk", "aux_loss must be one of"),
        ("usage_window", 0, "usage_window must be an integer >= 1"),
        ("underuse_ratio", 1.5, "underuse_ratio must be a finite number"),
        ("zipf_fit_fraction", 0.0, "zipf_fit_fraction must be a finite number"),
    ],
)
def test_config_errors_name_the_field_and_its_range(
    field: str, value: Any, message: str
):
    with pytest.raises(ValueError, match=message):
        kwargs: dict[str, Any] = {"d_in": 8, "d_sae": 32, "k": 4, field: value}
        AdaptiveAllocationTrainingSAEConfig(**kwargs)
