from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch
from adaptive_allocation_helpers import step_input
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainingSAEConfig

ARCHITECTURES = ["mutual_choice", "feature_choice"]


def build_cfg(architecture: str, **kwargs: Any) -> TrainingSAEConfig:
    defaults: dict[str, Any] = {
        "d_in": 64,
        "d_sae": 256,
        "k": 10.0,
        "apply_b_dec_to_input": False,
        "threshold_calibration_tokens": 512,
    }
    return get_sae_training_class(architecture)[1](**{**defaults, **kwargs})


def random_params(model: torch.nn.Module) -> None:
    for param in model.parameters():
        param.data = torch.rand_like(param)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = torch.rand_like(buffer)
        else:
            buffer.data = torch.randint_like(buffer, 0, 10)


def random_sae(architecture: str, **kwargs: Any) -> TrainingSAE[Any]:
    sae = TrainingSAE.from_dict(build_cfg(architecture, **kwargs).to_dict())
    random_params(sae)
    return sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_config_to_and_from_dict(architecture: str):
    cfg = build_cfg(architecture, aux_loss="aux_zipf", usage_window=50)
    reloaded = TrainingSAEConfig.from_dict(cfg.to_dict())
    assert reloaded.to_dict() == cfg.to_dict()
    assert reloaded.__class__ == cfg.__class__
    assert reloaded.__class__ == get_sae_training_class(architecture)[1]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_inference_config_to_and_from_dict_is_jumprelu(architecture: str):
    cfg_dict = build_cfg(architecture).get_inference_sae_cfg_dict()
    reloaded = SAEConfig.from_dict(cfg_dict)
    assert isinstance(reloaded, JumpReLUSAEConfig)
    assert reloaded.to_dict() == cfg_dict


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("rescale_acts_by_decoder_norm", [True, False])
def test_fold_activation_norm_scaling_factor_in_train_mode(
    architecture: str, rescale_acts_by_decoder_norm: bool
):
    sae = random_sae(
        architecture, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm
    )
    cfg = sae.cfg
    inputs = torch.randn(100, cfg.d_in)

    original_outputs = sae(inputs)
    original_features = sae.encode(inputs)
    sae.fold_activation_norm_scaling_factor(2.0)
    folded_outputs = 2.0 * sae(inputs / 2.0)
    folded_features = sae.encode(inputs / 2.0)

    torch.testing.assert_close(folded_outputs, original_outputs, rtol=1e-5, atol=1e-4)
    # Scores carry the decoder norms, which the fold divides by the factor (as for BatchTopK).
    expected = (
        original_features / 2.0 if rescale_acts_by_decoder_norm else original_features
    )
    torch.testing.assert_close(folded_features, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_fold_W_dec_norm_keeps_the_features_and_outputs(architecture: str):
    sae = random_sae(architecture)
    cfg = sae.cfg
    folded = deepcopy(sae)
    folded.fold_W_dec_norm()
    inputs = torch.randn(10, 4, cfg.d_in)

    features = sae.encode(inputs)
    folded_features = folded.encode(inputs)

    torch.testing.assert_close(folded.W_dec.norm(dim=-1), torch.ones(cfg.d_sae))
    assert torch.equal(features.nonzero(), folded_features.nonzero())
    # Scores carry the decoder norms, as if they had been folded all along (as for BatchTopK).
    torch.testing.assert_close(folded_features, features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        folded.decode(folded_features), sae.decode(features), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fold_W_dec_norm_is_refused_without_decoder_norm_rescaling(architecture: str):
    sae = TrainingSAE.from_dict(
        build_cfg(architecture, rescale_acts_by_decoder_norm=False).to_dict()
    )

    with pytest.raises(NotImplementedError):
        sae.fold_W_dec_norm()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_zero_norm_decoder_rows_give_no_nan(architecture: str):
    sae = random_sae(architecture)
    cfg = sae.cfg
    sae.W_dec.data[:5] = 0.0

    sae.fold_W_dec_norm()

    for name, param in sae.named_parameters():
        assert torch.isfinite(param).all(), name
    assert torch.isfinite(sae.encode(torch.randn(20, cfg.d_in))).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_load_from_checkpoint(architecture: str, tmp_path: Path):
    sae = random_sae(architecture)

    sae.save_model(tmp_path)
    loaded = TrainingSAE.from_dict(build_cfg(architecture).to_dict())
    loaded.load_weights_from_checkpoint(tmp_path)

    saved = sae.state_dict()
    for name, value in loaded.state_dict().items():
        if (
            name != "calibrated_thresholds"
        ):  # the checkpoint holds the computed thresholds
            torch.testing.assert_close(value, saved[name], msg=name)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_use_error_term_returns_the_input_in_train_mode(architecture: str):
    cfg = build_cfg(architecture)
    sae = get_sae_training_class(architecture)[0](cfg, use_error_term=True)
    for _ in range(3):
        sae.training_forward_pass(step_input(torch.randn(32, cfg.d_in), cfg.d_sae))
    inputs = torch.randn(32, cfg.d_in)

    torch.testing.assert_close(sae(inputs), inputs)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_running_statistics_change_only_in_training_forward_pass(architecture: str):
    cfg = build_cfg(architecture, aux_loss="aux_zipf")
    sae = get_sae_training_class(architecture)[0](cfg)
    for _ in range(3):
        sae.training_forward_pass(step_input(torch.randn(32, cfg.d_in), cfg.d_sae))
    state = {name: value.clone() for name, value in sae.state_dict().items()}
    inputs = torch.randn(32, cfg.d_in)

    with torch.no_grad():
        outputs = [sae(inputs) for _ in range(4)]
        sae.encode(inputs)

    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(
            value, state[name], rtol=0, atol=0, equal_nan=True, msg=name
        )
    before = state["latent_usage"]
    sae.training_forward_pass(step_input(inputs, cfg.d_sae))
    assert not torch.equal(sae.state_dict()["latent_usage"], before)


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_ctx=16,
        d_head=4,
        n_heads=4,
        d_vocab=50,
        act_fn="relu",
        d_mlp=32,
    )
    return HookedTransformer(cfg)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_runner_runs_and_saves_a_jumprelu_sae(
    architecture: str, tiny_model: HookedTransformer, tmp_path: Path
):
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, 50, (100, 16)).tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=build_cfg(architecture, d_in=16, d_sae=64, k=4.0),
        model_name="tiny",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="in-memory",
        streaming=False,
        context_size=16,
        training_tokens=1024,
        train_batch_size_tokens=128,
        store_batch_size_prompts=4,
        n_batches_in_buffer=16,
        n_eval_batches=1,
        eval_batch_size_prompts=4,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(tmp_path / "out"),
        checkpoint_path=str(tmp_path / "checkpoints"),
        n_checkpoints=0,
        device="cpu",
    )

    trained = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=dataset
    ).run()
    exported = SAE.load_from_disk(tmp_path / "out")

    assert trained.cfg.architecture() == architecture
    assert isinstance(exported, JumpReLUSAE)
    assert exported.cfg.metadata.training_architecture == architecture
    assert torch.isfinite(exported.threshold).all()
