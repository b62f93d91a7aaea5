"""The ``sae-mc`` commands end to end on the tiny random model and the embedded corpus."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_train_config
from sae_lens import SAE, JumpReLUSAE

import sae_mutual_choice
from sae_mc import main
from sae_mutual_choice.app.compare import CompareSpec

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "data" / "compare_tiny.yaml"


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    config = yaml.safe_load(TINY.read_text())
    config["evaluate_only"] = {"missing": {"path": str(out / "nowhere")}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path), "--out", str(out / "results")]) == 1  # one entry failed to load
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
    text = (compared / "results.md").read_text()
    table, measured_on, listed = text.split("\n\n")
    assert table.count("\n") == 1 + len(results)
    assert measured_on.startswith(
        "Every SAE on the same held-out text: SAELens's metrics on 16 prompts of 32"
    )
    assert f"- topk: {compared / 'saes' / 'topk'}" in listed  # where each SAE came from
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
                 "--set", f"evaluation.output_dir={out}"]) == 1  # fmt: skip
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
        f"sae-mc train: error: {path}: config key sae.capacity has the wrong type: "
        "expected one of ['uniform', 'zipf', 'demand']"
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


def _error_line(capsys) -> str:
    """The one error line a failed command printed (nothing else of note on stderr)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training_tokens=-100", "training_tokens must be an integer >= train_batch_size_tokens=256"),
        ("lr=-0.1", "lr must be a finite number in (0, inf]"),
        (
            "sae.d_in=48",
            "sae.d_in must equal the width of blocks.0.hook_resid_post (32 in this model), got 48",
        ),
        ("hook_name=blocks.7.hook_resid_post", "the model has 2 blocks (blocks.0 .. blocks.1)"),
        ("sae.k=[", "--set sae.k=[: the value is not valid YAML"),
    ],
)
def test_bad_train_input_fails_before_anything_loads(override, message, tmp_path, capsys):
    path = tiny_train_config(tmp_path, "mutual_choice")
    assert main(["train", str(path), "--set", override]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"sae-mc train: error: {path}: ") and message in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "checkpoints").exists()


def test_outputs_under_a_regular_file_are_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = tiny_train_config(tmp_path, "feature_choice")
    assert main(["train", str(path), "--set", f"output_path={blocker}/sae"]) == 2
    assert f"output_path: cannot create {blocker}/sae, because {blocker} is a file" in _error_line(capsys)
    assert main(["compare", str(TINY), "--out", str(blocker / "results")]) == 2
    assert "evaluation.output_dir: cannot create" in _error_line(capsys)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("saes.topk.k=0", "saes.topk.k must be a finite number in (0, 128], got 0"),  # SAELens's own SAE
        ("saes.topk.d_sae=0", "saes.topk.d_sae must be an integer >= 1, got 0"),
        ("saes.mutual_choice.k=0.0", "saes.mutual_choice.k must be a finite number in (0, 128]"),
        ("evaluation.eval_batches=0", "evaluation.eval_batches must be an integer >= 1, got 0"),
    ],
)
def test_bad_compare_settings_name_the_sae(override, message, tmp_path, capsys):
    assert main(["compare", str(TINY), "--set", override, "--out", str(tmp_path / "out")]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_compare_checks_every_sae_width(tmp_path, capsys):
    widths = [f"saes.{name}.d_in=64" for name in ("topk", "mutual_choice", "feature_choice")]
    assert main(["compare", str(TINY), "--out", str(tmp_path), *[f"--set={w}" for w in widths]]) == 2
    assert "saes.topk.d_in must equal the width of blocks.0.hook_resid_post (32" in _error_line(capsys)


def test_unreadable_config_files_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("runner: {model_name: tiny-random\nsaes: {}\n")
    assert main(["compare", str(broken)]) == 2
    assert f"{broken}: invalid YAML:" in _error_line(capsys)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)))
    assert main(["train", str(binary)]) == 2
    assert f"{binary}: not a UTF-8 text file" in _error_line(capsys)
    assert main(["train", str(TINY)]) == 2  # a compare config given to train
    assert "use `sae-mc compare`" in _error_line(capsys)
    train_config = tiny_train_config(tmp_path / "train", "feature_choice")
    assert main(["eval", str(train_config), str(tmp_path)]) == 2  # and a train config given to eval
    assert "(this looks like a `sae-mc train` config)" in _error_line(capsys)


def test_eval_exit_status_and_inputs(compared, tmp_path, capsys):
    # No saes section: the paths on the command line are the work.
    config = yaml.safe_load(TINY.read_text())
    del config["saes"]
    config["evaluation"]["output_dir"] = str(tmp_path / "eval")
    path = tmp_path / "eval_only.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", str(path), str(compared / "saes" / "topk")]) == 0
    # A directory that holds no SAE is refused before the model loads.
    assert main(["eval", str(path), str(tmp_path)]) == 2
    assert f"no saved SAE at {tmp_path} (no cfg.json)" in _error_line(capsys)
    # Every SAE failing to load is a failed run.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text("{}")
    assert main(["eval", str(path), str(broken)]) == 1
    assert "1 of 1 SAEs failed: ['broken']" in capsys.readouterr().err


def test_calibrate_refuses_an_exported_sae_with_a_hint(compared, tmp_path, capsys):
    exported = compared / "saes" / "feature_choice"
    assert main(["calibrate", str(TINY), str(exported), str(tmp_path / "out")]) == 2
    assert "is an exported inference SAE (jumprelu, trained as feature_choice)" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_train_takes_wandb_as_documented():
    from sae_mc import parser

    assert parser().parse_args(["train", "x.yaml", "--wandb"]).wandb


def test_help_loads_neither_torch_nor_saelens():
    code = "import sys, sae_mc; sae_mc.parser(); print(sorted({'torch', 'sae_lens'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_demo_config_is_package_data():
    from sae_mutual_choice.app.cli import demo_config

    config = demo_config()
    assert config.is_file() and config.parent.parent == Path(sae_mutual_choice.__file__).parent
    assert CompareSpec.from_dict(yaml.safe_load(config.read_text()), quick=True).saes


def test_training_shows_progress_and_hides_noise(tmp_path, capsys):
    path = tiny_train_config(tmp_path, "mutual_choice")
    assert main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "training: 100%" in err  # the bar moved in tokens, to the end
    assert f"[sae-mc] SAE saved to {(tmp_path / 'out').resolve()}" in err
    for noise in ("To copy construct", "not be reproducible", "fewer samples"):
        assert noise not in err


def test_adaptive_saes_are_also_reported_at_exactly_k(compared):
    results = json.loads((compared / "results.json").read_text())
    for name in ("mutual_choice", "feature_choice"):
        row = results[name]
        # Exact but for a score or two that float rounding puts on the other side of a boundary.
        assert row["at_k_l0_mean"] == pytest.approx(4.0, rel=1e-3)
        assert row["l0_mean"] != pytest.approx(4.0, rel=1e-3)
        assert math.isfinite(row["at_k_explained_variance"]) and math.isfinite(row["at_k_ce_loss_score"])
    assert results["topk"]["at_k_normalized_mse"] == results["topk"]["normalized_mse"]
    assert "| explained var. @k |" in (compared / "results.md").read_text()


def test_held_out_l0_benchmark_runs_on_saved_saes(compared):
    saes = [str(compared / "saes" / name) for name in ("topk", "mutual_choice", "feature_choice")]
    script = ROOT / "benchmarks" / "held_out_l0.py"
    done = subprocess.run(
        [sys.executable, str(script), str(TINY), *saes, "--batches", "140",
         "--pool-rows", "200", "--repeats", "12", "--sizes", "1024", "4096"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    rows = [line for line in done.stdout.splitlines() if line.startswith("| mutual_choice |")]
    assert len(rows) == 4 and rows[0].endswith("| 2 |")  # two whole 16,384-token chunks
    # What predicts a token's L0: shares of its variance, each in [0, 1]; the norm and its square
    # explain at least what the norm alone does (nested least-squares fits).
    explained = [float(cell) for cell in rows[1].split("|")[4:8]]
    assert all(0 <= r2 <= 1 for r2 in explained) and explained[1] >= explained[0]
    # Recalibrated on samples of 1,024 and 4,096 training tokens: spread over the 12 draws, and less
    # of it with the larger sample (on 6,200 training tokens, held-out text).
    cells = rows[2].split("|")
    spreads = [float(cells[column].split("±")[1]) for column in (4, 6)]
    assert 0 < spreads[1] < spreads[0]
    # The export's norm correction on the same samples: less spread at either size.
    corrected = [float(cells[column].split("±")[1]) for column in (5, 7)]
    assert corrected[0] < spreads[0] and corrected[1] < spreads[1]
    addresses = rows[3].split("|")
    assert float(addresses[3]) > float(addresses[4]) > 0  # the sd between addresses, the se of their mean


def test_the_same_sae_entered_twice_gets_identical_rows(compared, tmp_path):
    # Every SAE is measured on the same held-out token batches, the first SAE too.
    config = yaml.safe_load(TINY.read_text())
    del config["saes"]
    saved = str(compared / "saes" / "mutual_choice")
    config["evaluate_only"] = {"first": {"path": saved}, "again": {"path": saved}}
    config["evaluation"]["output_dir"] = str(tmp_path / "eval")
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["eval", str(path)]) == 0

    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert rows["first"] == rows["again"]
    assert "explained_variance" in rows["first"]
