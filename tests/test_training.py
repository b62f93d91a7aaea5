"""Training through SAELens's own runners, saving, reloading, and config round trips."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from helpers import step_input
from sae_lens import (
    SAE,
    JumpReLUSAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TopKSAE,
    TrainingSAE,
)
from sae_lens.registry import get_sae_training_class
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_mutual_choice
from sae_mutual_choice import (
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAEConfig,
    TokenChoiceTrainingSAEConfig,
)

CONFIGS = Path(__file__).parent.parent / "configs"
D_MODEL, D_SAE, CONTEXT = 16, 64, 16


def _sae_config(arch: str, **kwargs):
    return {
        "token_choice": lambda: TokenChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=4, **kwargs),
        "mutual_choice": lambda: MutualChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=4.0, **kwargs),
        "feature_choice": lambda: FeatureChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=4.0, **kwargs),
    }[arch]()


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_MODEL, n_ctx=CONTEXT, d_head=4, n_heads=4, d_vocab=50, act_fn="relu", d_mlp=32
    )
    return HookedTransformer(cfg)


@pytest.fixture(scope="module")
def tiny_dataset() -> Dataset:
    tokens = torch.randint(0, 50, (200, CONTEXT), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def _runner_config(sae_cfg, tmp_path: Path) -> LanguageModelSAERunnerConfig:
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny-random",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="in-memory",
        streaming=False,
        context_size=CONTEXT,
        training_tokens=2048,
        train_batch_size_tokens=128,
        store_batch_size_prompts=4,
        n_batches_in_buffer=16,
        n_eval_batches=2,
        eval_batch_size_prompts=4,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(tmp_path / "out"),
        checkpoint_path=str(tmp_path / "checkpoints"),
        n_checkpoints=1,
        device="cpu",
    )


def test_registration_is_idempotent():
    sae_mutual_choice.register()
    sae_mutual_choice.register()
    for name, classes in sae_mutual_choice.ARCHITECTURES.items():
        assert get_sae_training_class(name) == classes


@pytest.mark.parametrize(
    ("arch", "exported_class"),
    [("token_choice", TopKSAE), ("mutual_choice", JumpReLUSAE), ("feature_choice", JumpReLUSAE)],
)
def test_trains_with_the_language_model_runner(arch, exported_class, tiny_model, tiny_dataset, tmp_path):
    cfg = _runner_config(_sae_config(arch), tmp_path)
    sae: Any = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    out = tmp_path / "out"
    exported = SAE.load_from_disk(out)
    assert type(exported) is exported_class
    assert exported.cfg.metadata.training_architecture == arch
    assert exported.cfg.metadata.hook_name == "blocks.0.hook_resid_post"

    # The runner's config round-trips through runner_cfg.json, our fields included.
    restored = LanguageModelSAERunnerConfig.from_dict(json.loads((out / "runner_cfg.json").read_text()))
    assert restored.sae == cfg.sae

    # A checkpoint is the training SAE with all its running statistics.
    (checkpoint,) = [p for p in (tmp_path / "checkpoints").rglob("cfg.json")]
    resumed: Any = TrainingSAE.load_from_disk(checkpoint.parent)
    assert type(resumed) is type(sae)
    assert set(resumed.training_only_buffers) == set(sae.training_only_buffers)
    assert float(resumed.latent_usage_weight) > 0

    kept = sae.calibration_sample() if arch != "token_choice" else None
    with torch.no_grad():
        if kept is None:
            x = torch.randn(32, D_MODEL)
            torch.testing.assert_close(exported.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
        else:
            # Exported thresholds are calibrated on the last training inputs: there, the budget is met.
            fired = int((exported.encode(kept) > 0).sum())
            expected = int(4.0 * kept.shape[0])
            assert fired == expected if arch == "mutual_choice" else 0.97 * expected <= fired <= expected


@pytest.mark.parametrize("arch", ["token_choice", "mutual_choice", "feature_choice"])
def test_an_attention_output_sae_trains_and_encodes_heads(arch, tiny_model, tiny_dataset, tmp_path):
    # hook_z: the runner trains on flattened heads; with SAELens's hook_z reshaping on, the SAE takes
    # [..., n_heads, d_head] in the model and gives that shape back.
    cfg = _runner_config(_sae_config(arch), tmp_path)
    cfg.hook_name = "blocks.0.attn.hook_z"
    sae: Any = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    assert SAE.load_from_disk(tmp_path / "out").cfg.metadata.hook_name == "blocks.0.attn.hook_z"
    sae.eval()
    tokens = torch.tensor(tiny_dataset["input_ids"][:2])
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    z = cache["blocks.0.attn.hook_z"]
    with torch.no_grad():
        flat_acts, flat_out = sae.encode(z.flatten(-2)), sae(z.flatten(-2))
        sae.turn_on_forward_pass_hook_z_reshaping()
        acts, out = sae.encode(z), sae(z)
        sae.turn_off_forward_pass_hook_z_reshaping()
    assert torch.equal(acts, flat_acts)
    assert out.shape == z.shape
    torch.testing.assert_close(out, flat_out.unflatten(-1, z.shape[-2:]))


@pytest.fixture(scope="module")
def synthetic_model() -> SyntheticModel:
    firing = ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4)
    return SyntheticModel(
        SyntheticModelConfig(num_features=128, hidden_dim=32, firing_probability=firing, seed=0)
    )


@pytest.mark.parametrize("arch", ["token_choice", "mutual_choice", "feature_choice"])
def test_trains_with_the_synthetic_runner_and_exports_at_k(arch, synthetic_model, tmp_path):
    torch.manual_seed(0)
    sae_cfg = {
        "token_choice": TokenChoiceTrainingSAEConfig(d_in=32, d_sae=128, k=6),
        "mutual_choice": MutualChoiceTrainingSAEConfig(d_in=32, d_sae=128, k=6.0),
        "feature_choice": FeatureChoiceTrainingSAEConfig(d_in=32, d_sae=128, k=6.0),
    }[arch]
    result = SyntheticSAERunner(
        SyntheticSAERunnerConfig(
            synthetic_model=synthetic_model.cfg,
            sae=sae_cfg,
            training_samples=60_000,
            batch_size=512,
            output_path=str(tmp_path),
            checkpoint_path=None,
            eval_samples=20_000,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        override_synthetic_model=synthetic_model,
    ).run()
    assert result.final_eval is not None
    assert 0 < result.final_eval.mcc <= 1
    exported = SAE.load_from_disk(tmp_path)
    held_out = synthetic_model.sample(20_000)
    with torch.no_grad():
        fired = exported.encode(held_out) > 0
    assert float(fired.sum(-1).float().mean()) == pytest.approx(6.0, rel=0.05)
    if arch == "feature_choice":
        # Each latent fires on held-out data at its capacity share m_j / B.
        sae: Any = result.sae
        share = sae.calibration_counts(held_out.shape[0]).float() / held_out.shape[0]
        rate = fired.float().mean(0)
        assert float((rate - share).abs().max()) < 0.02
        assert float(torch.corrcoef(torch.stack([rate, share]))[0, 1]) > 0.95


_LOAD_WITHOUT_PLUGIN = """
import sys, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
x = torch.load(sys.argv[2])
assert "sae_mutual_choice" not in sys.modules
torch.save(sae(x), sys.argv[3])
print(type(sae).__name__)
"""


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_exported_sae_loads_in_a_fresh_process_without_the_plugin(arch, tmp_path):
    torch.manual_seed(0)
    sae_class, _ = get_sae_training_class(arch)
    sae: Any = sae_class(_sae_config(arch))
    with torch.no_grad():
        for _ in range(3):
            sae.training_forward_pass(step_input(torch.randn(64, D_MODEL) + 0.3))
    sae.save_inference_model(tmp_path / "sae")
    in_process = SAE.load_from_disk(tmp_path / "sae")
    x = torch.randn(20, D_MODEL)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_PLUGIN)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "sae"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("JumpReLUSAE")
    with torch.no_grad():
        expected = in_process(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)
    # ... and the exported SAE does what the training SAE's thresholds say it does (eval mode:
    # a training-mode forward would update Feature Choice's demand statistics).
    sae.eval()
    with torch.no_grad():
        scores = sae.encode_with_hidden_pre(x)[1]
        fires = (scores > sae.inference_thresholds()) & (scores > 0)
        assert torch.equal(in_process.encode(x) > 0, fires)


@pytest.mark.parametrize("arch", ["token_choice", "mutual_choice", "feature_choice"])
def test_deep_copies_are_independent(arch):
    import copy

    sae_class, _ = get_sae_training_class(arch)
    sae: Any = sae_class(_sae_config(arch))
    sae.training_forward_pass(step_input(torch.randn(32, D_MODEL)))
    state = {name: value.clone() for name, value in sae.state_dict().items()}
    twin: Any = copy.deepcopy(sae)
    x = torch.randn(32, D_MODEL) + 1.0
    twin.training_forward_pass(step_input(x))
    for name, value in sae.state_dict().items():
        same = torch.equal(value, state[name]) or bool((value.isnan() & state[name].isnan()).all())
        assert same, f"training the copy changed the original's {name}"
    sae.eval()
    twin.eval()
    torch.testing.assert_close(sae.encode(x), copy.deepcopy(sae).encode(x))
