"""The sparse training step against the dense reference, and fast selection against the dense rules."""

import contextlib
from functools import partial
from typing import Any

import pytest
import torch
from helpers import copy_parameters, dense_acts, forward_and_grads, step_input
from sae_lens.registry import get_sae_training_class

import sae_mutual_choice  # noqa: F401  (registers the architectures)
from sae_mutual_choice.fast import base, selection
from sae_mutual_choice.fast.config import sparse_step_is_faster
from sae_mutual_choice.fast.host_reads import sync_free
from sae_mutual_choice.fast.selection import (
    SHORTLIST_OVER_MEAN_CAPACITY,
    Entries,
    candidate_cut,
    estimated_cut,
    feature_choice_entries,
    firing_statistics,
    mutual_choice_entries,
    token_choice_entries,
)
from sae_mutual_choice.fast.token_choice_sae import token_choice
from sae_mutual_choice.upstream.feature_choice_sae import feature_choice
from sae_mutual_choice.upstream.mutual_choice_sae import mutual_choice

ARCHITECTURES = ["token_choice", "mutual_choice", "feature_choice"]


def _pairs(acts: torch.Tensor) -> Entries:
    where = (acts > 0).nonzero()
    return Entries(where[:, 0], where[:, 1])


def _assert_same_entries(fast: Entries, dense: Entries) -> None:
    """The same firing pairs (a fixed-size selection marks the others in ``fires``)."""
    fires = fast.firing()
    assert torch.equal(fast.rows[fires], dense.rows)
    assert torch.equal(fast.cols[fires], dense.cols)


@pytest.fixture(params=["host reads", "sync-free"])
def host_path(request):
    """Each selection test runs on both paths (:mod:`sae_mutual_choice.fast.host_reads`)."""
    with sync_free() if request.param == "sync-free" else contextlib.nullcontext():
        yield request.param


def _random_scores(generator: torch.Generator, tied: bool) -> torch.Tensor:
    n_tokens = int(torch.randint(1, 40, (), generator=generator))
    n_latents = int(torch.randint(1, 50, (), generator=generator))
    if tied:  # few distinct values: ties everywhere, including at every boundary
        return torch.randint(-3, 4, (n_tokens, n_latents), generator=generator).float()
    return torch.randn(n_tokens, n_latents, generator=generator)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sample_winners", [selection.CUT_SAMPLE_WINNERS, 2])
def test_fast_selection_equals_the_dense_rules(tied, sample_winners, host_path, monkeypatch):
    # Small samples: Mutual Choice estimates its cut at these small budgets too, often too high on ties.
    monkeypatch.setattr(selection, "CUT_SAMPLE_WINNERS", sample_winners)
    generator = torch.Generator().manual_seed(int(tied))
    for _ in range(150):
        scores = _random_scores(generator, tied)
        n_tokens, n_latents = scores.shape
        k = int(torch.randint(1, n_latents + 1, (), generator=generator))
        _assert_same_entries(token_choice_entries(scores, k), _pairs(token_choice(scores, k)))
        budget = int(torch.randint(0, n_tokens * n_latents + 1, (), generator=generator))
        counts = torch.randint(0, n_tokens + 1, (n_latents,), generator=generator)
        # Token-major and latent-major storage of the same scores.
        for stored in (scores, scores.t().contiguous().t()):
            _assert_same_entries(mutual_choice_entries(stored, budget), _pairs(mutual_choice(scores, budget)))
            _assert_same_entries(
                feature_choice_entries(stored, counts, int(counts.sum())),
                _pairs(feature_choice(scores, counts)),
            )


def test_fallbacks_are_exercised_and_exact(host_path):
    """Ties across every Token Choice boundary and past every Feature Choice shortlist width."""
    scores = torch.ones(6, 40)
    scores[:, ::3] = 2.0
    _assert_same_entries(token_choice_entries(scores, 5), _pairs(token_choice(scores, 5)))
    counts = torch.tensor([3] * 40)  # width 4: the 4th shortlisted score ties the boundary
    _assert_same_entries(feature_choice_entries(scores, counts), _pairs(feature_choice(scores, counts)))
    counts[::7] = 6  # without host reads: capacities past the shared shortlist, ranked in full
    fixed = feature_choice_entries(scores, counts, int(counts.sum()))
    _assert_same_entries(fixed, _pairs(feature_choice(scores, counts)))
    # Zipf-like capacities on tied scores: a few latents far past the shared shortlist (whose width is
    # under twice SHORTLIST_OVER_MEAN_CAPACITY times the mean capacity), most at 0 or 1.
    generator = torch.Generator().manual_seed(5)
    tied = torch.randint(-2, 3, (64, 200), generator=generator).float()
    counts = (60 / torch.arange(1, 201) ** 1.5).floor().long()
    assert int(counts.max()) > 2 * SHORTLIST_OVER_MEAN_CAPACITY * int(counts.sum()) / 200
    for stored in (tied, tied.t().contiguous().t()):
        fixed = feature_choice_entries(stored, counts, int(counts.sum()))
        _assert_same_entries(fixed, _pairs(feature_choice(tied, counts)))
    # Mutual Choice: one token holds every large score, so per-token shortlists cannot contain the cut.
    skewed = torch.rand(64, 32, generator=torch.Generator().manual_seed(3))
    skewed[5] += 10
    _assert_same_entries(mutual_choice_entries(skewed, 64), _pairs(mutual_choice(skewed, 64)))
    # Each token's shortlist holds 4 x ceil(64 / 64) = 4 scores; token 5 wins all 32 of its latents.
    assert int((mutual_choice_entries(skewed, 64).rows == 5).sum()) == 32


def test_mutual_choice_falls_back_to_the_bound_cut_when_the_estimate_is_too_high():
    """The sample sees only the scores of 1.0 at every stride-th position; the budget needs 0.5s too."""
    scores = torch.full((64, 129), 0.5)
    stride = 4096 // selection.CUT_SAMPLE_WINNERS
    scores.view(-1)[::stride] = 1.0
    budget = 4096
    estimate = estimated_cut(scores, budget)
    # The estimate alone would miss pairs.
    assert estimate is not None and int((scores >= estimate).sum()) < budget
    _assert_same_entries(mutual_choice_entries(scores, budget), _pairs(mutual_choice(scores, budget)))
    # Fewer positive scores than the budget: every positive one fires.
    scores[10:] = -1.0
    _assert_same_entries(mutual_choice_entries(scores, budget), _pairs(mutual_choice(scores, budget)))


def test_mutual_choice_cut_lets_few_candidates_through_on_heavy_tailed_rows():
    """Real activations: a few tokens' norms (and latents' frequencies) are many times the median. The
    cuts must stay near the true budget-th score in either layout, or most pairs become candidates to
    sort (the bound cut with one even share per row: 31-36 x the budget here, 11-35 x on the demo's
    activations). The estimated cut lets about 1 + 4 / sqrt(CUT_SAMPLE_WINNERS) times through (its margin),
    give or take the sample's noise (1 / sqrt(CUT_SAMPLE_WINNERS); 1.14 +- 0.03 over 200 seeds here)."""
    generator = torch.Generator().manual_seed(0)
    n_tokens, n_latents, budget = 512, 1024, 512 * 8
    token_scale = torch.exp(0.8 * torch.randn(n_tokens, 1, generator=generator))
    latent_scale = torch.exp(0.8 * torch.randn(1, n_latents, generator=generator))
    scores = token_scale * latent_scale * torch.randn(n_tokens, n_latents, generator=generator) - 0.5
    for rows in (scores, scores.t()):  # the shortlisted rows: tokens (token-major), latents (latent-major)
        true_cut = scores.flatten().kthvalue(scores.numel() - budget + 1).values
        cut = candidate_cut(rows.contiguous(), budget)
        assert cut <= true_cut
        assert int((scores >= cut).sum()) < 2 * budget
        estimate = estimated_cut(rows.contiguous(), budget)
        assert estimate is not None and estimate <= true_cut
        assert int((scores >= estimate).sum()) < (1 + 10 / selection.CUT_SAMPLE_WINNERS**0.5) * budget


def test_firing_statistics_read_dense_and_sparse_activations():
    acts = torch.relu(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)))
    acts[..., 4] = 0.0  # a latent that never fires
    counts, smallest = firing_statistics(acts)
    flat = acts.reshape(6, 5)
    assert torch.equal(counts, (flat > 0).sum(0))
    expected = torch.tensor([float(c[c > 0].min()) if (c > 0).any() else torch.inf for c in flat.t()])
    assert torch.equal(smallest, expected)
    # Sparse, with an explicit zero (a selected pair that does not fire): the same figures.
    sparse = acts.to_sparse()
    indices = torch.cat([sparse.indices(), torch.tensor([[0], [0], [4]])], dim=1)
    with_zero = torch.sparse_coo_tensor(indices, torch.cat([sparse.values(), torch.zeros(1)]), acts.shape)
    for statistic, reference in zip(firing_statistics(with_zero.coalesce()), (counts, smallest), strict=True):
        assert torch.equal(statistic, reference)


def _pair_of_saes(architecture: str, **fields: Any) -> tuple[Any, Any]:
    sae_class, config_class = get_sae_training_class(architecture)
    fields = {"d_in": 16, "d_sae": 48, **fields}
    fields["k"] = 4 if architecture == "token_choice" else 4.5
    if architecture != "token_choice":
        fields["threshold_calibration_tokens"] = 0
    torch.manual_seed(0)  # SAELens initialises from the global generator: the same SAEs in any test order
    dense: Any = sae_class(config_class(**fields, sparse_training=False))  # type: ignore[call-arg]
    sparse: Any = sae_class(config_class(**fields))
    with torch.no_grad():  # biases away from 0, so that b_dec's gradient through the encoder is tested
        dense.b_dec.normal_(0, 0.5)
        dense.b_enc.normal_(0, 0.1)
    copy_parameters(dense, sparse)
    return dense, sparse


def _batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(40, 16, generator=generator)
    x = x * torch.linspace(0.05, 4, 40)[:, None]  # quiet tokens get few latents, loud ones many
    x[:3] = 0  # with b_dec subtracted and small b_enc these fire (almost) nothing
    return x


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "feature_choice:zipf", "feature_choice:uniform"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("aux_loss", ["aux_zipf", "aux_k", "none"])
def test_sparse_step_equals_the_dense_step(architecture, rescale, aux_loss):
    """Losses, every parameter gradient and the running statistics, over 3 optimiser steps
    (Feature Choice with each capacity shape; ``ARCH:CAPACITY``)."""
    architecture, _, capacity = architecture.partition(":")
    fields = {"capacity": capacity} if capacity else {}
    dense, sparse = _pair_of_saes(
        architecture, rescale_acts_by_decoder_norm=rescale, aux_loss=aux_loss, **fields
    )
    close = partial(torch.testing.assert_close, rtol=1e-4, atol=1e-6)
    per_token_l0 = []
    for step in range(3):
        dead = torch.rand(48, generator=torch.Generator().manual_seed(50 + step)) < 0.3
        inp = step_input(_batch(step), dead=dead, coefficients={"aux_loss": 0.7})
        out_dense, grads_dense = forward_and_grads(dense, inp)
        out_sparse, grads_sparse = forward_and_grads(sparse, inp)
        assert out_sparse.feature_acts.is_sparse
        close(dense_acts(out_sparse), dense_acts(out_dense))
        assert out_sparse.losses.keys() == out_dense.losses.keys()
        for name, value in out_dense.losses.items():
            close(out_sparse.losses[name], value)
        if aux_loss != "none":
            assert float(out_dense.losses["auxiliary_reconstruction_loss"]) > 0
        close(out_sparse.loss, out_dense.loss)
        assert grads_sparse.keys() == grads_dense.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
        for name, grad in grads_dense.items():
            assert (grads_sparse[name] - grad).norm() <= 1e-4 * grad.norm(), name
        per_token_l0.append((dense_acts(out_dense) > 0).sum(-1))
        with torch.no_grad():
            for name, grad in grads_dense.items():
                getattr(dense, name).sub_(0.05 * grad)
            copy_parameters(dense, sparse)
    for name, buffer in dense.named_buffers():
        close(getattr(sparse, name), buffer, equal_nan=True, msg=name)
    l0 = torch.cat(per_token_l0)
    if architecture != "token_choice":  # the batches had tokens with no latent and tokens with many
        assert int(l0.min()) == 0
        assert int(l0.max()) >= 3 * 4.5


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("input_grad", [False, True])
def test_sparse_step_differentiates_b_dec_and_the_input_as_the_dense_step(
    architecture, apply_b_dec_to_input, input_grad
):
    """Without an input gradient, the sparse step sends the encoder's input gradient to ``b_dec`` as a
    sum over latents; with one, per token. Both agree with the dense step, with and without ``b_dec``
    subtracted from the input."""
    dense, sparse = _pair_of_saes(architecture, apply_b_dec_to_input=apply_b_dec_to_input)
    dead = torch.rand(48, generator=torch.Generator().manual_seed(7)) < 0.3
    inputs = {}
    grads = {}
    for name, sae in (("dense", dense), ("sparse", sparse)):
        inputs[name] = _batch(1).requires_grad_(input_grad)
        inp = step_input(inputs[name], dead=dead, coefficients={"aux_loss": 0.7})
        grads[name] = forward_and_grads(sae, inp)[1]
    for name, grad in grads["dense"].items():
        assert (grads["sparse"][name] - grad).norm() <= 1e-4 * grad.norm(), name
    if input_grad:
        torch.testing.assert_close(inputs["sparse"].grad, inputs["dense"].grad, rtol=1e-4, atol=1e-6)


def test_hooked_sae_trains_densely():
    """A hook sees dense activations, so a hooked SAE takes SAELens's dense step."""
    _, sparse = _pair_of_saes("mutual_choice")
    seen = []
    sparse.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.shape))
    out = sparse.training_forward_pass(step_input(_batch(0)))
    assert not out.feature_acts.is_sparse
    assert seen == [torch.Size([40, 48])]
    sparse.reset_hooks()
    assert sparse.training_forward_pass(step_input(_batch(0))).feature_acts.is_sparse


def test_sparse_training_must_be_a_bool_or_auto():
    _, config_class = get_sae_training_class("mutual_choice")
    with pytest.raises(ValueError, match="sparse_training must be true, false or 'auto', got 'yes'"):
        config_class(d_in=4, d_sae=8, k=2.0, sparse_training="yes")  # type: ignore[call-arg]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_auto_takes_the_step_its_rule_picks_for_the_device(architecture, monkeypatch):
    """The default, ``"auto"``: sparse on CPU; where the rule says dense (any other device, for now), dense."""
    sae_class, config_class = get_sae_training_class(architecture)
    k = 4 if architecture == "token_choice" else 4.0
    sae: Any = sae_class(config_class(d_in=16, d_sae=48, k=k))  # type: ignore[call-arg]
    assert sae.cfg.sparse_training == "auto"
    assert sae.training_forward_pass(step_input(_batch(0))).feature_acts.is_sparse
    assert sparse_step_is_faster(torch.device("cpu")) and not sparse_step_is_faster(torch.device("cuda"))
    monkeypatch.setattr(base, "sparse_step_is_faster", lambda device: device.type != "cpu")
    assert not sae.training_forward_pass(step_input(_batch(1))).feature_acts.is_sparse


def _step_under(
    sae: Any, x: torch.Tensor, autocast: bool
) -> tuple[set[tuple[int, int]], dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, grads = forward_and_grads(sae, step_input(x, coefficients={"aux_loss": 1.0}))
    return {tuple(pair) for pair in dense_acts(out).nonzero().tolist()}, grads


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_autocast_step_is_as_close_to_fp32_as_the_dense_step(architecture):
    """Under bf16 autocast (SAELens's ``autocast``), the sparse step's selection and gradients stray from
    the fp32 step's no more than SAELens's dense step's do: the encoder bias is added in fp32."""
    sae_class, config_class = get_sae_training_class(architecture)
    config_class: Any = config_class  # one of ours: it has k, sparse_training and aux_loss
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=generator)
    saes = {}
    for sparse in (True, False):
        k = 8 if architecture == "token_choice" else 8.0
        torch.manual_seed(0)
        saes[sparse] = sae_class(
            config_class(d_in=64, d_sae=512, k=k, sparse_training=sparse, aux_loss="aux_zipf")
        )
        with torch.no_grad():
            saes[sparse].b_enc.copy_(torch.randn(512, generator=torch.Generator().manual_seed(6)))
    initial = {name: value.clone() for name, value in saes[True].state_dict().items()}
    reference_pairs, reference_grads = _step_under(saes[True], x, autocast=False)
    strays = {}
    for sparse, sae in saes.items():
        sae.load_state_dict(initial)  # the running statistics before the fp32 step, too
        pairs, grads = _step_under(sae, x, autocast=True)
        strays[sparse] = [len(pairs ^ reference_pairs) / len(reference_pairs)] + [
            float((grads[name] - reference_grads[name]).norm() / reference_grads[name].norm())
            for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        ]
    assert strays[False][1] > 0  # bf16 does move the dense step: the comparison means something
    for ours, dense in zip(strays[True], strays[False], strict=True):
        assert ours <= dense * 1.05 + 1e-6, (strays[True], strays[False])
