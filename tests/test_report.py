"""The evaluation's plots show what the results hold."""

from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from sae_mutual_choice.app.report import density_rank_figure, l0_histogram_figure, mse_vs_l0_figure


def _row(l0_max: int, log_scale: float, l0: float, mse: float) -> dict:
    histogram = [0] * (l0_max + 1)
    histogram[30], histogram[l0_max] = 99, 1
    density = (0.9 * np.arange(1, 101, dtype=float) ** -0.7).tolist()
    return {
        "l0_histogram": histogram,
        "l0_max": l0_max,
        "density_by_rank": density,
        "density_zipf_exponent": 1.2,
        "density_zipf_log_scale": log_scale,  # e^1 = 2.7 at rank 1: the fit's head is no density
        "l0_mean": l0,
        "normalized_mse": mse,
    }


@pytest.fixture
def results() -> Iterator[dict]:
    yield {"mutual_choice": _row(980, 1.0, 32.2, 0.3), "feature_choice": _row(400, 0.0, 32.2, 0.3)}
    plt.close("all")


def test_l0_histogram_spans_the_data(results):
    (ax,) = l0_histogram_figure(results).axes
    assert ax.get_xlim()[1] >= 980  # the longest tail is in view, not clipped at a multiple of p90


def test_zipf_fits_stay_densities_and_are_named(results):
    (ax,) = density_rank_figure(results).axes
    fits = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(fits) == 2 and all(float(np.max(line.get_ydata())) <= 1 for line in fits)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "mutual_choice: Zipf fit, exponent 1.20" in labels


def test_saes_at_one_point_stay_named_and_equal_l0_rows_do_not_overlap(results):
    results["mutual_choice"].update(at_k_l0_mean=32.0, at_k_normalized_mse=0.3)
    results["feature_choice"].update(at_k_l0_mean=32.0, at_k_normalized_mse=0.3)
    results["batchtopk"] = {**_row(400, 0.0, 122.4, 0.6), "at_k_l0_mean": 32.0, "at_k_normalized_mse": 0.26}

    exported, at_k = mse_vs_l0_figure(results).axes

    assert exported.get_xscale() == "log"  # an export at 4 x k does not squeeze the others
    assert {text.get_text() for text in exported.texts} == set(results)  # both SAEs at one point are named
    bars = at_k.patches
    assert len(bars) == 3 and len({bar.get_y() for bar in bars}) == 3  # one bar each, none hidden
    assert [label.get_text() for label in at_k.get_yticklabels()] == list(results)
