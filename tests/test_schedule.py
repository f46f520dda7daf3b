"""CompetitionSchedule (Section 2.4, Appendix C): invariants as property tests, placement vs a naive reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from competesmoe import CompetitionSchedule, ConfigError, MoE, MoEConfig, attach_schedule, on_optimizer_step
from competesmoe.moe.schedule import place

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


def naive_place(draws: np.ndarray, a_max: int, warmup: int) -> np.ndarray:
    """Appendix C read literally: layer by layer, step by step; a capped draw is deferred to the next step
    with room that this layer does not already use, else the latest such step before it, else dropped."""
    L, T = draws.shape
    table = np.zeros((L, T), dtype=bool)
    for l in range(L):
        for t in range(warmup, T):
            if not draws[l, t]:
                continue
            free = [u for u in range(T) if u >= warmup and table[:, u].sum() < a_max and not table[l, u]]
            later = [u for u in free if u >= t]
            earlier = [u for u in free if u < t]
            if later:
                table[l, min(later)] = True
            elif earlier:
                table[l, max(earlier)] = True
    return table


def test_a_capped_draw_is_deferred_to_the_next_free_step():
    draws = np.zeros((3, 6), dtype=bool)
    draws[0, 2] = draws[1, 2] = True          # A_max = 1: layer 1 cannot join layer 0 at step 2
    assert np.argwhere(place(draws, a_max=1)).tolist() == [[0, 2], [1, 3]]   # the next step, not step 1
    draws[2, [2, 3]] = True                   # steps 2 and 3 are full: layer 2 goes to 4, then 5
    assert np.argwhere(place(draws, a_max=1)[2]).ravel().tolist() == [4, 5]
    late = np.zeros((2, 4), dtype=bool)
    late[:, 3] = True                         # nothing after the last step: back to the latest free one
    assert np.argwhere(place(late, a_max=1)).tolist() == [[0, 3], [1, 2]]
    own = np.zeros((2, 5), dtype=bool)
    own[0, 1] = own[1, [1, 2]] = True         # layer 1 already uses step 2: its capped draw lands on 3
    assert np.argwhere(place(own, a_max=1)[1]).ravel().tolist() == [2, 3]
    full = np.ones((3, 2), dtype=bool)        # 6 draws, room for 2: the rest are dropped
    assert place(full, a_max=1).sum() == 2
    assert not place(draws, a_max=1, warmup_steps=3)[:, :3].any()  # warm-up draws are ignored


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 5), T=st.integers(1, 30), a_max=st.integers(1, 3), omega=st.floats(0, 1),
       warmup=st.integers(0, 5), seed=st.integers(0, 10_000))
def test_placement_equals_the_naive_reading_of_appendix_c(L, T, a_max, omega, warmup, seed):
    draws = np.random.default_rng(seed).random((L, T)) < omega
    warmup = min(warmup, T - 1)
    assert np.array_equal(place(draws, a_max, warmup), naive_place(draws, a_max, warmup))


def test_schedule_table_is_the_placement_of_its_own_draws():
    s = CompetitionSchedule(3, 2000, omega=0.3, a_max=1, warmup=0.1, seed=0)
    draws = np.random.default_rng(0).random((3, 2000)) < 0.3
    assert np.array_equal(s.table, naive_place(draws, 1, 200))
    assert np.array_equal(s.table[0], draws[0] & (np.arange(2000) >= 200))  # layer 0 is never moved


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
