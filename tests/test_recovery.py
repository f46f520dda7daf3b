"""Expert-recovery benchmark with the real MoE layer (competesmoe.theory.recovery)."""
from __future__ import annotations

import math

import pytest
import torch

from competesmoe.theory import recovery as R


def _teacher_atoms():
    params = torch.tensor([[1.0, 2.0, -1.0, 0.5], [-2.0, 0.5, 1.0, 3.0]], dtype=torch.float64)
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    return params, w


def test_voronoi_is_zero_for_the_teacher_itself_and_any_permutation():
    p, w = _teacher_atoms()
    assert R.recovery_voronoi(p, w, p, w).loss == 0.0
    perm = torch.tensor([1, 0])
    v = R.recovery_voronoi(p[perm], w[perm], p, w)
    assert v.loss == 0.0 and v.cells == [[1], [0]]


def test_voronoi_of_a_known_perturbation():
    p, w = _teacher_atoms()
    delta = torch.tensor([0.3, 0.0, -0.4, 0.0], dtype=torch.float64)         # ‖δ‖ = 0.5
    # exact-specified (one atom per expert): first power, weighted: 0.4 · 0.5
    v = R.recovery_voronoi(p + torch.stack([delta, 0 * delta]), w, p, w)
    assert v.loss == pytest.approx(0.4 * 0.5) and v.exact_error == pytest.approx(0.2)
    # over-specified: expert 0 split into two atoms of weight 0.2, one moved by δ: 0.2 · 0.5² (squares)
    split = torch.stack([p[0], p[0] + delta, p[1]])
    v = R.recovery_voronoi(split, torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64), p, w)
    assert v.sizes == [2, 1]
    assert v.loss == pytest.approx(0.2 * 0.25) and v.over_error == pytest.approx(math.sqrt(0.05))
    # a wrong weight adds |Σ w − w*|: expert 1 carried at 0.5 instead of 0.6 (weights renormalised to 1)
    v = R.recovery_voronoi(p, torch.tensor([0.5, 0.5], dtype=torch.float64), p, w)
    assert v.weight_term == pytest.approx(0.1 + 0.1) and v.loss == pytest.approx(0.2)
    # an expert never chosen (weight 0) adds nothing but shares a cell
    v = R.recovery_voronoi(torch.stack([p[0], p[1], p[1] + delta]), torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64), p, w)
    assert v.loss == pytest.approx(0.0, abs=1e-12) and v.sizes == [1, 2]


def test_teachers_gate_as_described():
    cfg = R.RecoveryConfig()
    x = R.sample_inputs(512, cfg.d_model, torch.Generator().manual_seed(0))
    comp = R.make_teacher("competition", cfg)
    with torch.no_grad():
        out = R.teacher_forward(comp, "competition")(x)
        g = comp.experts.forward_all(x)                                    # [N*, T, D]
        a = torch.nn.functional.softplus(g).mean(-1).T                     # Eq. (13), [T, N*]
        s = a / a.sum(-1, keepdim=True)
        torch.testing.assert_close(out.y, (s.T[..., None] * g).sum(0), rtol=1e-5, atol=1e-6)
    soft = R.make_teacher("softmax", cfg)
    with torch.no_grad():
        out = R.teacher_forward(soft, "softmax")(x)
        p = (x @ soft.router.gate.weight.T).softmax(-1)
        g = soft.experts.forward_all(x)
        torch.testing.assert_close(out.y, (p.T[..., None] * g).sum(0), rtol=1e-5, atol=1e-6)
    for t, kind in ((comp, "competition"), (soft, "softmax")):
        w = R.mean_gate_weights(t, x, R.teacher_forward(t, kind))
        assert float(w.sum()) == pytest.approx(1.0) and float(w.min()) >= 0.15


def test_students_and_a_tiny_study():
    cfg = R.RecoveryConfig(teachers=["competition"], students=["smoe", "competesmoe:1", "ideal"], sizes=[60, 120],
                           seeds=2, steps=3, test_size=200, bootstrap=100)
    result = R.run_recovery(cfg, log=lambda *_: None)
    recs = result["records"]
    assert len(recs) == 3 * 2 * 2
    assert all(math.isfinite(r["loss"]) and r["excess_nll"] >= 0 for r in recs)
    assert all("router_top1_agreement" in r for r in recs if r["student"] == "competesmoe:1")
    assert all("router_top1_agreement" not in r for r in recs if r["student"] != "competesmoe:1")
    md = R.markdown(result)
    assert "Teacher gated by competition" in md and "ideal" in md
    with pytest.raises(Exception):
        R.parse_student("competesmoe:2")
    with pytest.raises(Exception):
        R.RecoveryConfig(n_true=3, n_experts=3).validate()


def test_ideal_student_routes_by_competition_when_used():
    cfg = R.RecoveryConfig(steps=2)
    teacher = R.make_teacher("softmax", cfg)
    x = R.sample_inputs(64, cfg.d_model, torch.Generator().manual_seed(1))
    y = R.teacher_forward(teacher, "softmax")(x).y.detach()
    ideal = R.train_student("ideal", teacher, x, y, cfg, seed=0)
    assert R.student_forward(ideal, "ideal")(x).competed
    smoe = R.train_student("smoe", teacher, x, y, cfg, seed=0)
    assert not R.student_forward(smoe, "smoe")(x).competed


def test_recovery_command(tmp_path):
    from competesmoe.cli import main
    rc = main(["recovery", "--teachers", "softmax", "--students", "smoe,competesmoe:0.5", "--sizes", "40,80",
               "--seeds", "2", "--steps", "2", "--test-size", "100", "--bootstrap", "100", "--out", str(tmp_path)])
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == {"expert-recovery.md", "expert-recovery.json", "expert-recovery.png"}
