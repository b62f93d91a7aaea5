from typing import Any

import pytest
import torch
from helpers import dense_acts, step_input
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TrainingSAE
from safetensors.torch import load_file, save_file

from sae_mutual_choice import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    TokenChoiceTrainingSAE,
    TokenChoiceTrainingSAEConfig,
    calibrate_thresholds,
)
from sae_mutual_choice.app.checkpoints import load_training_checkpoint
from sae_mutual_choice.upstream.mutual_choice_sae import latent_scores, sample_thresholds

D_IN, D_SAE = 16, 64


def _sae(arch: str, **kwargs):
    torch.manual_seed(0)
    if arch == "mutual_choice":
        return MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0, **kwargs))
    return FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0, **kwargs))


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 0.5


def _train(sae, steps: int = 3, scale: float = 1.0) -> None:
    for step in range(steps):
        sae.training_forward_pass(step_input(_data(64, step) * scale))


def _exported(sae, tmp_path) -> JumpReLUSAE:
    sae.save_inference_model(tmp_path)
    return JumpReLUSAE.load_from_disk(tmp_path)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize("rescale", [True, False])
def test_latent_scores_equal_hidden_pre(arch, rescale):
    sae = _sae(arch, rescale_acts_by_decoder_norm=rescale)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # decoder norms that differ per latent
    x = _data(20, 1)
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    blocks = [latent_scores(sae, sae.process_sae_in(x), slice(a, a + 10)) for a in range(0, D_SAE, 10)]
    torch.testing.assert_close(torch.cat(blocks, dim=1), hidden_pre)


def test_mutual_choice_calibration_is_exact(tmp_path):
    sae = _sae("mutual_choice")
    _train(sae)
    x = _data(500, 7)
    thresholds = calibrate_thresholds(sae, x)
    assert torch.all(thresholds == thresholds[0])
    exported = _exported(sae, tmp_path)
    with torch.no_grad():
        fired = exported.encode(x) > 0
    assert int(fired.sum()) == int(4.0 * 500)


def test_feature_choice_calibration_gives_every_latent_its_capacity(tmp_path):
    sae = _sae("feature_choice")
    _train(sae, steps=5)
    x = _data(800, 8)
    calibrate_thresholds(sae, x)
    exported = _exported(sae, tmp_path)
    with torch.no_grad():
        fired = exported.encode(x) > 0
    counts = sae.calibration_counts(800)
    assert isinstance(counts, torch.Tensor)
    assert int(counts.sum()) == int(4.0 * 800)
    # A latent can fall short only where it has too few positive scores.
    positive = (latent_scores(sae, sae.process_sae_in(x), slice(None)) > 0).sum(0)
    assert torch.equal(fired.sum(0), torch.minimum(counts, positive))


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_export_defaults_to_the_corrected_calibration_on_a_sample_of_the_training_inputs(arch, tmp_path):
    sae = _sae(arch, threshold_calibration_tokens=100)
    _train(sae, steps=4)  # 256 inputs seen; 100 of them are kept
    seen = torch.cat([_data(64, step) for step in range(4)])
    sample = sae.calibration_sample()
    assert sample.shape == (100, D_IN)
    assert torch.unique(sample, dim=0).shape[0] == 100  # distinct inputs, each one seen in training
    assert bool((sample[:, None] == seen[None]).all(-1).any(-1).all())
    # The norms of the run's inputs, recomputed here: the export corrects for the sample's.
    norms = seen.norm(dim=-1).double()
    totals = torch.tensor([float(norms.sum()), 256.0], dtype=torch.double)
    expected = sample_thresholds(sae, sample, sample.norm(dim=-1), totals)
    torch.testing.assert_close(_exported(sae, tmp_path / "default").threshold, expected.float())


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_a_sample_of_every_input_calibrates_exactly_on_them(arch, tmp_path):
    sae = _sae(arch, threshold_calibration_tokens=1000)
    _train(sae, steps=4)
    seen = torch.cat([_data(64, step) for step in range(4)])
    default = _exported(sae, tmp_path / "default").threshold
    calibrate_thresholds(sae, seen)
    torch.testing.assert_close(default, _exported(sae, tmp_path / "explicit").threshold)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_the_norm_correction_brings_the_export_closer_to_k_on_the_run(arch):
    """Inputs whose norms spread widely (a few large ones fire many latents): calibrated on a sample,
    the corrected export's L0 on all the run's inputs is much nearer k than the plain calibration's."""
    plain_error, corrected_error = 0.0, 0.0
    for seed in range(6):
        sae = _sae(arch, threshold_calibration_tokens=256)
        generator = torch.Generator().manual_seed(100 + seed)
        scale = torch.exp(torch.randn(4096, 1, generator=generator))  # log-normal norms
        run = torch.randn(4096, D_IN, generator=generator) * scale
        for batch in run.split(256):
            sae.remember_inputs(batch)
        corrected = sae.inference_thresholds()
        plain = calibrate_thresholds(sae, sae.calibration_sample())
        scores = latent_scores(sae, sae.process_sae_in(run), slice(None))
        plain_error += abs(float((scores > plain).sum(-1).float().mean()) - 4.0)
        corrected_error += abs(float((scores > corrected).sum(-1).float().mean()) - 4.0)
    assert corrected_error < 0.5 * plain_error


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_nearly_constant_norms_leave_the_calibration_uncorrected(arch):
    """Inputs normalised per token (a LayerNorm'd hook point): their norms differ by rounding only,
    so the export is the plain calibration on the sample, and the run's norm total is exact to float32 rounding."""
    d_in = 256
    torch.manual_seed(0)
    config_class: Any = (
        MutualChoiceTrainingSAEConfig if arch == "mutual_choice" else FeatureChoiceTrainingSAEConfig
    )
    sae_class: Any = MutualChoiceTrainingSAE if arch == "mutual_choice" else FeatureChoiceTrainingSAE
    sae = sae_class(config_class(d_in=d_in, d_sae=128, k=8.0, threshold_calibration_tokens=512))
    run = torch.randn(8192, d_in, generator=torch.Generator().manual_seed(1)) + 0.3
    run = torch.nn.functional.normalize(run, dim=-1) * d_in**0.5
    for batch in run.split(1024):
        sae.remember_inputs(batch)
    # Each norm in float32 (a bias of 2e-8 here), their total in float64: a float32 total drifts further.
    assert float(sae.input_norm_totals[0]) == pytest.approx(float(run.double().norm(dim=-1).sum()), rel=1e-7)
    corrected = sae.inference_thresholds()
    plain = calibrate_thresholds(sae, sae.calibration_sample())
    torch.testing.assert_close(corrected, plain.to(corrected), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_the_calibration_sample_is_allocated_by_the_first_training_step(arch, tmp_path):
    sae = _sae(arch, threshold_calibration_tokens=1000)
    assert sae.calibration_inputs.numel() == 0
    _train(sae, steps=1)
    assert sae.calibration_inputs.shape == (1000, D_IN)
    sae.save_model(tmp_path)
    loaded = _sae(arch, threshold_calibration_tokens=1000)
    loaded.load_weights_from_checkpoint(tmp_path)
    assert loaded.calibration_inputs.numel() == 0


def test_the_calibration_sample_is_uniform_over_the_whole_run():
    """Inputs arrive in order (as from a corpus sorted by date); the sample must not be the latest ones."""
    sae = _sae("mutual_choice", threshold_calibration_tokens=320)
    steps = 50
    for step in range(steps):
        sae.remember_inputs(torch.full((64, D_IN), float(step)))
    drawn_from = sae.calibration_sample()[:, 0]
    assert drawn_from.shape == (320,)
    # Uniform over 0..49: mean 24.5 with a standard error of 0.8; the latest 320 inputs would give 47.5.
    assert abs(float(drawn_from.mean()) - (steps - 1) / 2) < 4
    assert int((drawn_from < 10).sum()) > 20 and int((drawn_from >= 40).sum()) > 20


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_a_training_step_drops_an_explicit_calibration(arch):
    sae = _sae(arch, threshold_calibration_tokens=0)
    _train(sae)
    calibrate_thresholds(sae, _data(300, 9))
    pinned = sae.inference_thresholds().clone()
    _train(sae, steps=1)
    assert not torch.equal(sae.inference_thresholds(), pinned)
    torch.testing.assert_close(sae.inference_thresholds(), sae.ema_thresholds())


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("source", ["kept_inputs", "calibrated", "running_estimate"])
def test_thresholds_survive_folding_the_activation_scaling(arch, rescale, source, tmp_path):
    """Training on inputs scaled by s, then folding s, must export an SAE that fires on raw inputs
    where the unfolded export fires on scaled inputs, and reconstructs them 1/s as large."""
    s = 3.0
    tokens = 0 if source == "running_estimate" else 128
    sae = _sae(arch, rescale_acts_by_decoder_norm=rescale, threshold_calibration_tokens=tokens)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    _train(sae, steps=4, scale=s)
    if source == "calibrated":
        calibrate_thresholds(sae, _data(400, 11) * s)
    x = _data(200, 12)
    with torch.no_grad():
        unfolded = _exported(sae, tmp_path / "before")
        before = unfolded.encode(x * s)
        sae.fold_activation_norm_scaling_factor(s)
        folded = _exported(sae, tmp_path / "after")
        after = folded.encode(x)
        assert torch.equal(before > 0, after > 0)
        torch.testing.assert_close(unfolded.decode(before) / s, folded.decode(after), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_thresholds_survive_folding_decoder_norms(arch, tmp_path):
    sae = _sae(arch, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    _train(sae)
    x = _data(200, 13)
    with torch.no_grad():
        before = _exported(sae, tmp_path / "before").encode(x)
        sae.fold_W_dec_norm()
        after = _exported(sae, tmp_path / "after").encode(x)
    assert torch.equal(before > 0, after > 0)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


def test_exported_config_is_plain_jumprelu(tmp_path):
    sae = _sae("feature_choice")
    _train(sae)
    sae.save_inference_model(tmp_path)
    exported = JumpReLUSAE.load_from_disk(tmp_path)
    assert isinstance(exported.cfg, JumpReLUSAEConfig)
    assert exported.cfg.metadata.training_architecture == "feature_choice"


def test_calibrate_rejects_other_saes():
    sae = TokenChoiceTrainingSAE(TokenChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with pytest.raises(TypeError, match="mutual_choice or feature_choice"):
        calibrate_thresholds(sae, _data(10, 0))  # type: ignore[arg-type]


def test_logged_threshold_is_the_bias_corrected_estimate():
    sae = _sae("mutual_choice")
    assert isinstance(sae, MutualChoiceTrainingSAE)
    out = sae.training_forward_pass(step_input(_data(64, 0)))
    acts = dense_acts(out)
    # After one update the corrected estimate is that batch's smallest selected score itself.
    torch.testing.assert_close(
        torch.as_tensor(out.metrics["topk_threshold"]).float(), acts[acts > 0].min(), rtol=1e-6, atol=0
    )
    assert float(sae.topk_threshold) < 0.2 * float(acts[acts > 0].min())  # the raw EMA is not


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_no_threshold_to_export_is_an_error_not_inf(arch, tmp_path):
    sae: Any = _sae(arch, threshold_calibration_tokens=0)
    if arch == "mutual_choice":
        sae.topk_threshold.fill_(0.5)  # the raw estimate alone: its weight stays 0
    with pytest.raises(ValueError, match="no threshold to export"):
        sae.save_inference_model(tmp_path)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_a_checkpoint_holds_its_thresholds_not_activations(arch, tmp_path):
    sae = _sae(arch, threshold_calibration_tokens=100)
    _train(sae, steps=3)
    sae.save_model(tmp_path / "checkpoint")
    stored = load_file(tmp_path / "checkpoint" / "sae_weights.safetensors")
    assert not {"calibration_inputs", "calibration_keys"} & set(stored)
    torch.testing.assert_close(stored["calibrated_thresholds"], sae.inference_thresholds().double())
    assert sae.calibrated_thresholds.isnan().all()  # saving does not pin the live SAE
    # Loaded without training, the checkpoint exports exactly what the run exported at that step.
    loaded = load_training_checkpoint(tmp_path / "checkpoint")
    assert loaded.calibration_sample().shape[0] == 0
    assert loaded.input_norm_totals.tolist() == [0.0, 0.0]  # the sample's population starts afresh too
    torch.testing.assert_close(
        _exported(loaded, tmp_path / "a").threshold, _exported(sae, tmp_path / "b").threshold
    )
    # Checkpoints written when the kept inputs were part of the state still load.
    stored.update(
        recent_inputs=torch.zeros(100, D_IN),
        recent_inputs_filled=torch.tensor(5),
        recent_inputs_next=torch.tensor(5),
    )
    save_file(stored, tmp_path / "checkpoint" / "sae_weights.safetensors")
    load_training_checkpoint(tmp_path / "checkpoint")


def test_loading_a_checkpoint_keeps_the_buffers_dtypes(tmp_path):
    """SAELens's loader casts every stored tensor to cfg.dtype; running statistics must not go through bf16."""
    sae: Any = _sae("feature_choice", dtype="bfloat16")
    _train(sae, steps=3)
    carry = torch.linspace(-0.49, 0.49, D_SAE, dtype=torch.double) + 1e-5
    sae.capacity_carry.copy_(carry)
    sae.save_model(tmp_path)
    saelens_loaded: Any = TrainingSAE.load_from_disk(tmp_path)
    assert not torch.equal(saelens_loaded.capacity_carry.double(), carry)  # the defect
    loaded = load_training_checkpoint(tmp_path)
    assert loaded.capacity_carry.dtype == torch.double and torch.equal(loaded.capacity_carry, carry)
    assert loaded.W_enc.dtype == torch.bfloat16
    for name in set(loaded.training_only_buffers) - {"calibrated_thresholds"}:  # the checkpoint pins those
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
