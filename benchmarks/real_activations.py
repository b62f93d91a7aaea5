"""Real activations: every variant at several k, and one wider SAE, on the embedded model and corpus, per seed.

For each seed, one ``sae-mc compare`` run (SAELens's ``MultiSAETrainingRunner``: one LLM pass feeds every
SAE, so all of them see identical activations in identical order) trains every variant of
``configs/benchmarks/real_activations.yaml`` at each ``k`` and width, then evaluates the exported SAEs on held-out
addresses. Reported per variant, k and width, mean ± sd over seeds: normalised MSE, explained variance,
CE loss recovered, inference L0 (exported SAE), dead latents (no firing on the held-out tokens),
under-used latents (firing below ``underuse_ratio`` of their Zipf target, as aux_zipf defines it, with its
defaults), and the per-token L0 spread (p90 / median).

    python benchmarks/real_activations.py [--quick] [--config configs/benchmarks/real_activations.yaml] [--out FILE.json]
    python benchmarks/real_activations.py --render docs/results/real_activations.json   # section and plots

The JSON is rewritten after every seed, so a run cut short keeps the seeds it finished. The docs/results.md
section and the plots are named after the config file (``real_activations``, ``real_activations_gpu``).
"""

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import load_settings, parse_arguments, write_section

from sae_mutual_choice.app.compare import CompareSpec, run_compare
from sae_mutual_choice.upstream.adaptive_allocation import (
    AdaptiveAllocationTrainingSAEConfig,
    underuse_weights,
)

ROOT = Path(__file__).parent.parent
IMAGES = ROOT / "docs" / "images"
INTEGER_K = ("topk", "token_choice")
METRICS = {
    "normalized_mse": "norm. MSE",
    "explained_variance": "explained var.",
    "ce_loss_score": "CE loss recovered",
    "l0_mean": "L0",
    "dead_latents": "dead",
    "underused_latents": "under-used",
    "l0_spread": "L0 p90/median",
    # At equal sparsity: adaptive SAEs recalibrated to L0 = k on the held-out text (evaluate.at_k).
    "at_k_normalized_mse": "norm. MSE @k",
    "at_k_explained_variance": "explained var. @k",
    "at_k_ce_loss_score": "CE loss recovered @k",
}


def sae_grid(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> SAE config dict: every variant at every k (``width``), and at ``wide_k`` (``wide_width``)."""
    shapes = [(settings["width"], k) for k in settings["ks"]] + [(settings["wide_width"], settings["wide_k"])]
    grid = {}
    for variant, fields in settings["variants"].items():
        for width, k in shapes:
            integer = fields["architecture"] in INTEGER_K
            grid[f"{variant}-k{k}-w{width}"] = {
                **settings["sae"],
                **fields,
                "d_sae": width,
                "k": int(k) if integer else float(k),
            }
    return grid


def underused(density_by_rank: list[float]) -> int:
    """Latents under-used relative to a Zipf fit of the held-out densities (aux_zipf's definition and defaults)."""
    defaults = AdaptiveAllocationTrainingSAEConfig(d_in=1, d_sae=1, k=1)
    weights, _ = underuse_weights(
        torch.tensor(density_by_rank), defaults.zipf_fit_fraction, defaults.underuse_ratio
    )
    return int((weights > 0).sum())


def run_seed(settings: dict[str, Any], seed: int, output_dir: Path) -> tuple[list[dict[str, Any]], float]:
    """One seed's rows, and its training time in seconds (all SAEs together)."""
    spec = CompareSpec.from_dict(
        {
            "runner": {**settings["runner"], "seed": seed},
            "saes": sae_grid(settings),
            "evaluation": {**settings["evaluation"], "output_dir": str(output_dir)},
        }
    )
    done = run_compare(spec)
    rows = []
    for name, result in done["saes"].items():
        variant, k, width = name.rsplit("-", 2)
        row = {"variant": variant, "k": float(k[1:]), "width": int(width[1:]), "seed": seed}
        if "error" in result:
            raise RuntimeError(f"{name}: {result['error']}")
        row.update({m: result.get(m) for m in METRICS if m in result})
        row["underused_latents"] = underused(result["density_by_rank"])
        row["l0_spread"] = result["l0_p90"] / max(result["l0_median"], 1e-9)
        rows.append(row)
    return rows, done["run"].get("train_seconds", float("nan"))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for key in dict.fromkeys((r["variant"], r["k"], r["width"]) for r in rows):
        mine = [r for r in rows if (r["variant"], r["k"], r["width"]) == key]
        entry: dict[str, Any] = {"variant": key[0], "k": key[1], "width": key[2], "seeds": len(mine)}
        for metric in METRICS:
            values = [float(r[metric]) for r in mine if r.get(metric) is not None]
            entry[metric] = statistics.fmean(values) if values else float("nan")
            entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def measured(summary: list[dict[str, Any]]) -> list[str]:
    """The metrics some row has (runs recorded before the @k columns existed have none of those)."""
    return [m for m in METRICS if any(not math.isnan(s[m]) for s in summary)]


def table(summary: list[dict[str, Any]]) -> str:
    metrics = measured(summary)
    lines = [
        "| variant | width | k | " + " | ".join(METRICS[m] for m in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for s in sorted(summary, key=lambda s: (s["width"], s["k"])):
        spread = s["seeds"] > 1  # one seed has no spread to show
        cells = [f"{s[m]:.3g} ± {s[m + '_sd']:.2g}" if spread else f"{s[m]:.3g}" for m in metrics]
        lines.append(f"| {s['variant']} | {s['width']} | {s['k']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(summary: list[dict[str, Any]], out_dir: Path, name: str) -> list[Path]:
    """Pareto (normalised MSE vs L0, one line per variant at the base width; at equal sparsity, i.e. against
    k, where the run measured it) and dead latents per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = min(s["width"] for s in summary)
    at_k = "at_k_normalized_mse" in measured(summary)
    x, y = ("k", "at_k_normalized_mse") if at_k else ("l0_mean", "normalized_mse")
    pareto, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(s["variant"] for s in summary):
        points = sorted((s[x], s[y]) for s in summary if s["variant"] == variant and s["width"] == width)
        ax.plot(*zip(*points, strict=True), marker="o", label=variant)
    ax.set(
        xlabel="L0 = k (recalibrated on held-out text)" if at_k else "inference L0 (exported SAE)",
        ylabel="normalised MSE",
        title=f"width {width}",
        xscale="log",
        yscale="log",
    )
    ax.legend(fontsize=7)
    dead, bx = plt.subplots(figsize=(7, 4))
    labels = [f"{s['variant']} k{s['k']:g} w{s['width']}" for s in summary]
    bx.bar(
        range(len(summary)),
        [s["dead_latents"] for s in summary],
        yerr=[s["dead_latents_sd"] for s in summary],
    )
    bx.set_xticks(range(len(summary)), labels, rotation=90, fontsize=6)
    bx.set(ylabel="dead latents (held out)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}_pareto.png", out_dir / f"{name}_dead.png"]
    for figure, path in zip((pareto, dead), paths, strict=True):
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
    return paths


def section(done: dict[str, Any]) -> str:
    settings, summary, name = done["settings"], done["summary"], done["name"]
    runner = settings["runner"]
    seeds = sorted({row["seed"] for row in done["rows"]})
    throughput = statistics.fmean(runner["training_tokens"] / s for s in done["train_seconds"].values())
    return (
        f"{runner['model_name']} `{runner['hook_names']}`, {runner['training_tokens']:,} training tokens "
        f"(batches of {runner['train_batch_size_tokens']:,}), lr {runner['lr']}, seeds {seeds}; "
        f"evaluated as exported SAEs on held-out addresses"
        f"{'; mean ± sd over seeds' if len(seeds) > 1 else ''}. "
        f"`python benchmarks/real_activations.py --config configs/benchmarks/{name}.yaml`: "
        f"{done['wall_seconds'] / 60:.0f} min on {done['machine']}. Training throughput "
        f"{throughput:,.0f} tokens/s for all {len(summary)} SAEs and the model together (one runner feeds "
        f"them all; each architecture's own step cost is section 3).\n\n"
        + table(summary)
        + f"\n\n![Pareto](images/{name}_pareto.png)\n\n![dead latents](images/{name}_dead.png)"
    )


def machine(device: str) -> str:
    """The hardware the run used, in words, for the results section."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(torch.device(device))}"
    return f"{torch.get_num_threads()} CPU threads"


def main() -> None:
    args = parse_arguments((__doc__ or "").splitlines()[0], "real_activations")
    if args.render:
        done = json.loads(args.render.read_text())
        print("plots:", *plots(done["summary"], IMAGES, done["name"]))
        write_section(done["name"], section(done))
        return
    settings = load_settings(args.config, args.quick, args.overrides)
    name, out = args.config.stem, args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done: dict[str, Any] = {
        "name": name,
        "machine": machine(settings["runner"]["device"]),
        "settings": settings,
        "rows": [],
        "train_seconds": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in settings["seeds"]:
            rows, done["train_seconds"][seed] = run_seed(settings, seed, Path(tmp) / f"seed{seed}")
            done["rows"] += rows
            done["summary"] = summarise(done["rows"])
            done["wall_seconds"] = time.perf_counter() - started
            out.write_text(json.dumps(done, indent=1))
            print(f"\nseed {seed} done at {done['wall_seconds'] / 60:.1f} min; wrote {out}")
    print(f"\nwall time {done['wall_seconds'] / 60:.1f} min; training per seed {done['train_seconds']}\n")
    print(table(done["summary"]))
    print("plots:", *plots(done["summary"], out.parent if args.quick else IMAGES, name))
    if not args.quick:
        write_section(done["name"], section(done))


if __name__ == "__main__":
    main()
