"""CompetitionSchedule invariants (SPEC §5, Appendix C) as property tests."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from competesmoe import CompetitionSchedule, ConfigError, MoE, MoEConfig, attach_schedule, on_optimizer_step

params = st.tuples(st.integers(1, 12), st.integers(1, 400), st.floats(0.0, 1.0), st.integers(1, 5),
                   st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(params)
def test_never_more_than_a_max_and_nothing_in_warmup(p):
    L, T, omega, a_max, warmup, seed = p
    s = CompetitionSchedule(L, T, omega, a_max, warmup, seed)
    assert s.table.shape == (L, T)
    assert s.table.sum(axis=0).max(initial=0) <= a_max
    assert not s.table[:, :round(warmup * T)].any()
    assert not s.competes(0, T) and not s.competes(0, T + 100) and not s.competes(0, -1)


@settings(max_examples=30, deadline=None)
@given(params)
def test_deterministic_per_seed_and_state_dict_round_trip(p):
    L, T, omega, a_max, warmup, seed = p
    a, b = CompetitionSchedule(L, T, omega, a_max, warmup, seed), CompetitionSchedule(L, T, omega, a_max, warmup, seed)
    assert np.array_equal(a.table, b.table)
    a.step = T // 2
    state = a.state_dict()
    c = CompetitionSchedule(1, 1, 0.5, 1, 0.0, seed + 1)       # a different schedule, then loaded
    c.load_state_dict(state)
    assert np.array_equal(c.table, a.table) and c.step == a.step and c.warmup_steps == a.warmup_steps
    assert c.competing_layers() == a.competing_layers()


def test_does_not_use_the_global_rng():
    torch.manual_seed(1)
    np.random.seed(1)
    before = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(1)
    np.random.seed(1)
    CompetitionSchedule(4, 100, 0.3, 2, 0.1, 7)
    assert (torch.rand(1).item(), np.random.rand()) == before


def test_seed_changes_the_table():
    a, b = CompetitionSchedule(8, 500, seed=1), CompetitionSchedule(8, 500, seed=2)
    assert not np.array_equal(a.table, b.table)


@pytest.mark.parametrize("L,T,omega,warmup", [(16, 5000, 0.07, 0.0), (4, 5000, 0.07, 0.05), (8, 4000, 0.2, 0.1)])
def test_expected_count_is_omega_times_steps(L, T, omega, warmup):
    s = CompetitionSchedule(L, T, omega, a_max=max(3, L), warmup=warmup, seed=3)
    expected = omega * (T - round(warmup * T)) * L
    sd = (expected * (1 - omega)) ** 0.5
    assert abs(int(s.table.sum()) - expected) < 4 * sd      # no drops: A_max >= L


def test_redistribution_moves_to_nearest_free_step():
    s = CompetitionSchedule(3, 2000, omega=0.3, a_max=1, seed=0)
    rng = np.random.default_rng(0)
    draws = rng.random((3, 2000)) < 0.3
    assert s.table.sum(axis=0).max() == 1
    # Layer 0 is placed first, exactly where it was drawn.
    assert np.array_equal(s.table[0], draws[0])
    # Every activation of a later layer lies on a step that was free when it was placed.
    assert s.table.sum() <= draws.sum()
    assert s.table.sum() > draws[0].sum()


def test_saturated_schedule_fills_every_step_quickly():
    s = CompetitionSchedule(16, 20000, omega=1.0, a_max=3)
    assert (s.table.sum(axis=0) == 3).all()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="omega"):
        CompetitionSchedule(2, 10, omega=1.5)
    with pytest.raises(ConfigError, match="a_max"):
        CompetitionSchedule(2, 10, a_max=0)
    with pytest.raises(ConfigError, match="total_steps"):
        CompetitionSchedule(2, 0)
    with pytest.raises(ConfigError, match="warmup"):
        CompetitionSchedule(2, 10, warmup=1.0)


def test_attach_and_advance_drive_every_layer():
    model = torch.nn.Sequential(*[MoE(MoEConfig(8, 4, 4, 2, router="competesmoe")) for _ in range(3)]).train()
    s = CompetitionSchedule(3, 50, omega=0.3, a_max=2, seed=5)
    attach_schedule(model, s)
    x = torch.randn(4, 8)
    for t in range(50):
        for l, layer in enumerate(model):
            assert layer(x).competed == s.competes(l, t)
        on_optimizer_step(model)
    with pytest.raises(ValueError, match="2 MoE layers"):
        attach_schedule(model, CompetitionSchedule(2, 10))
