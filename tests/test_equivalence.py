"""Our architectures against SAELens's own, on identical weights and inputs.

The comparisons with SAELens use our dense step (``sparse_training=False``), which runs the same
operations as SAELens; tests/test_sparse_step.py compares the sparse step with the dense one.
"""

from functools import partial

import pytest
import torch
from helpers import copy_parameters, dense_acts, forward_and_grads, step_input
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from safetensors.torch import load_file

from sae_mutual_choice import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    TokenChoiceTrainingSAE,
    TokenChoiceTrainingSAEConfig,
)
from sae_mutual_choice.upstream.adaptive_allocation import batch_budget

D_IN, D_SAE = 12, 48
# Identical operations in the same order: any difference is a bug, so the tolerance is float32 noise.
assert_same = partial(torch.testing.assert_close, rtol=1e-6, atol=1e-7)


def _dead_mask(seed: int) -> torch.Tensor:
    return torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed)) < 0.3


def _assert_same_steps(ours, theirs, n_steps: int = 4) -> None:
    for step in range(n_steps):
        x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(100 + step)) * 2
        inp = step_input(x, dead=_dead_mask(step))
        out_ours, grads_ours = forward_and_grads(ours, inp)
        out_theirs, grads_theirs = forward_and_grads(theirs, inp)
        assert_same(out_ours.feature_acts, out_theirs.feature_acts)
        assert_same(out_ours.sae_out, out_theirs.sae_out)
        assert out_ours.losses.keys() == out_theirs.losses.keys()
        for name, value in out_theirs.losses.items():
            assert_same(out_ours.losses[name], value)
        assert (
            float(out_theirs.losses["auxiliary_reconstruction_loss"].detach()) > 0
        )  # the aux loss was exercised
        assert grads_ours.keys() == grads_theirs.keys()
        for name, grad in grads_theirs.items():
            assert_same(grads_ours[name], grad)
        with torch.no_grad():  # the same optimiser step on both keeps later steps comparable
            for sae, grads in ((ours, grads_ours), (theirs, grads_theirs)):
                for name, grad in grads.items():
                    getattr(sae, name).sub_(0.05 * grad)


@pytest.mark.parametrize("rescale", [True, False])
def test_mutual_choice_with_aux_k_equals_batchtopk(tmp_path, rescale):
    common = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 3.5,
        "rescale_acts_by_decoder_norm": rescale,
        "topk_threshold_lr": 0.01,
    }
    torch.manual_seed(0)
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    # threshold_calibration_tokens=0: export the running estimate, to compare it with SAELens's.
    ours = MutualChoiceTrainingSAE(
        MutualChoiceTrainingSAEConfig(
            **common, aux_loss="aux_k", threshold_calibration_tokens=0, sparse_training=False
        )
    )
    copy_parameters(theirs, ours)
    _assert_same_steps(ours, theirs)

    # The raw threshold EMA is SAELens's; ours divides it by the EMA's weight (bias correction).
    assert_same(ours.topk_threshold, theirs.topk_threshold)
    lr = theirs.cfg.topk_threshold_lr
    weight = 1 - (1 - lr) ** 4
    ours.save_inference_model(tmp_path / "ours")
    theirs.save_inference_model(tmp_path / "theirs")
    saved_ours = load_file(tmp_path / "ours" / "sae_weights.safetensors")
    saved_theirs = load_file(tmp_path / "theirs" / "sae_weights.safetensors")
    assert saved_ours.keys() == saved_theirs.keys() == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_same(saved_ours[name], saved_theirs[name])
    torch.testing.assert_close(saved_ours["threshold"], saved_theirs["threshold"] / weight, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rescale", [True, False])
def test_token_choice_with_aux_k_equals_topk(tmp_path, rescale):
    common = {"d_in": D_IN, "d_sae": D_SAE, "k": 4, "rescale_acts_by_decoder_norm": rescale}
    torch.manual_seed(1)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    ours = TokenChoiceTrainingSAE(
        TokenChoiceTrainingSAEConfig(**common, aux_loss="aux_k", sparse_training=False)
    )
    copy_parameters(theirs, ours)
    _assert_same_steps(ours, theirs)
    ours.save_inference_model(tmp_path / "ours")
    theirs.save_inference_model(tmp_path / "theirs")
    saved_ours = load_file(tmp_path / "ours" / "sae_weights.safetensors")
    saved_theirs = load_file(tmp_path / "theirs" / "sae_weights.safetensors")
    assert saved_ours.keys() == saved_theirs.keys()
    for name, value in saved_theirs.items():
        assert_same(saved_ours[name], value)


def test_feature_choice_with_uniform_capacities_equals_per_column_top_m():
    cfg = FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2.5, capacity="uniform", aux_loss="none")
    torch.manual_seed(2)
    sae = FeatureChoiceTrainingSAE(cfg)
    budget = batch_budget(2.5, 30)  # 75 slots for 48 latents: capacities of 1 or 2, rotating
    given = [0] * D_SAE
    for step in range(5):
        x = torch.randn(30, D_IN, generator=torch.Generator().manual_seed(step))
        out = sae.training_forward_pass(step_input(x))
        hidden_pre = out.hidden_pre.detach()
        counts = _uniform_counts_naive(budget, step, given)
        reference = torch.zeros(hidden_pre.shape, dtype=torch.bool)
        for j in range(D_SAE):
            top = torch.sort(hidden_pre[:, j], descending=True, stable=True).indices[: counts[j]]
            reference[top, j] = True
        assert torch.equal(dense_acts(out) > 0, reference & (hidden_pre > 0))
        given = [g + c for g, c in zip(given, counts, strict=True)]
    # Over the batches every latent got the same share, to within one token.
    assert max(given) - min(given) <= 1


def _uniform_counts_naive(budget: int, step: int, given: list[int]) -> list[int]:
    """Latent j is owed ``(step + 1) * budget / F - given[j]`` tokens: floor each, then hand the rest
    to the largest remainders (ties to the lower index)."""
    owed = [budget / D_SAE * (step + 1) - g for g in given]
    counts = [int(o // 1) for o in owed]
    order = sorted(range(D_SAE), key=lambda j: (-(owed[j] - counts[j]), j))
    for j in order[: budget - sum(counts)]:
        counts[j] += 1
    return counts
