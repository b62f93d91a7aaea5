import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens.saes.batchtopk_sae import BatchTopK

from sae_mutual_choice.fast.token_choice_sae import token_choice
from sae_mutual_choice.upstream.adaptive_allocation import batch_budget, over_tokens, top_m_mask
from sae_mutual_choice.upstream.feature_choice_sae import feature_choice
from sae_mutual_choice.upstream.mutual_choice_sae import mutual_choice

SCORES = torch.tensor(
    [
        [3.0, -1.0, 2.0, 0.5],
        [0.1, 4.0, -2.0, 1.0],
        [2.5, 0.2, 0.0, -0.5],
    ]
)


def test_token_choice_hand_example():
    expected = torch.tensor(
        [
            [3.0, 0.0, 2.0, 0.0],
            [0.0, 4.0, 0.0, 1.0],
            [2.5, 0.2, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(token_choice(SCORES, 2), expected, rtol=0, atol=0)


def test_mutual_choice_hand_example():
    # Budget 5: the five largest scores of the batch are 4, 3, 2.5, 2, 1.
    expected = torch.tensor(
        [
            [3.0, 0.0, 2.0, 0.0],
            [0.0, 4.0, 0.0, 1.0],
            [2.5, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(mutual_choice(SCORES, 5), expected, rtol=0, atol=0)


def test_feature_choice_hand_example():
    # Latent 0 takes 2 tokens, latent 1 takes 1, latent 2 takes 2 (only one positive), latent 3 none.
    expected = torch.tensor(
        [
            [3.0, 0.0, 2.0, 0.0],
            [0.0, 4.0, 0.0, 0.0],
            [2.5, 0.0, 0.0, 0.0],
        ]
    )
    out = feature_choice(SCORES, torch.tensor([2, 1, 2, 0]))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_only_positive_scores_fire_even_when_budget_allows_more():
    scores = torch.tensor([[-1.0, 0.0], [-2.0, 0.5]])
    assert torch.equal(mutual_choice(scores, 4), torch.tensor([[0.0, 0.0], [0.0, 0.5]]))
    assert torch.equal(token_choice(scores, 2), torch.tensor([[0.0, 0.0], [0.0, 0.5]]))
    assert torch.equal(feature_choice(scores, torch.tensor([2, 2])), torch.tensor([[0.0, 0.0], [0.0, 0.5]]))


def test_ties_go_to_the_lower_index():
    scores = torch.ones(3, 4)
    assert torch.equal(top_m_mask(scores, 2, dim=1)[0], torch.tensor([True, True, False, False]))
    assert torch.equal(top_m_mask(scores, 3, dim=1)[0], torch.tensor([True, True, True, False]))  # m > n / 2
    assert torch.equal(
        top_m_mask(scores, torch.tensor([1, 2, 0, 3]), dim=0).sum(0), torch.tensor([1, 2, 0, 3])
    )
    assert torch.equal(
        top_m_mask(scores, torch.tensor([1, 2, 0, 3]), dim=0)[:, 1], torch.tensor([True, True, False])
    )
    flat = mutual_choice(scores, 5)
    assert torch.equal((flat > 0).flatten(), torch.tensor([True] * 5 + [False] * 7))


def test_budget_rounds_like_batchtopk():
    for k, n in [(2.5, 3), (1.0, 7), (0.3, 1), (32.0, 4096), (7.9, 13)]:
        assert batch_budget(k, n) == int(k * n)
        scores = torch.rand(n, 64) + 0.01
        assert int((BatchTopK(k)(scores) > 0).sum()) == batch_budget(k, n)


def test_over_tokens_flattens_leading_dimensions():
    scores = torch.randn(2, 3, 8)
    out = over_tokens(lambda s: mutual_choice(s, 6))(scores)
    assert out.shape == scores.shape
    assert torch.equal(out.reshape(6, 8), mutual_choice(scores.reshape(6, 8), 6))


def test_feature_choice_rejects_capacities_of_the_wrong_shape():
    with pytest.raises(ValueError, match="capacities"):
        feature_choice(torch.randn(4, 5), torch.ones(4, dtype=torch.long))


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@st.composite
def score_batches(draw):
    n_tokens, n_latents = draw(shapes)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_tokens, n_latents, generator=gen)
    if draw(st.booleans()):  # coarse values make ties common
        scores = scores.round()
    return scores


@settings(max_examples=150, deadline=None)
@given(score_batches(), st.data())
def test_token_choice_properties(scores, data):
    k = data.draw(st.integers(1, scores.shape[1]))
    out = token_choice(scores, k)
    fired = out > 0
    assert (fired.sum(1) <= k).all()
    assert (out[fired] == scores[fired]).all()
    # Every token fills its k slots unless it runs out of positive scores.
    assert torch.equal(fired.sum(1), (scores > 0).sum(1).clamp(max=k))
    # Nothing unselected beats a selected score of the same token.
    best_unselected = torch.where(fired, -torch.inf, scores).amax(1)
    worst_selected = torch.where(fired, scores, torch.inf).amin(1)
    assert (best_unselected <= worst_selected).all()


@settings(max_examples=150, deadline=None)
@given(score_batches(), st.data())
def test_mutual_choice_selects_the_global_top_set(scores, data):
    budget = data.draw(st.integers(0, scores.numel()))
    out = mutual_choice(scores, budget)
    fired = out > 0
    assert int(fired.sum()) == min(budget, int((scores > 0).sum()))
    # Exactly the global top set: reference by a stable sort of the flat scores.
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:budget]
    reference = torch.zeros(scores.numel(), dtype=torch.bool)
    reference[order] = True
    assert torch.equal(fired.flatten(), reference & (scores.flatten() > 0))


@settings(max_examples=150, deadline=None)
@given(score_batches(), st.data())
def test_feature_choice_properties(scores, data):
    n_tokens, n_latents = scores.shape
    capacities = torch.tensor(
        data.draw(st.lists(st.integers(0, n_tokens), min_size=n_latents, max_size=n_latents))
    )
    out = feature_choice(scores, capacities)
    fired = out > 0
    assert torch.equal(fired.sum(0), (scores > 0).sum(0).clamp(max=capacities))
    # Reference: a stable per-column sort.
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    reference = torch.zeros_like(fired)
    for j in range(n_latents):
        reference[order[: int(capacities[j]), j], j] = True
    assert torch.equal(fired, reference & (scores > 0))
