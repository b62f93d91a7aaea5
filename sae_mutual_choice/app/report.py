"""Write an evaluation's results: ``results.json``, ``results.md`` (one row per SAE) and PNG plots."""

import json
import math
from pathlib import Path
from typing import Any

TABLE_COLUMNS = [
    ("architecture", "architecture", "{}"),
    ("L0", "l0_mean", "{:.1f}"),
    ("L0 min/med/p90/max", None, ""),
    ("explained var.", "explained_variance", "{:.4f}"),
    ("norm. MSE", "normalized_mse", "{:.4f}"),
    ("CE loss recovered", "ce_loss_score", "{:.4f}"),
    ("dead", "dead_latents", "{}"),
    ("dense", "dense_latents", "{}"),
    ("density Zipf exp.", "density_zipf_exponent", "{:.2f}"),
    # Recalibrated to mean L0 = k on the evaluation text (evaluate.at_k): equal sparsity.
    ("L0 @k", "at_k_l0_mean", "{:.1f}"),
    ("explained var. @k", "at_k_explained_variance", "{:.4f}"),
    ("norm. MSE @k", "at_k_normalized_mse", "{:.4f}"),
    ("CE loss recovered @k", "at_k_ce_loss_score", "{:.4f}"),
]


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per SAE."""
    header = "| SAE | " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |" + " |" * (len(TABLE_COLUMNS) - 1))
            continue
        cells = []
        for _, key, fmt in TABLE_COLUMNS:
            if key is None:
                spread = [row.get(k) for k in ("l0_min", "l0_median", "l0_p90", "l0_max")]
                cells.append("/".join("–" if v is None else f"{v:.0f}" for v in spread))
            else:
                value = row.get(key)
                ok = value is not None and not (isinstance(value, float) and math.isnan(value))
                cells.append(fmt.format(value) if ok else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sources(results: dict[str, dict[str, Any]]) -> str:
    """Where each SAE came from (a directory, or ``release/sae_id`` for ``SAE.from_pretrained``), as a
    list under the table; empty when no row says."""
    lines = [f"- {name}: {row['source']}" for name, row in results.items() if row.get("source")]
    return "\n\nSources:\n" + "\n".join(lines) if lines else ""


def write_results(
    results: dict[str, dict[str, Any]], out_dir: Path, note: str | None = None, measured_on: str | None = None
) -> Path:
    """Write results.json, results.md (``note`` above the table, ``measured_on`` and the sources under it)
    and the plots under ``out_dir``; return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results) + (f"\n\n{measured_on}" if measured_on else "") + sources(results)
    (out_dir / "results.md").write_text((f"{note}\n\n" if note else "") + table + "\n")
    _plots({name: row for name, row in results.items() if "error" not in row}, out_dir)
    return out_dir / "results.md"


def _plots(results: dict[str, dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    figures = {
        "l0_histogram.png": l0_histogram_figure(results),
        "density_rank.png": density_rank_figure(results),
        "mse_vs_l0.png": mse_vs_l0_figure(results),
    }
    for file_name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(out_dir / file_name, dpi=120)
        plt.close(fig)


def l0_histogram_figure(results: dict[str, dict[str, Any]]) -> Any:
    """Share of held-out tokens by per-token L0, one line per SAE, over the whole range of the data."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in results.items():
        counts = np.asarray(row["l0_histogram"], dtype=float)
        ax.step(np.arange(len(counts)), counts / counts.sum(), where="mid", label=name)
    # The whole range the data spans; a log-like axis keeps the bulk readable beside long tails.
    ax.set_xlim(0, max(row["l0_max"] for row in results.values()) + 1)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("log")
    ax.set(
        xlabel="latents firing per token (L0; linear to 10, log above)",
        ylabel="share of tokens (log)",
        title="Per-token L0, held-out",
    )
    ax.legend()
    return fig


def density_rank_figure(results: dict[str, dict[str, Any]]) -> Any:
    """Latent firing density by rank, log-log, with each SAE's Zipf fit (where it is a density, <= 1)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in results.items():
        density = np.asarray(row["density_by_rank"], dtype=float)
        ranks = np.arange(1, len(density) + 1)
        (line,) = ax.loglog(ranks[density > 0], density[density > 0], label=name)
        if row.get("density_zipf_log_scale") is not None:
            exponent = row["density_zipf_exponent"]
            fit = np.exp(row["density_zipf_log_scale"]) * ranks**-exponent
            shown = fit <= 1  # a density never exceeds 1
            label = f"{name}: Zipf fit, exponent {exponent:.2f}"
            ax.loglog(ranks[shown], fit[shown], "--", color=line.get_color(), alpha=0.6, label=label)
    ax.set(xlabel="latent rank", ylabel="firing density", title="Density vs rank (Zipf fit to the head)")
    ax.legend()
    return fig


def mse_vs_l0_figure(results: dict[str, dict[str, Any]]) -> Any:
    """Left: normalised MSE against L0 as exported (log L0, each point named, so an export far from k
    does not squeeze the others). Right: normalised MSE at equal sparsity (the "@k" rows), one bar
    per SAE, so SAEs recalibrated to the same L0 do not hide one another."""
    import matplotlib.pyplot as plt

    fig, (exported, at_k) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, row) in enumerate(results.items()):
        color = f"C{index % 10}"
        exported.scatter(row["l0_mean"], row["normalized_mse"], color=color)
        exported.annotate(
            name,
            (row["l0_mean"], row["normalized_mse"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    exported.set(
        xscale="log", xlabel="L0 (held-out, per token; log)", ylabel="normalised MSE", title="As exported"
    )
    equal = [(name, row) for name, row in results.items() if row.get("at_k_l0_mean") is not None]
    for index, (name, row) in enumerate(equal):
        at_k.barh(index, row["at_k_normalized_mse"], color=f"C{list(results).index(name) % 10}")
        at_k.text(
            row["at_k_normalized_mse"], index, f" L0 {row['at_k_l0_mean']:.1f}", va="center", fontsize=8
        )
    at_k.set_yticks(range(len(equal)), [name for name, _ in equal])
    at_k.invert_yaxis()
    at_k.set(xlabel="normalised MSE", title="At equal L0 (@k: recalibrated on this text)")
    fig.tight_layout()
    return fig
