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
