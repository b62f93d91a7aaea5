"""Ground truth: each architecture against SAELens's on synthetic data with known features.

SAELens's ``SyntheticSAERunner`` trains every variant of ``configs/benchmarks/synthetic.yaml`` on samples of
one synthetic model (Zipfian firing probabilities, as in SynthSAEBench), for each seed. Every exported
(inference) SAE is then evaluated with SAELens's ``eval_sae_on_synthetic_data`` on fresh samples: MCC of
decoder directions to the true features, mean F1 of latents as feature detectors, explained variance,
dead latents, L0; plus how per-sample L0 tracks the true number of active features (Pearson r).

    python benchmarks/synthetic.py [--quick] [--config configs/benchmarks/synthetic.yaml] [--out FILE.json]
    python benchmarks/synthetic.py --render docs/results/synthetic.json   # docs/results.md from the JSON
    python benchmarks/synthetic.py --combine A.json B.json --out C.json   # one table from several runs

Prints one row per variant (mean ± sd over seeds), writes every run's figures as JSON and, for the full
run, its table into docs/results.md (section "synthetic").
"""

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import load_settings, parse_arguments, write_section
from sae_lens import SAE, LoggingConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.synthetic.evals import eval_sae_on_synthetic_data
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig

import sae_mutual_choice  # noqa: F401  (registers the architectures)
from sae_mutual_choice.app.evaluate import at_k

ROOT = Path(__file__).parent.parent
INTEGER_K = ("topk", "token_choice")
METRICS = ["mcc", "f1", "explained_variance", "dead_latents", "l0", "l0_tracks_true_r", "samples_per_second"]
# At equal sparsity: adaptive SAEs recalibrated to L0 = k on the evaluation samples (evaluate.at_k).
AT_K_METRICS = ["mcc_at_k", "f1_at_k", "explained_variance_at_k"]
# Where the variance goes (SAELens's figures and one of ours): latents tracking distinct true features,
# output/input norm, latents as detectors, and how many latents share their best-matching feature.
DIAGNOSTIC_METRICS = [
    "uniqueness",
    "shrinkage",
    "precision",
    "recall",
    "shared_best_match",
    "live_uniqueness",
    "recovered_features",
    "recovering_latents",
]
# A latent recovers a true feature when their directions' |cosine| is at least this; latents below it for
# every feature are unlearned (a random direction's best |cosine| to 1,024 features in 128 dimensions is
# about 0.35).
RECOVERED_COSINE = 0.9
# Feature Choice only: latents whose capacity sat at the floor (min_capacity_ratio of the uniform share)
# at the end of training, those of them the export never fires on the evaluation samples, and latents
# whose training score is positive on no evaluation sample (only positive scores fire).
FLOOR_METRICS = ["floor_latents", "floor_latents_dead", "never_positive_latents"]


def sae_config(settings: dict[str, Any], variant: dict[str, Any]) -> Any:
    fields = dict(variant)
    architecture = fields.pop("architecture")
    fields.pop("lr", None)  # the runner's, not the SAE's
    if "matryoshka_fractions" in fields:  # level widths as shares of d_sae, so quick sizes work too
        fields["matryoshka_widths"] = [
            round(f * settings["d_sae"]) for f in fields.pop("matryoshka_fractions")
        ]
    config_class: Any = get_sae_training_class(architecture)[1]
    k = settings["k"]
    return config_class(
        d_in=settings["hidden_dim"],
        d_sae=settings["d_sae"],
        k=int(k) if architecture in INTEGER_K else float(k),
        **fields,
    )


@torch.no_grad()
def l0_tracking(sae: Any, model: SyntheticModel, n_samples: int) -> float:
    """Pearson r between each sample's L0 and its true number of active features (NaN if either is constant)."""
    hidden, features = model.sample_with_features(n_samples)
    l0 = (sae.encode(hidden) > 0).sum(-1).float()
    true = (features > 0).sum(-1).float()
    if float(l0.std()) == 0 or float(true.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([l0, true]))[0, 1])


def best_matches(decoder: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Each latent's best-matching true feature, by |cosine| of directions. ``[L, d], [N, d] -> [L]``."""
    cosine = (
        torch.nn.functional.normalize(decoder, dim=-1) @ torch.nn.functional.normalize(features, dim=-1).t()
    )
    return cosine.abs().argmax(dim=1)


@torch.no_grad()
def shared_best_match(decoder: torch.Tensor, features: torch.Tensor) -> int:
    """How many latents have a best-matching true feature (|cosine| of directions) that another latent also has."""
    best = best_matches(decoder, features)
    return int((torch.bincount(best, minlength=features.shape[0])[best] > 1).sum())


@torch.no_grad()
def recovery(decoder: torch.Tensor, features: torch.Tensor) -> dict[str, int]:
    """True features that some latent recovers (|cosine| >= :data:`RECOVERED_COSINE`) and the latents that
    recover one; their difference counts real duplicates, where SAELens's uniqueness also counts the
    best matches of unlearned latents."""
    cosine = (
        torch.nn.functional.normalize(decoder, dim=-1) @ torch.nn.functional.normalize(features, dim=-1).t()
    ).abs()
    recovered = cosine >= RECOVERED_COSINE
    return {
        "recovered_features": int(recovered.any(0).sum()),
        "recovering_latents": int(recovered.any(1).sum()),
    }


@torch.no_grad()
def live_uniqueness(sae: Any, model: SyntheticModel, n_samples: int) -> float:
    """SAELens's uniqueness over the latents that fire on ``n_samples`` fresh samples only: dead latents keep
    their random initial directions, which can best-match features no other latent has, so counting
    them (as SAELens's figure does) can raise the uniqueness of an SAE with many dead latents."""
    hidden, _ = model.sample_with_features(n_samples)
    live = (sae.encode(hidden) > 0).any(0)
    if not bool(live.any()):
        return float("nan")
    best = best_matches(sae.W_dec[live], model.feature_dict.feature_vectors)
    return best.unique().numel() / int(live.sum())


@torch.no_grad()
def floor_statistics(
    trained: Any, exported: Any, model: SyntheticModel, n_samples: int, batch_size: int
) -> dict[str, int]:
    """:data:`FLOOR_METRICS` of a Feature Choice run (nothing for other architectures): capacities for a
    training batch of ``batch_size``, firing and scores on ``n_samples`` fresh samples."""
    if not hasattr(trained, "capacities"):
        return {}
    capacities = trained.capacities(batch_size)
    floor = trained.cfg.min_capacity_ratio * float(capacities.sum()) / trained.cfg.d_sae
    at_floor = capacities <= floor * 1.01
    hidden, _ = model.sample_with_features(n_samples)
    fired = (exported.encode(hidden) > 0).any(0).to(at_floor.device)
    positive = (trained.encode_with_hidden_pre(hidden)[1] > 0).any(0).to(at_floor.device)
    return {
        "floor_latents": int(at_floor.sum()),
        "floor_latents_dead": int((at_floor & ~fired).sum()),
        "never_positive_latents": int((~positive).sum()),
    }


def run_one(
    settings: dict[str, Any], model: SyntheticModel, name: str, seed: int, tmp: Path
) -> dict[str, Any]:
    variant = settings["variants"][name]
    out = tmp / f"{name.replace(' ', '_')}-{seed}"
    torch.manual_seed(seed)  # SAE initialisation and the training samples
    runner = SyntheticSAERunner(
        SyntheticSAERunnerConfig(
            synthetic_model=model.cfg,
            sae=sae_config(settings, variant),
            training_samples=settings["training_samples"],
            batch_size=settings["batch_size"],
            lr=variant.get("lr", settings["lr"]),
            output_path=str(out),
            checkpoint_path=None,
            eval_samples=0,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        override_synthetic_model=model,
    )
    start = time.perf_counter()
    trained = runner.run().sae
    seconds = time.perf_counter() - start
    sae = SAE.load_from_disk(out)  # the exported inference SAE, as a user would load it

    def evaluate(evaluated: Any) -> Any:
        torch.manual_seed(10_000 + seed)  # the same evaluation samples for both
        return eval_sae_on_synthetic_data(
            evaluated,
            model.feature_dict,
            model.activation_generator,
            num_samples=settings["eval_samples"],
            batch_size=4096,
        )

    result = evaluate(sae)
    at_k_result = result
    if hasattr(sae, "threshold"):
        torch.manual_seed(10_000 + seed)  # the very samples evaluate() draws, batch by batch
        n, batch = settings["eval_samples"], 4096
        samples = [model.activation_generator.sample(min(batch, n - i)) for i in range(0, n, batch)]
        hidden = torch.cat([model.feature_dict(features) for features in samples])
        at_k_result = evaluate(at_k(sae, hidden, float(settings["k"])))
    return {
        "variant": name,
        "architecture": variant["architecture"],
        "aux_loss": getattr(trained.cfg, "aux_loss", "aux_k"),  # SAELens's TopK / BatchTopK: AuxK
        "lr": variant.get("lr", settings["lr"]),
        "seed": seed,
        "mcc": result.mcc,
        "f1": result.classification.f1_score,
        "explained_variance": result.explained_variance,
        "dead_latents": result.dead_latents,
        "l0": result.sae_l0,
        "true_l0": result.true_l0,
        "l0_tracks_true_r": l0_tracking(sae, model, min(settings["eval_samples"], 20_000)),
        "train_seconds": seconds,
        "samples_per_second": settings["training_samples"] / seconds,
        "uniqueness": result.uniqueness,
        "shrinkage": result.shrinkage,
        "precision": result.classification.precision,
        "recall": result.classification.recall,
        "shared_best_match": shared_best_match(sae.W_dec, model.feature_dict.feature_vectors),
        "live_uniqueness": live_uniqueness(sae, model, min(settings["eval_samples"], 20_000)),
        **recovery(sae.W_dec, model.feature_dict.feature_vectors),
        "mcc_at_k": at_k_result.mcc,
        "f1_at_k": at_k_result.classification.f1_score,
        "explained_variance_at_k": at_k_result.explained_variance,
        **floor_statistics(
            trained, sae, model, min(settings["eval_samples"], 20_000), settings["batch_size"]
        ),
    }


def expand_lr_sweep(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings whose ``lr_sweep: {lrs: [...], variants: [...]}`` became one variant per (variant, lr),
    named ``"NAME, lr LR"``, in place of each swept variant."""
    sweep = settings.get("lr_sweep")
    if not sweep:
        return settings
    unknown = set(sweep["variants"]) - set(settings["variants"])
    if unknown:
        raise ValueError(f"lr_sweep.variants: {sorted(unknown)} are not in variants")
    variants: dict[str, Any] = {}
    for name, variant in settings["variants"].items():
        if name in sweep["variants"]:
            variants.update({f"{name}, lr {lr:g}": {**variant, "lr": lr} for lr in sweep["lrs"]})
        else:
            variants[name] = variant
    return {**settings, "variants": variants}


def best_of_sweep(settings: dict[str, Any], summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per swept variant, the learning rate with the highest mean explained variance; the others as run."""
    swept = set((settings.get("lr_sweep") or {}).get("variants", []))

    def group(entry: dict[str, Any]) -> str | None:
        name = family(entry)
        return name if name in swept and name != entry["variant"] else None

    best = []
    for entry in summary:
        mine = group(entry)
        rivals = [s for s in summary if group(s) == mine] if mine else []
        if not rivals or entry is max(rivals, key=lambda s: s["explained_variance"]):
            best.append(entry)
    return best


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds, per variant, in the order of first appearance."""
    summary = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {"variant": name, "seeds": len(mine)}
        optional = [m for m in DIAGNOSTIC_METRICS + AT_K_METRICS + FLOOR_METRICS if all(m in r for r in mine)]
        for metric in METRICS + optional:
            values = torch.tensor([float(r[metric]) for r in mine], dtype=torch.float64)
            entry[metric] = float(values.mean())  # NaN if a run's figure is undefined (constant L0)
            entry[f"{metric}_sd"] = float(values.std()) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def table(summary: list[dict[str, Any]]) -> str:
    at_k = [m for m in AT_K_METRICS if all(m in s for s in summary)]  # runs before @k have none
    header = "| variant | MCC | F1 | explained var. | dead | L0 | r(L0, true L0) | samples/s |"
    header += "".join(f" {title} @k |" for title in ("MCC", "F1", "explained var.")[: len(at_k)])
    diagnostic = [m for m in DIAGNOSTIC_METRICS if all(m in s for s in summary)]  # runs before: none
    titles = {
        "uniqueness": "unique",
        "shrinkage": "shrinkage",
        "precision": "precision",
        "recall": "recall",
        "shared_best_match": "sharing best match",
        "live_uniqueness": "unique (live)",
        "recovered_features": f"features recovered (cos ≥ {RECOVERED_COSINE})",
        "recovering_latents": "latents recovering one",
    }
    header += "".join(f" {titles[m]} |" for m in diagnostic)
    lines = [header, "|---|---|---|---|---|---|---|---|" + "---|" * (len(at_k) + len(diagnostic))]
    for s in summary:
        cells = [f"{s[m]:.3f} ± {s[m + '_sd']:.3f}" for m in ("mcc", "f1", "explained_variance")] + [
            f"{s['dead_latents']:.1f} ± {s['dead_latents_sd']:.1f}",
            f"{s['l0']:.2f} ± {s['l0_sd']:.2f}",
            "—" if s["l0_tracks_true_r"] != s["l0_tracks_true_r"] else f"{s['l0_tracks_true_r']:.2f}",
            f"{s['samples_per_second']:.0f}",
        ]
        cells += [f"{s[m]:.3f} ± {s[m + '_sd']:.3f}" for m in at_k]
        cells += [
            f"{s[m]:.0f} ± {s[m + '_sd']:.0f}"
            if m in ("shared_best_match", "recovered_features", "recovering_latents")
            else f"{s[m]:.3f} ± {s[m + '_sd']:.3f}"
            for m in diagnostic
        ]
        lines.append(f"| {s['variant']} | " + " | ".join(cells) + " |")
    floors = [s for s in summary if all(m in s for m in FLOOR_METRICS)]
    if floors:
        lines += [
            "",
            "| Feature Choice variant | latents at the capacity floor | of them never firing | never a positive score |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s['variant']} | "
            + " | ".join(f"{s[m]:.1f} ± {s[m + '_sd']:.1f}" for m in FLOOR_METRICS)
            + " |"
            for s in floors
        ]
    return "\n".join(lines)


def family(row: dict[str, Any]) -> str:
    """The variant a row belongs to, without the learning rate a sweep added to its name."""
    return str(row["variant"] if "variant" in row else row["architecture"]).split(", lr ")[0]


def promises(rows: list[dict[str, Any]], d_sae: int) -> str:
    """Issue 26's checks per learning rate, on means over seeds (dead latents: the worst seed): Feature
    Choice's exported SAE against TopK's (dead <= 1 % of latents, uniqueness >= TopK's, MCC >= TopK's,
    explained variance at least TopK's - 0.01), and Mutual Choice's dead latents against BatchTopK's.
    Rows of several Feature Choice or TopK variants give one table per pair, never a mean across them."""
    pairs = [
        (fc, topk)
        for fc in dict.fromkeys(family(r) for r in rows if r["architecture"] == "feature_choice")
        for topk in dict.fromkeys(family(r) for r in rows if r["architecture"] == "topk")
    ]
    if len(pairs) <= 1:
        return _promises(rows, d_sae)
    tables = []
    for fc, topk in pairs:
        mine = [
            r for r in rows if r["architecture"] not in ("feature_choice", "topk") or family(r) in (fc, topk)
        ]
        tables.append(f"{fc} against {topk}:\n\n{_promises(mine, d_sae)}")
    return "\n\n".join(tables)


def _promises(rows: list[dict[str, Any]], d_sae: int) -> str:
    """:func:`promises` for rows of one Feature Choice and one TopK variant."""

    def runs(architecture: str, lr: float, aux_loss: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in rows
            if r["architecture"] == architecture
            and r.get("lr") == lr
            and (aux_loss is None or r.get("aux_loss") == aux_loss)
        ]

    def mean(mine: list[dict[str, Any]], metric: str) -> float:
        return statistics.fmean(float(r[metric]) for r in mine)

    lines = [
        "| lr | FC dead (worst seed, % of latents) | unique FC / TopK | unique live FC / TopK "
        "| features recovered FC / TopK | MCC FC / TopK | EV FC − TopK | FC holds "
        "| dead BatchTopK / MC aux_k / MC aux_zipf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lr in sorted({r["lr"] for r in rows if "lr" in r}):
        fc, topk = runs("feature_choice", lr), runs("topk", lr)
        mc = [
            runs("batchtopk", lr),
            runs("mutual_choice", lr, "aux_k"),
            runs("mutual_choice", lr, "aux_zipf"),
        ]
        dead_mc = " / ".join(f"{mean(m, 'dead_latents'):.0f}" if m else "—" for m in mc)
        if not (fc and topk):
            lines.append(f"| {lr:g} | — | — | — | — | — | — | — | {dead_mc} |")
            continue
        worst_dead = 100 * max(r["dead_latents"] for r in fc) / d_sae
        ev_gap = mean(fc, "explained_variance") - mean(topk, "explained_variance")
        checks = {
            "dead": worst_dead <= 1,
            "uniqueness": mean(fc, "uniqueness") >= mean(topk, "uniqueness"),
            "MCC": mean(fc, "mcc") >= mean(topk, "mcc"),
            "EV": ev_gap >= -0.01,
        }
        failed = [name for name, held in checks.items() if not held]
        recovered = (  # runs before the figure have none
            f"{mean(fc, 'recovered_features'):.0f} / {mean(topk, 'recovered_features'):.0f}"
            if all("recovered_features" in r for r in fc + topk)
            else "—"
        )
        lines.append(
            f"| {lr:g} | {worst_dead:.1f} | {mean(fc, 'uniqueness'):.3f} / {mean(topk, 'uniqueness'):.3f} | "
            f"{mean(fc, 'live_uniqueness'):.3f} / {mean(topk, 'live_uniqueness'):.3f} | {recovered} | "
            f"{mean(fc, 'mcc'):.3f} / {mean(topk, 'mcc'):.3f} | {ev_gap:+.3f} | "
            f"{'yes' if not failed else 'no: ' + ', '.join(failed)} | {dead_mc} |"
        )
    return "\n".join(lines)


def combine(paths: list[Path], out: Path) -> None:
    """Print one table (and the best of each learning-rate sweep) from the rows of several runs' JSON
    files, for example a sweep on one seed and the chosen rates on more, and write them to ``out``."""
    runs = [json.loads(path.read_text()) for path in paths]
    rows = [row for run in runs for row in run["rows"]]
    sweep_variants = [v for run in runs for v in (run["settings"].get("lr_sweep") or {}).get("variants", [])]
    sweep = {"lr_sweep": {"variants": list(dict.fromkeys(sweep_variants))}} if sweep_variants else {}
    summary = summarise(rows)
    print(table(summary))
    if sweep:
        print("\nbest learning rate of each swept variant (highest mean explained variance):\n")
        print(table(best_of_sweep(sweep, summary)))
    widths = {run.get("settings", {}).get("d_sae") for run in runs}
    if len(widths) == 1 and None not in widths:  # one setting: the checks compare like with like
        print(f"\nissue 26's checks per learning rate:\n\n{promises(rows, widths.pop())}")
    wall = sum(run["wall_seconds"] for run in runs)
    payload = {"combined": [str(p) for p in paths], "rows": rows, "wall_seconds": wall, "summary": summary}
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out} ({wall / 60:.0f} min of runs)")


def main() -> None:
    args = parse_arguments((__doc__ or "").splitlines()[0], "synthetic", combine=True)
    if args.combine:
        combine(args.combine, args.out)
        return
    if args.render:
        done = json.loads(args.render.read_text())
        write_section(
            "synthetic",
            section(done["settings"], summarise(done["rows"]), done["rows"], done["wall_seconds"]),
        )
        return
    settings = expand_lr_sweep(load_settings(args.config, args.quick, args.overrides))
    out = args.out
    started = time.perf_counter()
    model = SyntheticModel(
        SyntheticModelConfig(
            num_features=settings["num_features"],
            hidden_dim=settings["hidden_dim"],
            firing_probability=ZipfianFiringProbabilityConfig(**settings["firing"]),
            seed=settings["model_seed"],
        )
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in settings["seeds"]:
            for name in settings["variants"]:
                rows.append(run_one(settings, model, name, seed, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    wall = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "rows": rows, "wall_seconds": wall, "torch": torch.__version__}
    out.write_text(json.dumps(payload, indent=1))  # the runs first: nothing measured is lost below
    summary = summarise(rows)
    print(
        f"\ntrue mean L0 {statistics.fmean(r['true_l0'] for r in rows):.2f}; wall time {wall / 60:.1f} min\n"
    )
    print(table(summary))
    if settings.get("lr_sweep"):
        print("\nbest learning rate of each swept variant (highest mean explained variance):\n")
        print(table(best_of_sweep(settings, summary)))
    print(f"\nissue 26's checks per learning rate:\n\n{promises(rows, settings['d_sae'])}")
    out.write_text(json.dumps({**payload, "summary": summary}, indent=1))
    print(f"\nwrote {out}")
    if not args.quick and args.config.stem == "synthetic":  # the section is the default config's
        write_section("synthetic", section(settings, summary, rows, wall))


def section(
    settings: dict[str, Any], summary: list[dict[str, Any]], rows: list[dict[str, Any]], wall: float
) -> str:
    """The generated part of docs/results.md for this benchmark."""
    true_l0 = statistics.fmean(r["true_l0"] for r in rows)
    return (
        f"{settings['num_features']} true features in {settings['hidden_dim']} dimensions (SAELens synthetic "
        f"model, Zipfian firing {settings['firing']}, true mean L0 {true_l0:.2f}); SAEs of width "
        f"{settings['d_sae']}, k = {settings['k']}, {settings['training_samples']:,} training samples in batches "
        f"of {settings['batch_size']}, lr {settings['lr']}; seeds {settings['seeds']}; evaluated on "
        f"{settings['eval_samples']:,} fresh samples as exported SAEs. Mean ± sd over seeds. "
        f"`python benchmarks/synthetic.py`: {wall / 60:.0f} min on 2 CPU cores, torch {torch.__version__}.\n\n"
        + table(summary)
    )


if __name__ == "__main__":
    main()
