"""`competesmoe compare` statistics: intervals, tests and power against scipy and closed forms."""
from __future__ import annotations

import json
import math

import pytest

from competesmoe.analysis import stats
from competesmoe.analysis.compare_report import parse_effect, significance, write_compare

sp = pytest.importorskip("scipy.stats")

A = [165.2, 161.9, 169.0, 163.4, 167.7]          # fixed numbers, e.g. PPL of one arm over 5 seeds
B = [171.0, 170.8, 176.3, 168.9, 174.1]


@pytest.mark.parametrize("df", [1, 2, 4, 7.5, 30, 200])
def test_t_distribution_matches_scipy(df):
    for t in (-6.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.7, 3.2, 12.0):
        assert stats.t_cdf(t, df) == pytest.approx(sp.t.cdf(t, df), abs=1e-12)
        assert stats.t_sf2(t, df) == pytest.approx(2 * sp.t.sf(abs(t), df), rel=1e-9, abs=1e-15)
    for p in (0.001, 0.025, 0.2, 0.5, 0.8, 0.975, 0.9995):
        assert stats.t_ppf(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-9, abs=1e-9)


def test_incomplete_beta_matches_scipy():
    from scipy.special import betainc
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (10.0, 3.0, 0.7), (0.7, 20.0, 0.01), (50, 50, 0.5)]:
        assert stats.betainc(a, b, x) == pytest.approx(betainc(a, b, x), rel=1e-10)


def test_summary_interval_by_hand_and_scipy():
    s = stats.summary(A)
    m = sum(A) / 5
    sd = math.sqrt(sum((x - m) ** 2 for x in A) / 4)
    half = sp.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert s.n == 5 and s.mean == pytest.approx(m) and s.std == pytest.approx(sd)
    assert s.ci == pytest.approx((m - half, m + half))
    assert s.ci == pytest.approx(sp.t.interval(0.95, 4, loc=m, scale=sp.sem(A)))
    one = stats.summary([3.0])
    assert one.std is None and one.ci is None


def test_paired_test_matches_scipy():
    d = stats.paired(B, A)
    ref = sp.ttest_rel(B, A)
    diffs = [b - a for a, b in zip(A, B)]
    assert d.test == "paired" and d.df == 4
    assert d.diff == pytest.approx(sum(diffs) / 5)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert d.diff / d.se == pytest.approx(ref.statistic, rel=1e-12)
    assert d.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert d.distinguishable


def test_welch_test_matches_scipy():
    a, b = A + [160.0], B[:4]
    d = stats.welch(a, b)
    ref = sp.ttest_ind(a, b, equal_var=False)
    assert d.test == "welch"
    assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert d.df == pytest.approx(ref.df, rel=1e-12)
    assert d.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)


def test_pairing_by_seed_only_when_the_seeds_match():
    a, b = dict(zip(range(1, 6), A)), dict(zip(range(1, 6), B))
    assert stats.compare_arms(b, a).test == "paired"
    # pairs follow the seed, not the order the values came in
    shuffled = {s: a[s] for s in (3, 1, 5, 2, 4)}
    assert stats.compare_arms(b, shuffled).p == pytest.approx(sp.ttest_rel(B, A).pvalue, rel=1e-9)
    assert stats.compare_arms(b, {s + 10: v for s, v in a.items()}).test == "welch"
    # a partial arm (seeds 1-3 of 5): paired on the shared seeds only
    part = stats.compare_arms({s: b[s] for s in (1, 2, 3)}, a)
    assert part.test == "paired" and part.n_a == 3 and part.p == pytest.approx(sp.ttest_rel(B[:3], A[:3]).pvalue)


def test_detectable_difference_is_the_closed_form():
    for se, df in [(1.0, 4), (0.37, 9), (2.5, 17.3)]:
        closed = (sp.t.ppf(0.975, df) + sp.t.ppf(0.8, df)) * se
        assert stats.detectable(se, df) == pytest.approx(closed, rel=1e-9)
    # and it is what it claims: the exact (non-central t) power of the two-sided test at that difference
    se, df = 1.0, 9
    delta = stats.detectable(se, df)
    q = sp.t.ppf(0.975, df)
    power = sp.nct.sf(q, df, delta / se) + sp.nct.cdf(-q, df, delta / se)
    assert power == pytest.approx(0.8, abs=0.01)


def test_seeds_needed_against_the_normal_closed_form_and_exact_power():
    sd, delta = 1.0, 0.1
    z = sp.norm.ppf(0.975) + sp.norm.ppf(0.8)
    n_normal = (z * sd / delta) ** 2                          # paired, large n: 784.9
    n = stats.seeds_needed(delta, sd, paired_design=True)
    assert math.ceil(n_normal) <= n <= math.ceil(n_normal) + 3
    n2 = stats.seeds_needed(delta, sd, paired_design=False)   # two arms: 2·(z σ/δ)²
    assert math.ceil(2 * n_normal) <= n2 <= math.ceil(2 * n_normal) + 3

    def exact_power(n, sd):  # paired design, non-central t
        q = sp.t.ppf(0.975, n - 1)
        nc = delta / (sd / math.sqrt(n))
        return sp.nct.sf(q, n - 1, nc) + sp.nct.cdf(-q, n - 1, nc)
    n = stats.seeds_needed(delta, 0.3)
    assert exact_power(n, 0.3) >= 0.79 and exact_power(n - 1, 0.3) < 0.8
    assert stats.seeds_needed(0.0, 1.0) is None


def _runs(values: dict[str, list[float]], seeds=None) -> list[dict]:
    out = []
    for label, vs in values.items():
        for i, v in enumerate(vs):
            seed = (seeds or {}).get(label, list(range(1, len(vs) + 1)))[i]
            out.append({"label": label, "seed": seed, "dir": f"/nonexistent/{label}/seed{seed}",
                        "summary": {"val_ppl": v, "train_tokens": 100, "step": 10}})
    return out


def test_identical_arms_are_not_distinguishable():
    sig = significance(_runs({"smoe": A, "copy": list(A)}), "smoe", parse_effect("0.4%"))
    assert sig[0]["verdict"] == "not distinguishable" and sig[0]["p"] == 1.0 and sig[0]["diff"] == 0
    # the same values under other seeds: Welch, still indistinguishable
    sig = significance(_runs({"smoe": A, "copy": list(A)}, seeds={"copy": [11, 12, 13, 14, 15]}), "smoe")
    assert sig[0]["test"] == "welch" and sig[0]["verdict"] == "not distinguishable"
    assert sig[0]["p"] == pytest.approx(1.0)
    # a real gap is reported with its direction
    sig = significance(_runs({"smoe": A, "competesmoe": B}), "smoe", parse_effect("0.4%"))
    row = sig[0]
    assert row["verdict"] == "higher PPL than smoe" and row["test"] == "paired"
    assert row["rel_diff"] == pytest.approx(row["diff"] / (sum(A) / 5))
    d = [b - a for a, b in zip(A, B)]
    sd_d = math.sqrt(sum((x - sum(d) / 5) ** 2 for x in d) / 4)
    assert row["seeds_needed"] == stats.seeds_needed(0.004 * sum(A) / 5, sd_d)


def test_parse_effect():
    assert parse_effect("0.4%") == pytest.approx((0.004, True))
    assert parse_effect("1.5") == (1.5, False)
    assert parse_effect(None) is None
    from competesmoe.config import ConfigError
    with pytest.raises(ConfigError):
        parse_effect("lots")


def test_written_report_has_statistics_and_no_machine_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = _runs({"smoe": A, "competesmoe": B, "same": list(A)})
    for r in runs:   # run folders under the comparison's folder, each with its metrics
        run = tmp_path / "cmp" / r["label"] / f"seed{r['seed']}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_ppl": r["summary"]["val_ppl"]}) + "\n")
        r["dir"] = str(run)     # absolute, as a user's --out may be
    data = tmp_path / "data" / "train.txt"
    settings = {"routers": ["smoe", "competesmoe", "same"], "seeds": [1, 2, 3, 4, 5], "preset": "tiny",
                "overrides": [f"data.train={data}", "train.steps=10"], "analysis_tokens": 0,
                "baseline": "smoe", "detect": "0.4%"}
    paths = write_compare(runs, settings, tmp_path / "cmp")
    md = paths["markdown"].read_text()
    js = paths["json"].read_text()
    assert str(tmp_path) not in md and str(tmp_path) not in js
    assert "data.train=data/train.txt" in md and "| smoe | 1 | smoe/seed1 |" in md
    assert "not distinguishable" in md and "higher PPL than smoe" in md
    assert "seeds for 0.4%" in md and paths["val_ppl_ci"].exists()
    report = json.loads(js)
    assert report["arms"]["smoe"]["ci"] == pytest.approx(list(stats.summary(A).ci))
    assert {s["arm"]: s["verdict"] for s in report["significance"]} == {
        "competesmoe": "higher PPL than smoe", "same": "not distinguishable"}


def test_report_only_trains_nothing(tmp_path):
    from competesmoe.analysis.compare import run_compare
    from competesmoe.config import ConfigError
    with pytest.raises(ConfigError, match="no finished run"):
        run_compare("smoe,competesmoe", [1, 2], "tiny", ["train.steps=2"], tmp_path, analysis_tokens=0,
                    log=lambda *_: None, report_only=True)
    assert not any(tmp_path.rglob("metrics.jsonl"))          # nothing was trained
