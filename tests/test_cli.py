"""The ``sae-mc`` commands end to end on the tiny random model and the embedded corpus."""

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import tiny_train_config
from sae_lens import SAE, JumpReLUSAE

from sae_mutual_choice.cli import main

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "data" / "compare_tiny.yaml"


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    config = yaml.safe_load(TINY.read_text())
    config["evaluate_only"] = {"missing": {"path": str(out / "nowhere")}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path), "--out", str(out / "results")]) == 0
    return out / "results"


def test_compare_writes_a_row_per_sae_with_finite_metrics(compared):
    results = json.loads((compared / "results.json").read_text())
    assert set(results) == {"topk", "mutual_choice", "feature_choice", "missing"}
    for name in ("topk", "mutual_choice", "feature_choice"):
        row = results[name]
        for key in (
            "explained_variance",
            "normalized_mse",
            "ce_loss_score",
            "l0_mean",
            "l0_p90",
            "dead_latents",
        ):
            assert math.isfinite(row[key]), f"{name}.{key}"
        assert row["l0_mean"] == pytest.approx(4.0, rel=0.35)  # held-out text, 32 training steps
    assert results["topk"]["l0_max"] == 4  # token choice: exactly k per token
    assert results["feature_choice"]["dead_latents"] <= results["topk"]["dead_latents"]
    # An entry that cannot load gets a one-line error; the others still ran.
    assert "FileNotFoundError" in results["missing"]["error"]
    table = (compared / "results.md").read_text()
    assert table.count("\n") == 2 + len(results)
    for plot in ("l0_histogram.png", "density_rank.png", "mse_vs_l0.png"):
        assert (compared / plot).stat().st_size > 1000
    run = json.loads((compared / "run.json").read_text())
    assert run["train_tokens_per_second"] > 0


def test_compared_saes_reload_as_plain_saelens_saes(compared):
    for name in ("topk", "mutual_choice", "feature_choice"):
        sae = SAE.load_from_disk(compared / "saes" / name)
        assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"


def test_eval_command_and_hook_mismatch(compared, tmp_path):
    # The same SAE saved under a different hook is refused with a one-line error.
    sae = SAE.load_from_disk(compared / "saes" / "mutual_choice")
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae.save_model(tmp_path / "other_hook")
    out = tmp_path / "eval"
    assert main(["eval", str(TINY), str(compared / "saes" / "topk"), str(tmp_path / "other_hook"),
                 "--set", f"evaluation.output_dir={out}"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(results["topk"]["explained_variance"])
    assert "does not match the configured hook" in results["other_hook"]["error"]


def test_train_and_calibrate(tmp_path):
    path = tiny_train_config(tmp_path, "feature_choice", training_tokens=4096, save_final_checkpoint=True)
    assert main(["train", str(path), "--set", "sae.k=4.0"]) == 0
    exported = SAE.load_from_disk(tmp_path / "out")
    assert isinstance(exported, JumpReLUSAE)
    assert (
        json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]["training_architecture"]
        == "feature_choice"
    )
    (checkpoint,) = [p.parent for p in (tmp_path / "checkpoints").rglob("cfg.json")]
    calibrated = tmp_path / "calibrated"
    assert main(["calibrate", str(TINY), str(checkpoint), str(calibrated)]) == 0
    assert isinstance(SAE.load_from_disk(calibrated), JumpReLUSAE)


def test_bad_config_is_a_one_line_error(tmp_path, capsys):
    path = tiny_train_config(tmp_path, "feature_choice")
    assert main(["train", str(path), "--set", "sae.capacity=zipfian"]) == 2
    expected = (
        "sae-mc train: error: config key sae.capacity has the wrong type: expected one of ['uniform', 'zipf']"
    )
    assert expected in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2


def test_compare_with_only_saes_to_evaluate(compared, tmp_path):
    config = yaml.safe_load(TINY.read_text())
    del config["saes"]
    config["evaluate_only"] = {"earlier_topk": {"path": str(compared / "saes" / "topk")}}
    config["evaluation"]["output_dir"] = str(tmp_path / "results")
    path = tmp_path / "evaluate_only.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path)]) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert math.isfinite(results["earlier_topk"]["explained_variance"])
