from pathlib import Path

import pytest
import yaml
from sae_lens import LanguageModelSAERunnerConfig

import sae_mutual_choice  # noqa: F401
from sae_mutual_choice.app.compare import CompareSpec
from sae_mutual_choice.app.yaml_config import read_yaml, runner_config_from_dict

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "tests" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    data = read_yaml(path)
    if "runner" in data:
        spec = CompareSpec.from_dict(data)
        cfg = spec.multi_runner_config(log_to_wandb=False)
        assert set(cfg.saes) == set(data["saes"])
        CompareSpec.from_dict(read_yaml(path), quick=True)
    else:
        cfg = runner_config_from_dict(data)
        assert isinstance(cfg, LanguageModelSAERunnerConfig)
        for key, value in data["sae"].items():
            assert cfg.sae.to_dict()[key] == value


def test_set_overrides_nested_fields():
    data = read_yaml(
        ROOT / "configs" / "gpt2_feature_choice.yaml", ["sae.k=16", "lr=0.001", "logger.log_to_wandb=false"]
    )
    cfg = runner_config_from_dict(data)
    assert (cfg.sae.k, cfg.lr, cfg.logger.log_to_wandb) == (16, 0.001, False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.kk=3", r"unknown config key 'sae.kk' for FeatureChoiceTrainingSAEConfig"),
        ("sae.k=abc", r"config key sae.k has the wrong type: expected float"),
        ("sae.capacity=3", r"config key sae.capacity has the wrong type"),
        ("foo=1", r"unknown config key 'foo' for LanguageModelSAERunnerConfig"),
        ("logger.log_to_wandb=maybe", r"config key logger.log_to_wandb has the wrong type: expected bool"),
        ("context_size=1.5", r"config key context_size has the wrong type: expected int"),
        ("sae.architecture=nope", r"sae.architecture must be a registered training architecture"),
        ("sae.min_capacity_ratio=2.0", r"min_capacity_ratio must be a finite number in \[0, 1\]"),
        ("novalue", r"--set takes key=value"),
    ],
)
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        runner_config_from_dict(read_yaml(ROOT / "configs" / "gpt2_feature_choice.yaml", [override]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": {}}, r"unknown config section\(s\) \['extra'\]"),
        (
            {"runner": {"model_name": "x", "hook_names": "h", "bogus": 1}},
            r"unknown config key 'runner.bogus'",
        ),
        ({"evaluation": {"held_out_batches": "many"}}, r"evaluation.held_out_batches has the wrong type"),
        ({"evaluate_only": {"old": {"dir": "x"}}}, r"evaluate_only.old must be"),
        ({"saes": {"a": {"architecture": "mutual_choice", "d_in": 4, "d_sae": 8, "k": 9.0}}}, r"k must be"),
    ],
)
def test_bad_compare_configs(change, message):
    data = yaml.safe_load((ROOT / "tests" / "data" / "compare_tiny.yaml").read_text())
    data.update(change)
    with pytest.raises(ValueError, match=message):
        CompareSpec.from_dict(data)
