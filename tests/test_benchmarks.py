"""Smoke runs of the benchmark scripts (their --quick variants): they run and print their tables.

They assert nothing about which architecture wins; the figures belong to the scripts' full runs.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from sae_mutual_choice.compare import CompareSpec

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


def test_fused_decode_candidates_agree_with_the_sparse_steps_decode():
    """benchmarks/fused_pairs.py's formulations (eager and compiled) give today's outputs and gradients."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fused_pairs.py"), "--shape", "64", "16", "128", "4", "--reps", "1"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("same results: True") == 2, done.stdout


def test_full_benchmark_configs_build_every_sae():
    """The full-size benchmark configs (not only their quick variants) give valid SAE configs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling bench_common
    synthetic = importlib.import_module("synthetic")
    real_activations = importlib.import_module("real_activations")

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
