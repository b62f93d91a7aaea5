"""Mutual Choice's candidate cut on real activations: the estimated cut against per-row shortlists.

``selection.mutual_choice_entries`` takes a cut, sorts every pair at or above it, and keeps the budget's
best. Its cut is estimated from a lattice sample of the scores (``selection.estimated_cut``), with the
bound cut (``selection.candidate_cut``: the budget-th largest of per-row shortlists of ``shares`` even
shares of the budget) when the estimate lets fewer than the budget through. This prints, side by side in
one run, the candidates per budget pair and the selection's time of the estimated cut and of the bound
cut alone with 1, 2, 4 and 8 shares per row, in both layouts (rows = tokens, or latents as Feature Choice
stores its scores), on the activations of the config's model and hook (the demo's: SmolLM2, layer 6)
and on Gaussian inputs of the same median norm. With one share, rows that hold far more than their
share (large-norm tokens, frequent latents) pull the bound cut down and let many pairs through.

    python benchmarks/mc_shortlist.py [--sae PATH] [--tokens 2048] [--k 32] [--reps 5] [--steps 10]

``--sae``: a saved SAE whose encoder scores the inputs (e.g. the demo's results/demo/saes/feature_choice);
by default a freshly initialised one of the config's width. ``--steps N``: then N training steps
(``step_time.py``'s: forward, backward, Adam; aux_zipf) of Mutual and Feature Choice SAEs on the
activations, with the bound cut of one and of four shares and with the estimated cut, interleaved step
by step; the median over steps after the second. The SAEs start from ``--sae``'s weights (on the raw
activations, which its export expects), else new (on the activations scaled to mean norm sqrt(d_in),
as the demo's ``normalize_activations`` does).
"""

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
from step_time import build, step

from sae_mutual_choice.app.cli import demo_config
from sae_mutual_choice.app.compare import CompareSpec, load_any_model
from sae_mutual_choice.app.embedded import embedded_dataset
from sae_mutual_choice.app.evaluate import token_activations
from sae_mutual_choice.app.yaml_config import read_yaml
from sae_mutual_choice.fast import selection

SHARES = [1, 2, 4, 8]
# The cuts compared: the estimated one (the module's), and the bound one alone with N shares per row.
ESTIMATED = "estimated"
CUTS: list[str | int] = [ESTIMATED, *SHARES]
DEFAULT_SAMPLE_WINNERS = selection.CUT_SAMPLE_WINNERS
DEFAULT_SHARES = selection.SHORTLIST_OVER_ROW_SHARE


def encoder(path: Path | None, d_in: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_enc, b_enc)`` of the SAE at ``path``, or of a new mutual_choice training SAE."""
    sae: Any
    if path is not None:
        sae = SAE.load_from_disk(path, device="cpu")
    else:
        sae_class, config_class = get_sae_training_class("mutual_choice")
        sae = sae_class(config_class(**{"d_in": d_in, "d_sae": d_sae, "k": 32.0}))
    return sae.W_enc.detach(), sae.b_enc.detach()


def config_activations(config: Path, n_tokens: int) -> tuple[torch.Tensor, int, CompareSpec]:
    """``n_tokens`` activations ``[n_tokens, d_in]`` of the config's model at its hook, from its
    embedded training text; the width of its SAEs; the parsed config."""
    spec = CompareSpec.from_dict(read_yaml(config, []))
    context = spec.setting("context_size")
    model = load_any_model(spec.setting("model_name"), context, "cpu")
    rows = embedded_dataset(spec.setting("dataset_path"), model, context, "train")["input_ids"]
    n_rows = -(-2 * n_tokens // context)  # enough rows for the tokens left after special ones
    x = token_activations(model, torch.tensor(rows[:n_rows]), spec.hook)[:n_tokens]
    return x, next(iter(spec.saes.values())).d_sae, spec


WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")  # what a training run's SAEs start from


def step_start(x: torch.Tensor, sae_path: Path | None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The inputs and first :data:`WEIGHTS` of training steps on activations ``x``: ``sae_path``'s
    weights on the raw activations (which they expect), else None (new SAEs) on the activations
    scaled to mean norm sqrt(d_in), as the demo's ``normalize_activations`` does."""
    if sae_path is None:
        return x * x.shape[1] ** 0.5 / x.norm(dim=1).mean(), None
    state = SAE.load_from_disk(sae_path, device="cpu").state_dict()
    return x, {name: state[name] for name in WEIGHTS}


def use_cut(cut: str | int) -> None:
    """Make ``selection`` use the estimated cut, or the bound cut alone with ``cut`` shares per row."""
    estimating = cut == ESTIMATED
    selection.CUT_SAMPLE_WINNERS = DEFAULT_SAMPLE_WINNERS if estimating else 1 << 62  # too many: no sample
    selection.SHORTLIST_OVER_ROW_SHARE = DEFAULT_SHARES if estimating else int(cut)


def timed(
    scores: torch.Tensor, rows: torch.Tensor, budget: int, cut: str | int, reps: int
) -> tuple[float, float]:
    """(candidates per budget pair, median seconds) of the selection with ``cut``; ``rows``: the
    contiguous view of ``scores`` that the cuts read."""
    use_cut(cut)
    candidates = selection.mutual_choice_candidates(rows, budget).shape[0] / budget
    seconds = []
    for _ in range(reps + 1):  # the first is a warm-up
        start = time.perf_counter()
        selection.mutual_choice_entries(scores, budget)
        seconds.append(time.perf_counter() - start)
    return candidates, statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description="Mutual Choice's candidate cut on real activations.")
    parser.add_argument("--config", type=Path, default=demo_config())
    parser.add_argument("--sae", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    x, d_sae, spec = config_activations(args.config, args.tokens)
    W_enc, b_enc = encoder(args.sae, x.shape[1], d_sae)
    gaussian = torch.randn_like(x) * x.norm(dim=1).median() / x.shape[1] ** 0.5
    budget = args.k * x.shape[0]
    norms = x.norm(dim=1)
    print(
        f"{x.shape[0]} tokens of {spec.setting('model_name')} at {spec.hook} (norm p99 / median "
        f"{float(norms.quantile(0.99) / norms.median()):.1f}), width {d_sae}, k {args.k}, "
        f"{args.sae or 'a new SAE'}; {torch.get_num_threads()} CPU threads\n"
    )
    print("| inputs | rows | cut | candidates / budget | selection ms |")
    print("|---|---|---|---|---|")
    for name, inputs in (("activations", x), ("Gaussian", gaussian)):
        token_major = inputs @ W_enc + b_enc
        latent_major = W_enc.t() @ inputs.t() + b_enc[:, None]  # [F, B], as Feature Choice stores scores
        for layout, scores, rows in (
            ("tokens", token_major, token_major),
            ("latents", latent_major.t(), latent_major),
        ):
            for cut in CUTS:
                candidates, seconds = timed(scores, rows, budget, cut, args.reps)
                label = cut if cut == ESTIMATED else f"bound, {cut} share{'s' if cut != 1 else ''}"
                print(f"| {name} | {layout} | {label} | {candidates:.2f} | {1e3 * seconds:.1f} |")
    if args.steps:
        print(training_steps(*step_start(x, args.sae), d_sae, args.k, args.steps))


STEP_CUTS: list[str | int] = [1, 4, ESTIMATED]


def training_steps(
    x: torch.Tensor, initial: dict[str, torch.Tensor] | None, d_sae: int, k: int, steps: int
) -> str:
    """A table of median training-step times with each of ``STEP_CUTS`` (see the docstring);
    ``initial``: the SAEs' first :data:`WEIGHTS`, else new ones."""
    torch.manual_seed(0)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    runs = {
        (name, cut): build(name, x.shape[1], d_sae, k)
        for name in ("mutual_choice", "feature_choice")
        for cut in STEP_CUTS
    }
    if initial is not None:
        for sae in runs.values():
            for name in WEIGHTS:
                getattr(sae, name).data.copy_(initial[name])
    optimizers = {key: torch.optim.Adam(sae.parameters(), lr=4e-4) for key, sae in runs.items()}
    seconds: dict[tuple[str, str | int], list[float]] = {key: [] for key in runs}
    for _ in range(steps):
        for (name, cut), sae in runs.items():
            use_cut(cut)
            start = time.perf_counter()
            step(sae, optimizers[(name, cut)], x, dead)
            seconds[(name, cut)].append(time.perf_counter() - start)
    use_cut(ESTIMATED)
    lines = [
        "",
        "| architecture | step ms, bound cut, 1 share | bound cut, 4 shares | estimated cut |",
        "|---|---|---|---|",
    ]
    for name in ("mutual_choice", "feature_choice"):
        medians = (f"{1e3 * statistics.median(seconds[(name, cut)][2:]):.1f}" for cut in STEP_CUTS)
        lines.append(f"| {name} | {' | '.join(medians)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
