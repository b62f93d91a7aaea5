import contextlib
import copy

import pytest
import torch
from helpers import dense_acts, step_input
from sae_lens.saes.sae import TrainCoefficientConfig

import sae_mutual_choice
from sae_mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, aux_zipf_loss
from sae_mutual_choice.fast.aux_selection import COLUMNS_SEARCH_SHARE, aux_selection
from sae_mutual_choice.fast.host_reads import sync_free
from sae_mutual_choice.upstream.adaptive_allocation import aux_selection as upstream_aux_selection
from sae_mutual_choice.upstream.adaptive_allocation import underuse_weights

D_IN, D_SAE = 10, 40


def _sae(**kwargs) -> MutualChoiceTrainingSAE:
    torch.manual_seed(0)
    kwargs.setdefault("aux_loss", "aux_zipf")  # Mutual Choice's default is aux_k
    return MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.0, **kwargs))


def _batch(seed: int = 0):
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(seed))
    return x


def test_underuse_weights_hand_example():
    # Head (first half) is exactly 0.4 / rank; the tail falls short of that line.
    usage = torch.tensor([0.4, 0.2, 0.4 / 3, 0.1, 0.02, 0.0], dtype=torch.float64)
    weights, exponent = underuse_weights(usage, fit_fraction=0.5, underuse_ratio=0.5)
    assert exponent == pytest.approx(1.0)
    # Rank 5 target 0.08: 0.02 / (0.5 * 0.08) = 0.5 -> weight 0.5; rank 6 never fires -> 1.
    torch.testing.assert_close(weights, torch.tensor([0, 0, 0, 0, 0.5, 1.0], dtype=torch.float64))


def test_nothing_underused_gives_zero_loss():
    usage = 0.3 * torch.arange(1, D_SAE + 1, dtype=torch.float32).pow(-0.8)
    weights, _ = underuse_weights(usage[torch.randperm(D_SAE)], fit_fraction=0.5, underuse_ratio=0.5)
    assert torch.equal(weights, torch.zeros(D_SAE))
    sae = _sae()
    x = _batch()
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    loss = aux_zipf_loss(x, sae.decode(feature_acts), hidden_pre, weights, sae.W_dec, True, 1.0)
    assert float(loss) == 0.0


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("fixed_size", [False, True])
def test_reduces_exactly_to_saelens_auxk_under_the_dead_mask(rescale, fixed_size):
    # The CPU search equals AuxK bit for bit; the fixed-size (sync-free) one to float rounding of its scale.
    select = upstream_aux_selection if fixed_size else aux_selection
    rtol, atol = (1e-6, 1e-7) if fixed_size else (0.0, 0.0)
    sae = _sae(rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7)
    x = _batch(1)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    for n_dead in (1, 3, 5, 17, D_SAE):  # below and above k_aux = d_in // 2 = 5
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        ours = aux_zipf_loss(x, sae_out, hidden_pre, dead.float(), sae.W_dec, rescale, 0.7, select)
        theirs = sae.calculate_topk_aux_loss(x, sae_out, hidden_pre, dead)
        assert float(theirs.detach()) > 0
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)
        grads_ours = torch.autograd.grad(ours, [sae.W_enc, sae.W_dec, sae.b_enc], retain_graph=True)
        grads_theirs = torch.autograd.grad(theirs, [sae.W_enc, sae.W_dec, sae.b_enc], retain_graph=True)
        for a, b in zip(grads_ours, grads_theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_residual_is_detached():
    # With b_dec not subtracted from the input, b_dec reaches the aux loss only through the residual.
    sae = _sae(rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=False)
    x = _batch(2)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    underuse = torch.zeros(D_SAE)
    underuse[:6] = torch.tensor([1.0, 0.5, 0.2, 1.0, 0.9, 0.1])
    loss = aux_zipf_loss(x, sae.decode(feature_acts), hidden_pre, underuse, sae.W_dec, False, 1.0)
    loss.backward()
    assert sae.b_dec.grad is None or torch.count_nonzero(sae.b_dec.grad) == 0
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None
    # Latents that are not candidates (including every latent that produced x_hat) get nothing.
    assert torch.count_nonzero(sae.W_enc.grad[:, 6:]) == 0
    assert torch.count_nonzero(sae.W_dec.grad[6:]) == 0
    assert torch.count_nonzero(sae.W_enc.grad[:, :6]) > 0


def test_underuse_weight_scales_each_latents_contribution():
    sae = _sae(rescale_acts_by_decoder_norm=False)
    x = _batch(3)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts).detach()
    one = torch.zeros(D_SAE)
    one[7] = 1.0
    half = one * 0.5
    full = aux_zipf_loss(x, sae_out, hidden_pre, one, sae.W_dec, False, 1.0)
    halved = aux_zipf_loss(x, sae_out, hidden_pre, half, sae.W_dec, False, 1.0)
    # Hand formula: one candidate, k_aux = 1, scale = w / 5, activation w * h_7.
    residual = x - sae_out
    for w, loss in ((1.0, full), (0.5, halved)):
        recons = (w * hidden_pre[:, 7:8]) * sae.W_dec[7][None]
        expected = (w / 5) * (recons - residual).pow(2).sum(-1).mean()
        torch.testing.assert_close(loss, expected)


def test_aux_zipf_in_training_uses_usage_and_logs_metrics():
    sae = _sae(usage_window=1)  # usage = the last batch's firing rates
    for step in range(3):
        expected_underused = int((sae.underuse(None) > 0).sum())
        out = sae.training_forward_pass(step_input(_batch(step), coefficients={"aux_loss": 1.0}))
        assert out.metrics["underused_latents"] == expected_underused
    assert expected_underused > 0
    assert "usage_zipf_exponent" in out.metrics
    torch.testing.assert_close(sae.latent_usage, (dense_acts(out) > 0).float().mean(0))
    # Dead latents are always candidates, with weight 1.
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[0, 5]] = True
    assert torch.equal(sae.underuse(dead)[[0, 5]], torch.ones(2))


def test_coefficient_warms_up_through_get_coefficients():
    sae = _sae(aux_loss_coefficient=0.25, aux_loss_warm_up_steps=100)
    assert sae.get_coefficients() == {"aux_loss": TrainCoefficientConfig(value=0.25, warm_up_steps=100)}
    dead = torch.ones(D_SAE, dtype=torch.bool)
    losses = [
        sae.training_forward_pass(step_input(_batch(), dead=dead, coefficients={"aux_loss": c})).losses[
            "auxiliary_reconstruction_loss"
        ]
        for c in (0.0, 0.1, 0.2)
    ]
    assert float(losses[0]) == 0.0
    torch.testing.assert_close(losses[2], 2 * losses[1])
    assert _sae(aux_loss="none").get_coefficients() == {}
    assert (
        "auxiliary_reconstruction_loss"
        not in _sae(aux_loss="none").training_forward_pass(step_input(_batch())).losses
    )


def test_aux_zipf_waits_for_evidence_of_underuse():
    """After one batch the usage estimate is that batch alone: a latent that missed it is not dead yet."""
    sae = _sae(usage_window=1000)
    out = sae.training_forward_pass(step_input(_batch(0)))
    missed = (dense_acts(out) > 0).sum(0) == 0
    assert int(missed.sum()) > 0
    weights = sae.underuse(None)
    # The weights scale with the estimate's weight, 1 - (1 - 1/1000) ** 1 = 0.001, not 1.
    assert float(weights.max()) <= 1e-3 + 1e-9 and float(weights[missed].min()) > 0
    # With the evidence of a whole window, the weights are underuse_weights' own.
    sae.latent_usage_weight.fill_(1.0)
    expected, _ = underuse_weights(sae.latent_usage, sae.cfg.zipf_fit_fraction, sae.cfg.underuse_ratio)
    torch.testing.assert_close(sae.underuse(None), expected.float())


@pytest.mark.parametrize("architecture", ["token_choice", "mutual_choice", "feature_choice"])
@pytest.mark.parametrize("aux_loss", ["aux_k", "aux_zipf"])
def test_aux_losses_take_inputs_with_a_sequence_dimension(architecture, aux_loss):
    """``[batch, seq, d_in]`` inputs (SAELens's BatchTopK takes them) give the flattened batch's losses."""
    sae_class, config_class = sae_mutual_choice.ARCHITECTURES[architecture]
    k = 3 if architecture == "token_choice" else 3.0
    torch.manual_seed(0)
    sae = sae_class(config_class(d_in=D_IN, d_sae=D_SAE, k=k, aux_loss=aux_loss, sparse_training=False))
    sae.latent_usage_weight.fill_(1.0)  # aux_zipf: judge under-use from the (zero) usage at once
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:5] = True  # few candidates: the aux selection searches their columns only
    x = _batch(3).reshape(4, 8, D_IN)
    flat_sae = copy.deepcopy(sae)
    losses = sae.training_forward_pass(step_input(x, dead=dead)).losses
    flat = flat_sae.training_forward_pass(step_input(x.reshape(32, D_IN), dead=dead)).losses
    assert float(flat["auxiliary_reconstruction_loss"]) > 0
    for name, value in flat.items():
        torch.testing.assert_close(losses[name], value, msg=name)


@pytest.mark.parametrize("n_candidates", [1, 7, 20, int(COLUMNS_SEARCH_SHARE * D_SAE), 36, D_SAE])
@pytest.mark.parametrize("sync_free_path", [False, True])
def test_aux_selection_takes_each_tokens_best_candidates(n_candidates, sync_free_path):
    """Every search (the candidates' columns, all columns masked, all unmasked; the fixed-size
    sync-free one) selects each token's min(d_in // 2, candidates) best-scoring candidates."""
    generator = torch.Generator().manual_seed(n_candidates)
    hidden_pre = torch.randn(32, D_SAE, generator=generator)
    underuse = torch.zeros(D_SAE)
    underuse[torch.randperm(D_SAE, generator=generator)[:n_candidates]] = (
        torch.rand(n_candidates, generator=generator) + 0.1
    )
    d_in = 24  # 12 per token: more than some candidate sets hold
    with sync_free() if sync_free_path else contextlib.nullcontext():
        selection = aux_selection(hidden_pre, underuse, d_in)
    assert selection is not None
    n_best = min(d_in // 2, n_candidates)
    expected = torch.where(underuse > 0, hidden_pre, -torch.inf).topk(n_best).indices.sort(dim=1).values
    weighted = selection.latents.sort(dim=1).values
    if sync_free_path:  # padded with non-candidates at weight 0
        kept = selection.weights > 0
        assert int(kept.sum()) == 32 * n_best
        weighted = selection.latents[kept].view(32, n_best).sort(dim=1).values
    assert torch.equal(weighted, expected)
    torch.testing.assert_close(
        selection.weights.sort(dim=1).values, underuse[selection.latents].sort(dim=1).values
    )


@pytest.mark.parametrize("architecture", list(sae_mutual_choice.ARCHITECTURES))
@pytest.mark.parametrize("aux", ["aux_k", "aux_zipf"])
@pytest.mark.parametrize("sync_free_path", [False, True])
@pytest.mark.parametrize("n_dead", [0, 2])
def test_one_input_dimension_gives_no_aux_loss(architecture, aux, sync_free_path, n_dead):
    # d_in = 1: k_aux = d_in // 2 = 0, so no latent takes part; the loss is 0, not 0 / 0 or a crash.
    sae_class, config_class = sae_mutual_choice.ARCHITECTURES[architecture]
    k = 1 if architecture == "token_choice" else 1.0
    sae = sae_class(config_class(d_in=1, d_sae=4, k=k, aux_loss=aux, sparse_training=False))
    dead = torch.zeros(4, dtype=torch.bool)
    dead[:n_dead] = True
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    with sync_free() if sync_free_path else contextlib.nullcontext():
        output = sae.training_forward_pass(step_input(x, dead=dead))
    assert float(output.losses["auxiliary_reconstruction_loss"]) == 0.0
    assert torch.isfinite(output.loss)
