import pytest

from competesmoe import ConfigError, MoEConfig, apply_overrides
from competesmoe.config import CompetitionConfig


def test_yaml_round_trip(tmp_path):
    cfg = MoEConfig(16, 8, 8, 2, router="competesmoe", competition=CompetitionConfig(kappa="silu", alpha=0.0))
    path = tmp_path / "moe.yaml"
    cfg.to_yaml(path)
    assert MoEConfig.from_yaml(path) == cfg


def test_overrides_by_path_and_unique_leaf_name():
    cfg = MoEConfig(16, 8, 8, 2)
    new = apply_overrides(cfg, ["competition.kappa=norm", "alpha=0", "top_k=3", "shared_mix=0.5",
                                "detach_router_off_competition=true", "chunk_tokens=null"])
    assert (new.competition.kappa, new.competition.alpha, new.top_k) == ("norm", 0.0, 3)
    assert isinstance(new.competition.alpha, float) and new.router_opts.shared_mix == 0.5
    assert new.competition.detach_router_off_competition is True
    assert cfg.top_k == 2 and cfg.competition.kappa == "softplus"   # the original is untouched


@pytest.mark.parametrize("override,msg", [
    (["nope=1"], "unknown config key 'nope'"),
    (["top_k=100"], "K must be <= N"),
    (["kappa=exp"], "kappa='exp'"),
    (["detach_router_off_competition=maybe"], "true/false"),
    (["top_k"], "key=value"),
    (["router_opts.proj_dim=abc"], "router_opts.proj_dim: expected an integer or null, got 'abc'"),
    (["chunk_tokens=1.5"], "chunk_tokens: expected an integer or null, got 1.5"),
    (["n_shared=true"], "n_shared: expected an integer, got True"),
    (["top_k=2.0"], "top_k: expected an integer, got 2.0"),
    (["alpha=abc"], "alpha: expected a number, got 'abc'"),
    (["kappa=3"], "kappa='3' is not one of"),  # a string field takes the text; validation refuses it
])
def test_bad_overrides_are_clear(override, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_overrides(MoEConfig(16, 8, 8, 2), override)


def test_unknown_yaml_field_and_unreadable_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("d_model: 8\nd_expert: 4\nn_experts: 4\ntop_k: 2\nrouterr: smoe\n")
    with pytest.raises(ConfigError, match="routerr"):
        MoEConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="cannot read"):
        MoEConfig.from_yaml(tmp_path / "missing.yaml")


def test_types_are_checked_on_construction_and_from_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"MoEConfig.top_k: expected an integer, got '4'"):
        MoEConfig(16, 8, 8, "4")
    with pytest.raises(ConfigError, match=r"CompetitionConfig.chunk_tokens: expected an integer or null, got 1.5"):
        CompetitionConfig(chunk_tokens=1.5)
    path = tmp_path / "moe.yaml"
    path.write_text("d_model: 16\nd_expert: 8\nn_experts: 8\ntop_k: 2\nrouter_opts:\n  n_shared: true\n")
    with pytest.raises(ConfigError, match="RouterConfig.n_shared: expected an integer, got True"):
        MoEConfig.from_yaml(path)
    widened = apply_overrides(MoEConfig(16, 8, 8, 2), {"alpha": 1, "gamma": "2e-3"})
    assert widened.competition.alpha == 1.0 and isinstance(widened.competition.alpha, float)
    assert widened.competition.gamma == 2e-3


def test_paper_151m_trains_the_papers_token_budget():
    """Section 5.1: 7 x 10^9 training tokens; Table 13: 64 sequences per GPU on 4 GPUs; 1,024 tokens per
    sequence (MoEUT's SlimPajama sweep, lm.unroll)."""
    from competesmoe.train.config import run_preset
    cfg = run_preset("paper-151m")
    seqs = cfg.train.batch_size * cfg.train.grad_accum
    assert seqs == 64 * 4 and cfg.data.seq_len == 1024
    tokens = cfg.train.steps * seqs * cfg.data.seq_len
    assert 7.0e9 <= tokens < 7.0e9 + 256 * 1024                # the first step count reaching 7 B
    assert cfg.train.steps == 26_703
