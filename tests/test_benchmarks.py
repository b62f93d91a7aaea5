"""Smoke runs of the benchmark scripts (their --quick variants): they run and print their tables.

They assert nothing about which architecture wins; the figures belong to the scripts' full runs.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import forward_and_grads, step_input

from sae_mutual_choice.app.cli import demo_config
from sae_mutual_choice.app.compare import CompareSpec
from sae_mutual_choice.app.yaml_config import read_yaml

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("script", "args", "header"),
    [
        ("step_time.py", ["--quick", "--reps", "1"], "| d_in, F, k | architecture | step s |"),
        ("export_l0.py", ["--quick"], "| architecture | k | L0 / k: running estimate |"),
        (
            "distributed.py",
            ["--quick", "--steps", "3"],
            "| B, F, k | architecture | payload per rank per step |",
        ),
        ("synthetic.py", ["--quick", "--out", "{tmp}/synthetic.json"], "| variant | MCC | F1 |"),
        (
            "mc_shortlist.py",
            [
                "--config",
                "tests/data/compare_tiny.yaml",
                "--tokens",
                "256",
                "--k",
                "8",  # a budget of 2,048 pairs: the smallest that the cut estimate samples
                "--reps",
                "1",
                "--steps",
                "3",
            ],
            "| inputs | rows | cut | candidates / budget | selection ms |",
        ),
        (
            "real_activations.py",
            ["--quick", "--out", "{tmp}/real.json", "--set", "runner.training_tokens=2048"],
            "| variant | width | k | norm. MSE |",
        ),
    ],
)
def test_benchmark_runs(script, args, header, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert header in done.stdout


def test_end_to_end_times_every_part(tmp_path):
    """benchmarks/end_to_end.py on the tiny compare: each part timed, the parts inside the profiled run."""
    import json

    out = tmp_path / "end_to_end.json"
    config = ROOT / "tests" / "data" / "compare_tiny.yaml"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), "--config", str(config), "--out", str(out)],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| part (profiled run) | seconds | ms per step | share |" in done.stdout
    result = json.loads(out.read_text())
    parts = result["parts_seconds"]
    saes = ["SAE topk", "SAE mutual_choice", "SAE feature_choice"]
    assert set(parts) == {"model", "store", "trainer (rest)", *saes}
    assert all(parts[name] > 0 for name in ["model", "store", *saes])
    assert parts["trainer (rest)"] >= 0  # the timed parts are disjoint and inside the profiled run
    tokens_per_second = result["train_tokens_per_second"]
    assert result["steps"] == 32 and tokens_per_second * result["plain_seconds"] == pytest.approx(8192)


def test_end_to_end_stands_in_for_a_missing_model(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    end_to_end = importlib.import_module("end_to_end")
    settings = {"runner": {"model_name": "smollm2-135m-instruct", "device": "cuda"}, "saes": {}}
    monkeypatch.setattr(end_to_end.embedded, "smollm2_gguf_dir", lambda: None)
    replaced = end_to_end.with_stand_in_model(settings)
    assert replaced["runner"] == {"model_name": "smollm2-135m-random", "device": "cuda"}
    assert settings["runner"]["model_name"] == "smollm2-135m-instruct"  # the caller's dict is not changed
    assert end_to_end.with_stand_in_model({"runner": {"model_name": "tiny-random"}}) == {
        "runner": {"model_name": "tiny-random"}
    }
    monkeypatch.setattr(end_to_end.embedded, "smollm2_gguf_dir", lambda: ROOT)
    assert end_to_end.with_stand_in_model(settings) is settings


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >>"$CALLS"
case "$*" in
    *is_available*) echo "Fake GPU" ;;
    *tomllib*|*find_spec*) exec "$REAL_PYTHON" "$@" ;;
    *step_time.py*--autocast*) exit 3 ;;
esac
"""


def test_gpu_script_runs_every_part_and_reports_each_status(tmp_path):
    """benchmarks/gpu.sh with a stand-in python: a failing part stops none of the others, the summary
    gives each part's exit status, and WHEELS installs the project's dependencies offline."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "gpu"
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "REAL_PYTHON": sys.executable,
        "CALLS": str(calls),
        "WHEELS": str(tmp_path / "wheels"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
        capture_output=True, text=True, check=False, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    parts = ["syncs", "syncs_test", "step_time_fp32", "step_time_bf16", "fused_pairs", "end_to_end_fp32"]
    for name in parts:
        assert f"{name}: exit {3 if name == 'step_time_bf16' else 0}" in summary
    assert (out / "device.txt").read_text() == "Fake GPU\n"
    (install,) = [line for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    assert f"--no-index --find-links {tmp_path / 'wheels'}" in install
    assert "sae-lens" in (out / "requirements.txt").read_text()


def test_fused_decode_candidates_agree_with_the_sparse_steps_decode():
    """benchmarks/fused_pairs.py's formulations (eager and compiled) give today's outputs and gradients."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fused_pairs.py"), "--shape", "64", "16", "128", "4", "--reps", "1"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("same results: True") == 3, done.stdout


def test_aux_selection_benchmark_times_every_search():
    """benchmarks/aux_selection.py prints a row per candidate share, the unmasked search where all are."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aux_selection.py"), "--shape", "64", "100", "8", "--reps", "1"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 64, 100, 8 |")]
    assert len(rows) == 6, done.stdout
    assert [row.endswith("| - |") for row in rows] == [True] * 5 + [False], done.stdout


def test_ab_steps_times_this_checkout_against_a_revision():
    """benchmarks/ab_steps.py runs both sides' steps (each from its own package) and prints a row."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab_steps.py"), "--base", "HEAD", "--shape", "64", "16", "48", "4",
         "--steps", "3", "--architectures", "mutual_choice"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| mutual_choice |")]
    assert float(row.split("|")[4]) > 0, done.stdout


def test_full_benchmark_configs_build_every_sae():
    """The full-size benchmark configs (not only their quick variants) give valid SAE configs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling bench_common
    synthetic = importlib.import_module("synthetic")
    real_activations = importlib.import_module("real_activations")
    importlib.import_module("fc_competition")  # registers the diagnosis' feature_choice_ranked

    for path in sorted((ROOT / "configs" / "benchmarks").glob("synthetic*.yaml")):  # with the diagnosis ones
        settings = synthetic.expand_lr_sweep(synthetic.load_settings(path, quick=False))
        for variant in settings["variants"].values():
            assert synthetic.sae_config(settings, variant).d_sae == settings["d_sae"]
    settings = real_activations.load_settings(
        ROOT / "configs" / "benchmarks" / "real_activations.yaml", quick=False
    )
    grid = real_activations.sae_grid(settings)
    assert len(grid) == len(settings["variants"]) * (len(settings["ks"]) + 1)
    spec = CompareSpec.from_dict({"runner": {**settings["runner"], "seed": 0}, "saes": grid})
    assert set(spec.multi_runner_config(log_to_wandb=False).saes) == set(grid)
    gpu = real_activations.load_settings(
        ROOT / "configs" / "benchmarks" / "real_activations_gpu.yaml", quick=False
    )
    assert gpu["variants"] == settings["variants"]  # the larger run compares the same variants
    assert gpu["runner"].keys() == settings["runner"].keys()
    CompareSpec.from_dict({"runner": {**gpu["runner"], "seed": 0}, "saes": real_activations.sae_grid(gpu)})
    # end_to_end.py's aux-cost config: the demo's training, Feature Choice with and without aux_zipf.
    aux_cost = CompareSpec.from_dict(
        read_yaml(ROOT / "configs" / "benchmarks" / "end_to_end_aux_cost.yaml", [])
    )
    demo = CompareSpec.from_dict(read_yaml(demo_config(), []))
    assert aux_cost.runner == demo.runner
    assert {(c.capacity, c.aux_loss) for c in aux_cost.saes.values()} == {
        (capacity, aux) for capacity in ("demand", "zipf") for aux in ("aux_zipf", "none")
    }


def test_settings_overrides(tmp_path):
    """--quick's dotted keys, then --set KEY=VALUE (read as YAML); a malformed or unknown key is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    load_settings = importlib.import_module("bench_common").load_settings
    path = tmp_path / "bench.yaml"
    path.write_text("seeds: [0]\nrunner: {lr: 0.1, device: cpu}\nquick: {runner.lr: 0.2}\n")
    assert load_settings(path, quick=False) == {"seeds": [0], "runner": {"lr": 0.1, "device": "cpu"}}
    assert load_settings(path, quick=True, overrides=["seeds=[1, 2]", "runner.device=cuda"]) == {
        "seeds": [1, 2],
        "runner": {"lr": 0.2, "device": "cuda"},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_settings(path, quick=False, overrides=["runner.lr"])
    with pytest.raises(ValueError, match="no section 'model'"):
        load_settings(path, quick=False, overrides=["model.name=x"])


def test_synthetic_learning_rate_sweep_expands_and_keeps_the_best():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    synthetic = importlib.import_module("synthetic")
    settings = {
        "lr": 1e-3,
        "variants": {"topk": {"architecture": "topk"}, "fc": {"architecture": "feature_choice"}},
        "lr_sweep": {"lrs": [1e-4, 1e-2], "variants": ["topk"]},
    }
    expanded = synthetic.expand_lr_sweep(settings)
    assert list(expanded["variants"]) == ["topk, lr 0.0001", "topk, lr 0.01", "fc"]
    assert expanded["variants"]["topk, lr 0.01"] == {"architecture": "topk", "lr": 1e-2}
    summary = [
        {"variant": "topk, lr 0.0001", "explained_variance": 0.7},
        {"variant": "topk, lr 0.01", "explained_variance": 0.6},
        {"variant": "fc", "explained_variance": 0.5},
    ]
    assert [s["variant"] for s in synthetic.best_of_sweep(expanded, summary)] == ["topk, lr 0.0001", "fc"]
    with pytest.raises(ValueError, match=r"lr_sweep\.variants"):
        synthetic.expand_lr_sweep({**settings, "lr_sweep": {"lrs": [1e-3], "variants": ["batchtopk"]}})


def test_synthetic_promises_check_feature_choice_against_topk_per_learning_rate():
    """Issue 26's checks: dead latents on the worst seed, means of the rest, a named failure per check."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    synthetic = importlib.import_module("synthetic")

    def row(architecture, lr, seed, dead, unique, mcc, ev, aux_loss="aux_k"):
        return {
            "architecture": architecture,
            "aux_loss": aux_loss,
            "lr": lr,
            "seed": seed,
            "dead_latents": dead,
            "uniqueness": unique,
            "live_uniqueness": unique,
            "mcc": mcc,
            "explained_variance": ev,
        }

    rows = [
        row("topk", 1e-3, 0, 50, 0.50, 0.40, 0.70),
        row("topk", 1e-3, 1, 50, 0.50, 0.40, 0.70),
        row("feature_choice", 1e-3, 0, 0, 0.60, 0.50, 0.695, "aux_zipf"),
        row("feature_choice", 1e-3, 1, 2, 0.60, 0.50, 0.695, "aux_zipf"),
        row("topk", 3e-4, 0, 10, 0.50, 0.40, 0.60),
        row("feature_choice", 3e-4, 0, 0, 0.40, 0.30, 0.58, "aux_zipf"),
        row("batchtopk", 3e-4, 0, 70, 0.5, 0.4, 0.6),
        row("mutual_choice", 3e-4, 0, 60, 0.5, 0.4, 0.6, "aux_zipf"),
    ]
    lines = synthetic.promises(rows, d_sae=100).splitlines()
    assert lines[2].startswith("| 0.0003 | 0.0 | 0.400 / 0.500 | 0.400 / 0.500 | — |")  # no recovery figures
    assert "no: uniqueness, MCC, EV | 70 / — / 60 |" in lines[2]
    assert lines[3].startswith("| 0.001 | 2.0 | 0.600 / 0.500 |")  # the worst seed's 2 of 100 latents
    assert "| -0.005 | no: dead | — / — / — |" in lines[3]
    rows[3]["dead_latents"] = 1
    assert "| -0.005 | yes |" in synthetic.promises(rows, d_sae=100).splitlines()[3]
    for r, recovered in zip(rows[:4], (30, 32, 40, 41), strict=True):
        r["recovered_features"] = recovered
    assert (
        "| 0.600 / 0.500 | 40 / 31 | 0.500 / 0.400 |" in synthetic.promises(rows, d_sae=100).splitlines()[3]
    )


def test_synthetic_recovery_counts_features_and_latents_at_the_cosine_threshold():
    """A feature counts once however many latents recover it; unlearned latents recover nothing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    synthetic = importlib.import_module("synthetic")
    features = torch.eye(4)
    below = synthetic.RECOVERED_COSINE - 0.05
    decoder = torch.stack(
        [
            torch.tensor([1.0, 0, 0, 0]),
            torch.tensor([-2.0, 0.1, 0, 0]),  # the same feature, negated and scaled: a duplicate
            torch.tensor([0, 0, below, (1 - below**2) ** 0.5]),  # matches nothing well enough
            torch.tensor([0, 0, 0, 1.0]),
        ]
    )
    assert synthetic.recovery(decoder, features) == {"recovered_features": 2, "recovering_latents": 3}


def test_synthetic_combine_joins_runs_into_one_summary(tmp_path, capsys):
    """A sweep on one seed and the chosen rate on another: one row per variant over both runs."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    synthetic = importlib.import_module("synthetic")

    def row(variant: str, seed: int, explained_variance: float) -> dict:
        return {metric: 1.0 for metric in synthetic.METRICS} | {
            "variant": variant,
            "seed": seed,
            "explained_variance": explained_variance,
        }

    sweep = {"lrs": [1e-3, 3e-3], "variants": ["topk"]}
    first = {"settings": {"lr_sweep": sweep}, "wall_seconds": 60, "rows": [row("topk, lr 0.001", 0, 0.5)]}
    first["rows"].append(row("topk, lr 0.003", 0, 0.7))
    second = {"settings": {}, "wall_seconds": 60, "rows": [row("topk, lr 0.003", 1, 0.8)]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, run in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(run))
    synthetic.combine(paths, tmp_path / "combined.json")
    summary = {s["variant"]: s for s in json.loads((tmp_path / "combined.json").read_text())["summary"]}
    assert summary["topk, lr 0.003"]["seeds"] == 2
    assert summary["topk, lr 0.003"]["explained_variance"] == pytest.approx(0.75)
    best = capsys.readouterr().out.split("best learning rate")[1]
    assert "topk, lr 0.003" in best and "topk, lr 0.001" not in best


def test_fc_competition_floor_latents_learn_from_the_aux_loss_alone():
    """fc_competition.py's ``floor_learning: aux``: floor latents still fire, but the main loss sends them
    no gradient (encoder or decoder); the aux loss does, and without the knob the main loss does too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    fc_competition = importlib.import_module("fc_competition")

    def floor_gradients(
        floor_learning: str, aux_loss: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        cfg = fc_competition.RankedFeatureChoiceConfig(
            d_in=16, d_sae=32, k=4.0, ranking="score", floor_learning=floor_learning, aux_loss=aux_loss
        )
        sae = fc_competition.RankedFeatureChoiceSAE(cfg)
        with torch.no_grad():  # latents 0-7 with no demand: the floor sets their capacity
            sae.latent_demand.copy_(torch.cat([torch.zeros(8), torch.ones(24)]))
            sae.latent_demand_weight.fill_(1.0)
        floor = sae.floor_latents()
        dead = torch.arange(32) < 8 if aux_loss == "aux_k" else None  # AuxK on the floor latents
        out, grads = forward_and_grads(sae, step_input(torch.randn(64, 16), dead=dead))
        fired = out.feature_acts[:, floor].gt(0).any(0)
        return fired, grads["W_enc"][:, floor].abs().sum(0), grads["W_dec"][floor].abs().sum(1)

    fired, enc, dec = floor_gradients("aux", "none")
    assert fired.all()
    assert (enc == 0).all() and (dec == 0).all()
    fired, enc, dec = floor_gradients("main", "none")
    assert fired.all() and (enc > 0).all() and (dec > 0).all()
    _, enc, dec = floor_gradients("aux", "aux_k")
    assert (enc > 0).all() and (dec > 0).all()


def test_synthetic_promises_keep_each_feature_choice_variant_apart():
    """Files of two Feature Choice variants combined: one table per variant, never their mean."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    synthetic = importlib.import_module("synthetic")

    def row(variant, architecture, unique):
        return {
            "variant": f"{variant}, lr 0.001",
            "architecture": architecture,
            "aux_loss": "aux_zipf",
            "lr": 1e-3,
            "seed": 0,
            "dead_latents": 0,
            "uniqueness": unique,
            "live_uniqueness": unique,
            "mcc": 0.55,
            "explained_variance": 0.7,
        }

    rows = [
        row("topk", "topk", 0.5),
        row("feature_choice", "feature_choice", 0.6),
        row("fc b", "feature_choice", 0.4),
    ]
    text = synthetic.promises(rows, d_sae=100)
    assert "feature_choice against topk:" in text and "fc b against topk:" in text
    assert "| 0.600 / 0.500 |" in text and "| 0.400 / 0.500 |" in text
    assert "0.500 / 0.500" not in text  # the pooled mean of 0.6 and 0.4
    assert "against" not in synthetic.promises(rows[:2], d_sae=100)  # one pair: one table, as before


def test_fc_competition_floor_as_a_minimum():
    """fc_competition.py's ``floor: max``: latents below the floor get exactly the floor, the others keep
    capacities in proportion to their demand, and together they fill the budget; the shipped floor instead
    gives every latent the floor plus a share of the rest."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    fc_competition = importlib.import_module("fc_competition")

    def capacities(floor: str) -> torch.Tensor:
        cfg = fc_competition.RankedFeatureChoiceConfig(
            d_in=16, d_sae=32, k=4.0, ranking="score", min_capacity_ratio=0.5, floor=floor
        )
        sae = fc_competition.RankedFeatureChoiceSAE(cfg)
        with torch.no_grad():  # latents 0-7 with no demand, 8-31 with demand 1, 2, 1, 2, ...
            sae.latent_demand.copy_(torch.cat([torch.zeros(8), torch.tensor([1.0, 2.0]).repeat(12)]))
            sae.latent_demand_weight.fill_(1.0)
        return sae.capacities(64)

    floor = 0.5 * 4.0 * 64 / 32  # min_capacity_ratio of the uniform capacity k * B / d_sae
    minimum = capacities("max")
    assert float(minimum.sum()) == pytest.approx(4.0 * 64)
    assert minimum[:8].tolist() == pytest.approx([floor] * 8)
    assert (minimum[9::2] / minimum[8::2]).tolist() == pytest.approx([2.0] * 12)
    mixed = capacities("mix")
    assert float(mixed.sum()) == pytest.approx(4.0 * 64)
    assert mixed[:8].tolist() == pytest.approx([floor] * 8)
    assert mixed[9] < minimum[9]  # the shipped floor takes its tokens from every latent
