import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_mutual_choice.app.evaluate import fit_zipf
from sae_mutual_choice.upstream.adaptive_allocation import ranks_of, round_capacities
from sae_mutual_choice.upstream.feature_choice_sae import (
    capacities_from_shares,
    demand_capacities,
    zipf_capacities,
    zipf_shares,
)


def test_ranks_largest_first_ties_to_lower_index():
    assert torch.equal(ranks_of(torch.tensor([0.1, 0.5, 0.1, 0.9])), torch.tensor([3, 2, 4, 1]))


def test_zipf_shares_hand_example():
    # exponent 1 over 3 ranks: 1, 1/2, 1/3 normalised by 11/6.
    expected = torch.tensor([6 / 11, 3 / 11, 2 / 11], dtype=torch.float64)
    torch.testing.assert_close(zipf_shares(3, 1.0), expected)


@pytest.mark.parametrize("exponent", [0.0, 0.7, 1.0, 1.6])
def test_fit_zipf_recovers_the_exponent_and_scale(exponent):
    curve = 0.3 * torch.arange(1, 501, dtype=torch.float64).pow(-exponent)
    shuffled = curve[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    fitted, log_scale = fit_zipf(shuffled, fit_fraction=0.5)
    assert fitted == pytest.approx(exponent, abs=1e-9)
    assert log_scale == pytest.approx(math.log(0.3), abs=1e-9)


def test_fit_zipf_ignores_the_tail_and_zeros():
    curve = torch.arange(1, 101, dtype=torch.float64).pow(-1.0)
    curve[60:] = 0.0  # a dead tail
    assert fit_zipf(curve, fit_fraction=0.5)[0] == pytest.approx(1.0, abs=1e-9)
    assert fit_zipf(torch.zeros(10), fit_fraction=0.5) == (0.0, -math.inf)


def test_capacities_follow_demand_ranks():
    demand = torch.tensor([0.1, 0.4, 0.0, 0.2])
    capacities = zipf_capacities(demand, budget=40, n_tokens=100, exponent=1.0, min_capacity_ratio=0.0)
    shares = zipf_shares(4, 1.0)
    torch.testing.assert_close(capacities, 40 * shares[torch.tensor([2, 0, 3, 1])])


def test_demand_capacities_are_proportional_to_demand_with_the_floor_and_the_cap():
    demand = torch.tensor([0.1, 0.4, 0.0, 0.2])
    capacities = demand_capacities(demand, budget=40, n_tokens=100, min_capacity_ratio=0.0)
    torch.testing.assert_close(capacities, 40 * demand.double() / demand.double().sum())
    floored = demand_capacities(demand, budget=40, n_tokens=100, min_capacity_ratio=0.2)
    assert float(floored[2]) == pytest.approx(0.2 * 40 / 4)  # no demand: the floor alone
    assert float(floored.sum()) == pytest.approx(40.0)
    capped = demand_capacities(
        torch.tensor([10.0, 1.0, 1.0, 1.0]), budget=40, n_tokens=12, min_capacity_ratio=0.0
    )
    assert float(capped.max()) == pytest.approx(12.0) and float(capped.sum()) == pytest.approx(40.0)
    uniform = demand_capacities(torch.zeros(4), budget=40, n_tokens=100, min_capacity_ratio=0.0)
    torch.testing.assert_close(uniform, torch.full((4,), 10.0, dtype=torch.float64))


def test_capacities_cap_at_the_batch_and_redistribute():
    # Zipf with a steep exponent asks rank 1 for most of the budget; it can take only n_tokens.
    capacities = zipf_capacities(
        torch.arange(8.0), budget=40, n_tokens=10, exponent=2.0, min_capacity_ratio=0.0
    )
    assert float(capacities.max()) == pytest.approx(10.0)
    assert float(capacities.sum()) == pytest.approx(40.0)
    assert (capacities <= 10 + 1e-9).all()
    # Uncapped latents keep their Zipf proportions.
    free = capacities < 10 - 1e-9
    ratios = capacities[free] / zipf_shares(8, 2.0)[ranks_of(torch.arange(8.0)) - 1][free]
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])))


def test_min_capacity_ratio_is_a_floor():
    capacities = zipf_capacities(
        torch.rand(1000), budget=2000, n_tokens=64, exponent=1.5, min_capacity_ratio=0.2
    )
    assert float(capacities.min()) >= 0.2 * 2000 / 1000 - 1e-9


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 50),
    st.integers(1, 40),
    st.floats(0.0, 2.5),
    st.floats(0.0, 1.0),
    st.floats(0.01, 1.0),
    st.integers(0, 2**16),
)
def test_rounded_capacities_sum_to_the_budget_for_every_batch(
    n_latents, n_tokens, exponent, min_ratio, k_share, seed
):
    budget = int(k_share * n_latents * n_tokens)
    demand = torch.rand(n_latents, generator=torch.Generator().manual_seed(seed))
    carry = torch.zeros(n_latents, dtype=torch.float64)
    capacities = zipf_capacities(demand, budget, n_tokens, exponent, min_ratio)
    assert float(capacities.sum()) == pytest.approx(budget, abs=1e-6)
    for _ in range(3):
        counts, carry = round_capacities(capacities, carry, budget, n_tokens)
        assert int(counts.sum()) == budget
        assert (counts >= 0).all() and (counts <= n_tokens).all()
        assert float(carry.abs().max()) < 1 + 1e-9


def test_fractional_capacities_rotate_so_every_latent_is_served():
    # Budget 3 for 12 latents: each latent owns 1/4 of a token per batch.
    capacities = zipf_capacities(torch.zeros(12), budget=3, n_tokens=8, exponent=0.0, min_capacity_ratio=0.0)
    carry = torch.zeros(12, dtype=torch.float64)
    served = torch.zeros(12, dtype=torch.long)
    for _ in range(4):
        counts, carry = round_capacities(capacities, carry, 3, 8)
        assert int(counts.sum()) == 3
        served += counts
    assert torch.equal(served, torch.ones(12, dtype=torch.long))


def test_demand_on_fewer_latents_than_the_budget_needs_still_fills_the_budget():
    # Two latents with demand can take 4 tokens each; the other 8 of the budget go to the rest evenly.
    capacities = demand_capacities(torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]), 16, 4, 0.0)
    expected = torch.tensor([4.0, 4.0] + [8 / 6] * 6, dtype=torch.float64)
    torch.testing.assert_close(capacities, expected)
    counts, carry = round_capacities(capacities, torch.zeros(8, dtype=torch.float64), 16, 4)
    assert int(counts.sum()) == 16 and int(counts.max()) == 4
    assert float(carry.sum()) == pytest.approx(0.0, abs=1e-9)


def test_a_capped_latents_carry_goes_to_the_others_room():
    # Targets 4.9, 4.9, 0.2 with 4 tokens: the shortfall of 2 exceeds the one latent under the cap.
    capacities = torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64)
    carry = torch.tensor([0.9, 0.9, -1.8], dtype=torch.float64)
    counts, new_carry = round_capacities(capacities, carry, 10, 4)
    assert counts.tolist() == [4, 4, 2]
    torch.testing.assert_close(new_carry, carry)


def _capacity_case(generator: torch.Generator) -> tuple[torch.Tensor, int, int, float]:
    """Random demand (often concentrated on a few latents), batch size, budget up to the whole batch, floor."""
    n_latents = int(torch.randint(1, 60, (), generator=generator))
    n_tokens = int(torch.randint(1, 40, (), generator=generator))
    budget = int(torch.randint(0, n_latents * n_tokens + 1, (), generator=generator))
    if bool(torch.rand((), generator=generator) < 0.5):  # within a few pairs of the whole batch
        budget = max(0, n_latents * n_tokens - int(torch.randint(0, 4, (), generator=generator)))
    demand = torch.rand(n_latents, generator=generator) ** 4
    demand[torch.rand(n_latents, generator=generator) < 0.7] = 0.0
    min_ratio = (
        float(torch.rand((), generator=generator)) if bool(torch.rand((), generator=generator) < 0.5) else 0.0
    )
    return demand, n_tokens, budget, min_ratio


def test_capacity_invariants_over_random_inputs():
    # The docstrings' promises: real capacities in [0, n_tokens] summing to the budget; over a run of
    # batches, integer capacities summing to the budget, none above n_tokens, the carry summing to 0.
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        demand, n_tokens, budget, min_ratio = _capacity_case(generator)
        exponent = 3 * float(torch.rand((), generator=generator))
        for capacities in (
            demand_capacities(demand, budget, n_tokens, min_ratio),
            zipf_capacities(demand, budget, n_tokens, exponent, min_ratio),
        ):
            assert float(capacities.sum()) == pytest.approx(budget, abs=1e-6 * max(budget, 1))
            assert float(capacities.min()) >= 0 and float(capacities.max()) <= n_tokens + 1e-9
            carry = torch.zeros_like(capacities)
            for _ in range(4):
                counts, carry = round_capacities(capacities, carry, budget, n_tokens)
                assert int(counts.sum()) == budget
                assert int(counts.min()) >= 0 and int(counts.max()) <= n_tokens
                assert float(carry.sum()) == pytest.approx(0.0, abs=1e-6)


def test_budget_larger_than_the_batch_is_refused():
    with pytest.raises(ValueError, match="budget"):
        zipf_capacities(torch.zeros(3), budget=10, n_tokens=3, exponent=1.0, min_capacity_ratio=0.0)


def _water_filling(shares: torch.Tensor, budget: int, n_tokens: int) -> torch.Tensor:
    """The reference: cap whatever exceeds the batch, share the rest in proportion, until nothing exceeds."""
    capped = torch.zeros_like(shares, dtype=torch.bool)
    capacities = shares * budget
    while bool(((capacities > n_tokens) & ~capped).any()):
        capped |= capacities > n_tokens
        free = torch.where(capped, 0.0, shares)
        capacities = torch.where(
            capped, float(n_tokens), free * ((budget - n_tokens * int(capped.sum())) / free.sum())
        )
    return capacities


def test_closed_form_water_filling_equals_the_loop():
    """capacities_from_shares caps without a host read; it caps the same latents as the loop, to the ulp."""
    generator = torch.Generator().manual_seed(0)
    capped_cases = 0
    for _ in range(300):
        n_latents = int(torch.randint(1, 200, (), generator=generator))
        n_tokens = int(torch.randint(1, 100, (), generator=generator))
        budget = int(torch.randint(0, n_latents * n_tokens + 1, (), generator=generator))
        shares = torch.rand(n_latents, generator=generator, dtype=torch.float64) ** 6
        shares /= shares.sum()
        ours = capacities_from_shares(shares, budget, n_tokens, min_capacity_ratio=0.0)
        reference = _water_filling(shares, budget, n_tokens)
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-9)
        assert torch.equal(ours == n_tokens, reference == n_tokens)
        capped_cases += int(bool((reference == n_tokens).any()))
    assert capped_cases > 50  # the cap was exercised
