"""Tests of the Section 3 simulation (`competesmoe theory`): density, Voronoi loss, MLE, slopes, CLI."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from competesmoe.config import ConfigError
from competesmoe.theory import cli as theory_cli
from competesmoe.theory import fit as fit_fns
from competesmoe.theory.config import TheoryConfig
from competesmoe.theory.fit import compositions, fit_mle
from competesmoe.theory.model import Atoms, expert_mean, log_density, sample_x, sample_y
from competesmoe.theory.study import fit_slope, ols_slope, theory_slope
from competesmoe.theory.truth import default_truth
from competesmoe.theory.voronoi import voronoi_cells, voronoi_loss

F64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def _random_atoms(setting, gating, n_atoms, dim, seed):
    g = torch.Generator().manual_seed(seed)
    p = dim + 1 if setting == "linear" else dim + 2
    gate = torch.randn(n_atoms, dim, generator=g, dtype=F64) if gating == "softmax" else None
    return Atoms(torch.randn(n_atoms, generator=g, dtype=F64), torch.randn(n_atoms, p, generator=g, dtype=F64),
                 0.05 + torch.rand(n_atoms, generator=g, dtype=F64), gate)


# ------------------------------------------------------------------------------------------------
# Naive reference: one sample, one expert at a time, with math only.
# ------------------------------------------------------------------------------------------------
def _naive_mean(setting, x, w):
    d = len(x)
    if setting == "linear":
        return sum(w[k] * x[k] for k in range(d)) + w[d]
    u = sum(w[1 + k] * x[k] for k in range(d)) + w[d + 1]
    return w[0] * math.log1p(math.exp(u))


def _naive_density(setting, gating, atoms, x, y):
    n_atoms = len(atoms.logw)
    means = [_naive_mean(setting, x, atoms.expert[i].tolist()) for i in range(n_atoms)]
    if gating == "competition":  # Eq. (6): exp(log(1 + exp(g))) = 1 + exp(g), times exp(c_i)
        scores = [math.exp(atoms.logw[i]) * (1 + math.exp(means[i])) for i in range(n_atoms)]
    else:
        scores = [math.exp(atoms.logw[i] + sum(atoms.gate[i, k] * x[k] for k in range(len(x))))
                  for i in range(n_atoms)]
    total = sum(scores)
    dens = 0.0
    for i in range(n_atoms):
        v = float(atoms.var[i])
        dens += scores[i] / total * math.exp(-(y - means[i]) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
    return dens


@pytest.mark.parametrize("setting", ["linear", "ffn"])
@pytest.mark.parametrize("gating", ["competition", "softmax"])
def test_log_density_matches_naive(setting, gating):
    atoms = _random_atoms(setting, gating, 3, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    x = sample_x(5, 2, g)
    y = torch.randn(5, generator=g, dtype=F64)
    got = log_density(setting, gating, atoms, x, y).exp()
    want = [_naive_density(setting, gating, atoms, x[k].tolist(), float(y[k])) for k in range(5)]
    assert got.tolist() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("setting", ["linear", "ffn"])
@pytest.mark.parametrize("gating", ["competition", "softmax"])
def test_density_integrates_to_one(setting, gating):
    atoms = _random_atoms(setting, gating, 3, 1, seed=3)
    y = torch.linspace(-40, 40, 80001, dtype=F64)
    for x0 in (-0.9, 0.0, 0.7):
        x = torch.full((len(y), 1), x0, dtype=F64)
        p = log_density(setting, gating, atoms, x, y).exp()
        assert float(torch.trapezoid(p, y)) == pytest.approx(1.0, abs=1e-8)


def test_canonical_form_keeps_the_density():
    atoms = _random_atoms("linear", "softmax", 3, 2, seed=4)
    can = atoms.canonical()
    assert float(can.logw.exp().sum()) == pytest.approx(1.0)
    assert (can.logw.exp()[:, None] * can.gate).sum(0).abs().max() < 1e-12
    x = sample_x(50, 2, torch.Generator().manual_seed(0))
    y = torch.randn(50, dtype=F64)
    torch.testing.assert_close(log_density("linear", "softmax", atoms, x, y),
                               log_density("linear", "softmax", can, x, y))


def test_sampling_matches_the_conditional_mean():
    truth = default_truth("ffn", "competition", 2)
    g = torch.Generator().manual_seed(5)
    x = torch.full((40000, 1), 0.3, dtype=F64)
    y = sample_y("ffn", "competition", truth, x, g)
    means = [_naive_mean("ffn", [0.3], truth.expert[i].tolist()) for i in range(2)]
    gate = [math.exp(truth.logw[i]) * (1 + math.exp(means[i])) for i in range(2)]
    want = sum(gt * m for gt, m in zip(gate, means)) / sum(gate)
    assert float(y.mean()) == pytest.approx(want, abs=4 * float(y.std()) / math.sqrt(len(y)))


# ------------------------------------------------------------------------------------------------
# Voronoi cells and loss, Eq. (8), (9), (17)
# ------------------------------------------------------------------------------------------------
def test_voronoi_loss_linear_by_hand():
    # Truth: θ*_1 = (a=1, b=0, ν=1), θ*_2 = (a=-1, b=2, ν=0.5), weights 1/2 each.
    truth = Atoms(_t([0.5, 0.5]).log(), _t([[1.0, 0.0], [-1.0, 2.0]]), _t([1.0, 0.5]))
    # Fit: two atoms near θ*_1 (weights .3, .3), one near θ*_2 (weight .4).
    fit = Atoms(_t([0.3, 0.3, 0.4]).log(), _t([[1.1, 0.0], [0.9, 0.1], [-1.0, 2.2]]), _t([1.0, 1.2, 0.5]))
    v = voronoi_loss("linear", fit, truth)
    assert v.cells == [[0, 1], [2]]
    assert v.weight_term == pytest.approx(abs(0.6 - 0.5) + abs(0.4 - 0.5))              # 0.2
    assert v.exact_term == pytest.approx(0.4 * (0.0 + 0.2 + 0.0))                        # Eq. (17), first powers
    assert v.over_term == pytest.approx(0.3 * 0.1 ** 2 + 0.3 * (0.1 ** 2 + 0.1 ** 2 + 0.2 ** 2))  # squares
    assert v.loss == pytest.approx(0.2 + 0.08 + 0.021)
    assert v.over_error == pytest.approx(math.sqrt(0.021))
    assert v.over_blocks == pytest.approx({"a": 0.3 * 0.01 + 0.3 * 0.01, "b": 0.3 * 0.01, "ν": 0.3 * 0.04})
    assert v.over_min_share == pytest.approx(0.5)
    # The gate is unchanged by a common shift of the c_i, and so is the loss.
    shifted = Atoms(fit.logw + 3.0, fit.expert, fit.var)
    assert voronoi_loss("linear", shifted, truth).loss == pytest.approx(v.loss)


def test_voronoi_loss_ffn_uses_the_norm_of_the_whole_expert():
    # Eq. (9): ‖ΔW‖ over W = (w2, w1, b), not a sum over its entries.
    truth = Atoms(_t([0.5, 0.5]).log(), _t([[2.0, 1.0, 0.0], [-2.0, -1.0, 1.0]]), _t([0.1, 0.2]))
    fit = Atoms(_t([0.5, 0.25, 0.25]).log(), _t([[2.3, 1.4, 0.0], [-2.0, -1.0, 1.3], [-2.0, -1.4, 1.0]]),
                _t([0.1, 0.2, 0.3]))
    v = voronoi_loss("ffn", fit, truth)
    assert v.cells == [[0], [1, 2]]
    assert v.weight_term == pytest.approx(0.0)
    assert v.exact_term == pytest.approx(0.5 * (0.5 + 0.0))
    assert v.over_term == pytest.approx(0.25 * (0.3 ** 2 + 0.0) + 0.25 * (0.4 ** 2 + 0.1 ** 2))


def test_empty_cell_counts_its_true_weight():
    truth = Atoms(_t([0.5, 0.5]).log(), _t([[1.0, 0.0], [-1.0, 2.0]]), _t([1.0, 0.5]))
    fit = Atoms(_t([0.5, 0.5]).log(), _t([[1.0, 0.0], [1.0, 0.0]]), _t([1.0, 1.0]))
    v = voronoi_loss("linear", fit, truth)
    assert v.cells == [[0, 1], []]
    assert v.weight_term == pytest.approx(0.5 + 0.5)
    assert math.isnan(v.exact_error) and v.over_error == pytest.approx(0.0)
    fit3 = Atoms(_t([0.1, 0.3, 0.6]).log(), _t([[1.0, 0.0], [1.0, 0.1], [-1.0, 2.0]]), _t([1.0, 1.0, 0.5]))
    assert voronoi_loss("linear", fit3, truth).over_min_share == pytest.approx(0.25)


def test_voronoi_cells_match_naive_distances():
    g = torch.Generator().manual_seed(6)
    theta, theta_true = torch.randn(7, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    cells = voronoi_cells(theta, theta_true)
    for j, cell in enumerate(cells):
        for i in range(7):
            d = [math.dist(theta[i].tolist(), theta_true[k].tolist()) for k in range(3)]
            assert (i in cell) == (d[j] == min(d))


def test_softmax_cells_use_the_gate_slopes():
    # Same experts, different gate slopes: the gate decides the cell.
    truth = Atoms(_t([0.5, 0.5]).log(), _t([[1.0, 0.0], [1.0, 0.0]]), _t([0.1, 0.1]), _t([[2.0], [-2.0]]))
    fit = Atoms(_t([0.5, 0.5]).log(), _t([[1.0, 0.0], [1.0, 0.0]]), _t([0.1, 0.1]), _t([[-1.9], [1.9]]))
    assert voronoi_loss("linear", fit, truth).cells == [[1], [0]]


def test_softmax_gate_block_by_hand():
    # Truth β* = (1, -1) (canonical: weighted mean 0). Fit: β = (1.2, 0.8, -1) with weights
    # (.25, .25, .5), also canonical; the gate slopes enter the "β" block, not the loss.
    truth = Atoms(_t([0.5, 0.5]).log(), _t([[1.0, 0.0], [-1.0, 2.0]]), _t([0.1, 0.1]), _t([[1.0], [-1.0]]))
    fit = Atoms(_t([0.25, 0.25, 0.5]).log(), _t([[1.0, 0.0], [1.0, 0.0], [-1.0, 2.0]]), _t([0.1, 0.1, 0.1]),
                _t([[1.2], [0.8], [-1.0]]))
    v = voronoi_loss("linear", fit, truth)
    assert v.cells == [[0, 1], [2]] and v.loss == pytest.approx(0.0)
    assert v.over_blocks["β"] == pytest.approx(0.25 * 0.2 ** 2 * 2)
    assert v.over_block_error("β") == pytest.approx(math.sqrt(0.02))
    assert v.over_min_share == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# Maximum likelihood
# ------------------------------------------------------------------------------------------------
def test_compositions():
    assert compositions(3, 2) == [(1, 2), (2, 1)]
    assert sorted(compositions(4, 2)) == [(1, 3), (2, 2), (3, 1)]
    assert compositions(2, 2) == [(1, 1)]


@pytest.mark.parametrize("setting,gating,n", [("linear", "competition", 4000), ("ffn", "competition", 16000),
                                              ("linear", "softmax", 4000)])
def test_mle_recovers_a_well_separated_truth(setting, gating, n):
    # One-hidden-unit FFN parameters are less well conditioned on [-1, 1]: more samples.
    truth = default_truth(setting, gating, 2)
    g = torch.Generator().manual_seed(7)
    x = sample_x(n, 1, g)
    y = sample_y(setting, gating, truth, x, g)
    fit = fit_mle(setting, gating, x, y, 2, truth, restarts=2, init_noise=0.5, seed=8)
    # The MLE is at least as likely as the truth on its own sample ...
    assert fit.nll <= float(-log_density(setting, gating, truth, x, y).mean()) + 1e-9
    # ... and, with N = N*, close to it: one atom per cell, every parameter within 0.15.
    v = voronoi_loss(setting, fit.atoms, truth)
    assert v.sizes == [1, 1]
    assert v.loss < 0.1
    est = fit.atoms.canonical()
    order = [c[0] for c in v.cells]
    assert (est.expert[order] - truth.expert).abs().max() < 0.15
    assert (est.var[order] - truth.var).abs().max() < 0.02


def test_fit_stays_in_the_compact_box_and_starts_where_asked():
    truth = default_truth("linear", "softmax", 2)
    g = torch.Generator().manual_seed(10)
    x = sample_x(300, 1, g)
    y = sample_y("linear", "softmax", truth, x, g)
    start = Atoms(_t([0.0, 0.1, -0.2]), _t([[2.0, 0.5], [1.5, 0.4], [-4.5, -0.5]]), _t([0.1, 0.2, 4.0]),
                  _t([[1.0], [0.9], [-1.2]]))
    same, _, iters, _ = fit_fns._lbfgs("linear", "softmax", start, x, y, 1e-3, 5.0, 0, 1e-6)   # no step
    assert iters == 0
    for a, b in ((same.expert, start.expert), (same.var, start.var), (same.gate, start.gate)):
        torch.testing.assert_close(a, b)
    fit = fit_mle("linear", "softmax", x, y, 3, truth, restarts=1, init="random", bound=5.0, seed=2)
    assert fit.atoms.expert.abs().max() < 5.0 and fit.atoms.gate.abs().max() < 5.0
    assert 1e-3 < fit.atoms.var.min() and fit.atoms.var.max() < 5.0


def test_mle_init_from_random_also_works_with_restarts():
    truth = default_truth("linear", "competition", 2)
    g = torch.Generator().manual_seed(9)
    x = sample_x(3000, 1, g)
    y = sample_y("linear", "competition", truth, x, g)
    fit = fit_mle("linear", "competition", x, y, 2, truth, restarts=6, init="random", seed=1)
    assert voronoi_loss("linear", fit.atoms, truth).loss < 0.15


# ------------------------------------------------------------------------------------------------
# Slopes
# ------------------------------------------------------------------------------------------------
def test_ols_slope_matches_polyfit():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert ols_slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0])


def test_fit_slope_recovers_a_power_law_and_drops_empty_groups():
    rng = np.random.default_rng(1)
    records = [{"seed": s, "n": n, "e": 3.0 * n ** -0.25 * math.exp(0.1 * rng.normal())}
               for s in range(10) for n in (100, 1000, 10000, 100000)]
    records.append({"seed": 0, "n": 500, "e": math.nan})
    out = fit_slope(records, "e", n_boot=500)
    assert out["slope"] == pytest.approx(-0.25, abs=0.03)
    assert out["ci"][0] < -0.25 < out["ci"][1] and out["ci"][1] - out["ci"][0] < 0.1
    assert out["points"] == 40 and out["dropped"] == 1
    exact = fit_slope([{"seed": s, "n": n, "e": n ** -0.5} for s in range(3) for n in (10, 100)], "e", 200)
    assert exact["slope"] == pytest.approx(-0.5) and exact["ci"] == pytest.approx([-0.5, -0.5])


def test_theory_slopes():
    comp = TheoryConfig(gating="competition")
    assert theory_slope(comp, "over", 2)[0] == -0.25 and theory_slope(comp, "exact", 2)[0] == -0.5
    assert theory_slope(comp, "over[b]", 3)[0] == -0.25 and theory_slope(comp, "loss", 2)[0] == -0.5
    soft = TheoryConfig(gating="softmax")
    assert theory_slope(soft, "over", 2)[0] == pytest.approx(-1 / 8)
    assert theory_slope(soft, "over", 3)[0] == pytest.approx(-1 / 12)
    assert theory_slope(soft, "over[b]", 2)[0] == pytest.approx(-1 / 8)
    assert theory_slope(soft, "over[a]", 2)[0] == pytest.approx(-1 / 4)
    assert theory_slope(soft, "over[ν]", 3)[0] == pytest.approx(-1 / 6)
    assert theory_slope(soft, "over", 4)[0] is None
    assert theory_slope(TheoryConfig(setting="ffn", gating="softmax"), "over", 2)[0] is None


# ------------------------------------------------------------------------------------------------
# Failure paths and the CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    ({"n_experts": 1}, "n_experts=1 must be >= n_true=2"),
    ({"setting": "mlp"}, "setting='mlp' is not one of"),
    ({"gating": "topk"}, "gating='topk' is not one of"),
    ({"sizes": [100]}, "at least two sample sizes"),
    ({"sizes": [5, 100]}, "integer >= 10"),
    ({"seeds": 1}, "seeds must be >= 2"),
    ({"n_true": 4, "n_experts": 5}, "n_true must be <= 3"),
    ({"init_cells": [1, 1]}, "must be 2 positive counts summing to n_experts=3"),
    ({"var_min": 0.2}, "var_min must be in (0, 0.05)"),
    ({"restarts": 0}, "restarts must be an integer >= 1"),
    ({"param_bound": 3.0}, "param_bound must be > 4"),
])
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TheoryConfig(**changes)


def test_fit_and_truth_reject_bad_arguments():
    truth = default_truth("linear", "competition", 2)
    x, y = torch.zeros(10, 1, dtype=F64), torch.zeros(10, dtype=F64)
    with pytest.raises(ValueError, match="N >= N"):
        fit_mle("linear", "competition", x, y, 1, truth)
    with pytest.raises(ValueError, match="init_cells"):
        fit_mle("linear", "competition", x, y, 3, truth, init_cells=(3, 0))
    with pytest.raises(ValueError, match="the truth must lie inside"):
        fit_mle("linear", "competition", x, y, 3, truth, bound=1.0)
    with pytest.raises(ValueError, match="n_true must be in"):
        default_truth("linear", "competition", 0)
    with pytest.raises(ValueError, match="unknown setting"):
        expert_mean("conv", x, torch.zeros(2, 2, dtype=F64))


def _parse(argv):
    parser = argparse.ArgumentParser()
    theory_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_errors_are_clear(capsys):
    from competesmoe.cli import main as cli_main
    for argv, msg in ((["--n-experts", "1"], "n_experts=1 must be >= n_true=2"),
                      (["--sizes", "100,200", "--n-min", "100"], "either --sizes or"),
                      (["--n-min", "100", "--n-max", "50", "--n-points", "3"], "n_min < n_max")):
        assert cli_main(["theory", *argv]) == 1            # a ConfigError: one line on stderr, exit 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        _parse(["--gating", "topk"])
    with pytest.raises(SystemExit):
        _parse(["--sizes", "100,abc"])


def test_log_grid():
    assert theory_cli.log_grid(1000, 8000, 4) == [1000, 2000, 4000, 8000]


def test_cli_end_to_end(tmp_path, capsys):
    args = _parse(["--gating", "softmax", "--sizes", "200,400", "--seeds", "2", "--restarts", "1",
                   "--bootstrap", "100", "--out", str(tmp_path), "--name", "t"])
    assert theory_cli.main(args) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert len(result["records"]) == 4
    assert set(result["slopes"]) == {"exact", "over", "loss", "over[a]", "over[b]", "over[ν]", "over[β]"}
    assert result["slopes"]["over"]["theory"] in (pytest.approx(-1 / 8), pytest.approx(-1 / 12))
    assert (tmp_path / "t.png").stat().st_size > 1000
    table = (tmp_path / "t.md").read_text()
    assert "| quantity | measured slope" in table
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 7 and all(line.replace("\\|", "").count("|") == 7 for line in rows)
    assert len(result["records"][0]["fit"]["weights"]) == 3
    assert "Smallest atom's share" in table
    assert "wrote" in capsys.readouterr().out


def test_plot_handles_a_geometric_mean_outside_the_quartiles(tmp_path):
    from competesmoe.theory.report import plot
    records = [{"seed": s, "n": n, "exact": e, "over": e, "loss": e}
               for n in (100, 1000) for s, e in enumerate((1.0, 100.0, 100.0, 100.0))]
    cfg = TheoryConfig().to_dict()
    slopes = {m: {"slope": 0.0, "theory": -0.5} for m in ("exact", "over", "loss")}
    plot({"config": cfg, "records": records, "slopes": slopes}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
