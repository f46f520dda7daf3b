"""Options of the `competesmoe theory` simulation."""
from __future__ import annotations

import dataclasses

from competesmoe.config import Config, check, check_choice
from competesmoe.theory.fit import INITS
from competesmoe.theory.model import GATINGS, SETTINGS
from competesmoe.theory.truth import MAX_TRUE_EXPERTS

DEFAULT_SIZES = [1000, 2000, 4000, 8000, 16000, 32000, 64000]


@dataclasses.dataclass
class TheoryConfig(Config):
    setting: str = "linear"          # expert form: "linear" (Appendix K) or "ffn" (Section 3)
    gating: str = "competition"      # "competition" (Eq. (6)) or "softmax" (no competition)
    n_true: int = 2                  # N*, experts of the ground truth
    n_experts: int = 3               # N, experts of the fitted model (N >= N*)
    dim: int = 1                     # input dimension d
    sizes: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_SIZES))  # sample sizes n
    seeds: int = 8                   # repetitions (independent data sets) per n
    seed: int = 0                    # first seed; data for seed s is nested across n
    restarts: int = 4                # L-BFGS restarts per fit; the best likelihood wins
    init: str = "truth"              # "truth": perturbed copies of G*; "random"
    init_noise: float = 0.3          # scale of the perturbation of the "truth" starts
    init_cells: list[int] | None = None  # atoms per true expert at the start (None: all splits)
    var_min: float = 1e-3            # ν >= var_min ...
    param_bound: float = 10.0        # ... and |W|, |β|, ν <= param_bound: the compact parameter space Θ
    max_iter: int = 500              # L-BFGS iterations per restart
    tol: float = 1e-6                # L-BFGS gradient tolerance (on the mean NLL)
    bootstrap: int = 2000            # bootstrap resamples of the seeds for the slopes' CIs
    threads: int = 1                 # torch CPU threads

    def validate(self) -> None:
        check_choice("setting", self.setting, SETTINGS)
        check_choice("gating", self.gating, GATINGS)
        check_choice("init", self.init, INITS)
        for name in ("n_true", "n_experts", "dim", "seeds", "restarts", "max_iter", "threads"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(self.n_true <= MAX_TRUE_EXPERTS, f"n_true must be <= {MAX_TRUE_EXPERTS} (built-in truths), got {self.n_true}")
        check(self.n_experts >= self.n_true, f"n_experts={self.n_experts} must be >= n_true={self.n_true} (N >= N*)")
        check(isinstance(self.sizes, list) and len(self.sizes) >= 2, f"sizes needs at least two sample sizes, got {self.sizes!r}")
        check(all(isinstance(n, int) and n >= 10 for n in self.sizes), f"every sample size must be an integer >= 10, got {self.sizes}")
        check(len(set(self.sizes)) == len(self.sizes), f"sample sizes must be distinct, got {self.sizes}")
        check(self.seeds >= 2, f"seeds must be >= 2 for a confidence interval, got {self.seeds}")
        check(self.init_noise >= 0, f"init_noise must be >= 0, got {self.init_noise}")
        if self.init_cells is not None:
            check(len(self.init_cells) == self.n_true and sum(self.init_cells) == self.n_experts
                  and min(self.init_cells) >= 1,
                  f"init_cells={self.init_cells} must be {self.n_true} positive counts summing to n_experts={self.n_experts}")
            check(self.init == "truth", "init_cells only applies to init='truth'")
        check(0 < self.var_min < 0.05, f"var_min must be in (0, 0.05) (below the true variances), got {self.var_min}")
        check(self.param_bound > 4.0, f"param_bound must be > 4 (the built-in truths reach 4), got {self.param_bound}")
        check(self.tol > 0, f"tol must be > 0, got {self.tol}")
        check(self.bootstrap >= 100, f"bootstrap must be >= 100, got {self.bootstrap}")
