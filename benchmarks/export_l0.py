"""Exported (per-token JumpReLU) L0 versus k, for Mutual and Feature Choice, on SAELens synthetic data.

Trains each architecture with SAELens's ``SyntheticSAERunner`` (Zipfian firing probabilities, as in
SynthSAEBench) and measures mean L0 on held-out samples for three threshold sources:

- ``ema``: the bias-corrected running estimate kept during training;
- ``runner``: the inference SAE the runner writes (calibration on a uniform sample of
  ``threshold_calibration_tokens`` training inputs, norm-corrected), reloaded with plain SAELens;
- ``calibrated``: after ``calibrate_thresholds`` on a separate calibration set, saved and reloaded.

For Feature Choice it also reports how closely each latent's firing rate tracks its capacity share.

    python benchmarks/export_l0.py [--quick]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAE, LoggingConfig
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

import sae_mutual_choice  # noqa: F401  (registers the architectures)
from sae_mutual_choice import (
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAEConfig,
    calibrate_thresholds,
)
from sae_mutual_choice.upstream.mutual_choice_sae import latent_scores


def exported_l0(path: Path, held_out: torch.Tensor) -> tuple[float, torch.Tensor]:
    sae = SAE.load_from_disk(path)
    with torch.no_grad():
        fired = sae.encode(held_out) > 0
    return float(fired.sum(-1).float().mean()), fired.float().mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_features, hidden_dim, d_sae = (256, 64, 256) if args.quick else (1024, 128, 1024)
    training_samples = 200_000 if args.quick else 2_000_000
    k = 8.0
    torch.manual_seed(args.seed)
    model = SyntheticModel(
        SyntheticModelConfig(
            num_features=n_features,
            hidden_dim=hidden_dim,
            firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
            seed=args.seed,
        )
    )
    calibration = model.sample(50_000)
    held_out = model.sample(50_000)
    configs = {
        "mutual_choice": MutualChoiceTrainingSAEConfig(d_in=hidden_dim, d_sae=d_sae, k=k),
        "feature_choice (zipf)": FeatureChoiceTrainingSAEConfig(d_in=hidden_dim, d_sae=d_sae, k=k),
        "feature_choice (uniform)": FeatureChoiceTrainingSAEConfig(
            d_in=hidden_dim, d_sae=d_sae, k=k, capacity="uniform"
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sae_cfg in configs.items():
            start = time.perf_counter()
            out = Path(tmp) / name.replace(" ", "_")
            runner = SyntheticSAERunner(
                SyntheticSAERunnerConfig(
                    synthetic_model=model.cfg,
                    sae=sae_cfg,
                    training_samples=training_samples,
                    batch_size=1024,
                    lr=3e-4,
                    output_path=str(out / "runner"),
                    checkpoint_path=None,
                    eval_samples=0,
                    logger=LoggingConfig(log_to_wandb=False),
                ),
                override_synthetic_model=model,
            )
            sae = runner.run().sae
            with torch.no_grad():
                scores = latent_scores(sae, sae.process_sae_in(held_out), slice(None))
                ema_l0 = float(((scores > sae.ema_thresholds()) & (scores > 0)).sum(-1).float().mean())  # type: ignore[operator]
            runner_l0, _ = exported_l0(out / "runner", held_out)
            calibrate_thresholds(sae, calibration)  # type: ignore[arg-type]
            sae.save_inference_model(out / "calibrated")
            calibrated_l0, rates = exported_l0(out / "calibrated", held_out)
            row = {
                "architecture": name,
                "k": k,
                "ema_l0": ema_l0,
                "ema_l0_over_k": ema_l0 / k,
                "runner_l0": runner_l0,
                "runner_l0_over_k": runner_l0 / k,
                "calibrated_l0": calibrated_l0,
                "calibrated_l0_over_k": calibrated_l0 / k,
                "seconds": time.perf_counter() - start,
            }
            if name.startswith("feature_choice"):
                target = sae.calibration_counts(held_out.shape[0]).float() / held_out.shape[0]  # type: ignore[operator]
                row["capacity_rate_max_abs_error"] = float((rates - target).abs().max())
                row["capacity_rate_correlation"] = float(torch.corrcoef(torch.stack([rates, target]))[0, 1])
            rows.append(row)
            print(json.dumps(row))
    print()
    print("| architecture | k | L0 / k: running estimate | runner's export | calibrate_thresholds |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['architecture']} | {k:g} | {row['ema_l0_over_k']:.3f} | {row['runner_l0_over_k']:.3f}"
            f" | {row['calibrated_l0_over_k']:.3f} |"
        )


if __name__ == "__main__":
    main()
