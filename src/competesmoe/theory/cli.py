"""`competesmoe theory`: measure the convergence rates of Section 3 (Theorem 3.2, Theorem K.1).

Example (a few minutes on 2 CPU cores):
  competesmoe theory --setting linear --gating competition
Larger study:
  competesmoe theory --setting linear --gating softmax --n-max 128000 --n-points 8 --seeds 16
"""
from __future__ import annotations

import argparse

from competesmoe.config import ConfigError
from competesmoe.theory.config import DEFAULT_SIZES, TheoryConfig
from competesmoe.theory.fit import INITS
from competesmoe.theory.model import GATINGS, SETTINGS


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def log_grid(n_min: int, n_max: int, points: int) -> list[int]:
    """`points` sample sizes, evenly spaced in log between n_min and n_max."""
    if points < 2 or n_min < 10 or n_max <= n_min:
        raise ConfigError(f"need n_points >= 2 and 10 <= n_min < n_max, got {n_min}, {n_max}, {points}")
    ratio = (n_max / n_min) ** (1 / (points - 1))
    grid = sorted({round(n_min * ratio ** k) for k in range(points)})
    if len(grid) != points:
        raise ConfigError(f"{points} distinct sample sizes do not fit between {n_min} and {n_max}")
    return grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TheoryConfig()
    parser.add_argument("--setting", choices=SETTINGS, default=d.setting, help="expert form g(X, W)")
    parser.add_argument("--gating", choices=GATINGS, default=d.gating, help="gate of the ground truth and the fit")
    parser.add_argument("--n-true", type=int, default=d.n_true, help="N*, true experts (1-3)")
    parser.add_argument("--n-experts", type=int, default=d.n_experts, help="N, fitted experts (N >= N*)")
    parser.add_argument("--dim", type=int, default=d.dim, help="input dimension d")
    parser.add_argument("--sizes", type=_int_list, default=None,
                        help=f"comma-separated sample sizes (default {','.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--n-min", type=int, default=None, help="log grid from n-min ... (instead of --sizes)")
    parser.add_argument("--n-max", type=int, default=None, help="... to n-max ...")
    parser.add_argument("--n-points", type=int, default=None, help="... with this many points")
    parser.add_argument("--seeds", type=int, default=d.seeds, help="independent repetitions per n")
    parser.add_argument("--seed", type=int, default=d.seed, help="first seed")
    parser.add_argument("--restarts", type=int, default=d.restarts, help="L-BFGS restarts per fit")
    parser.add_argument("--init", choices=INITS, default=d.init, help="start near G* (perturbed) or at random")
    parser.add_argument("--init-noise", type=float, default=d.init_noise, help="perturbation of the 'truth' starts")
    parser.add_argument("--init-cells", type=_int_list, default=None,
                        help="atoms per true expert at the start, e.g. 3,1 (default: every split in turn)")
    parser.add_argument("--var-min", type=float, default=d.var_min, help="lower bound on the fitted variances")
    parser.add_argument("--param-bound", type=float, default=d.param_bound,
                        help="compact Θ: |expert and gate parameters| and ν below this")
    parser.add_argument("--max-iter", type=int, default=d.max_iter, help="L-BFGS iterations per restart")
    parser.add_argument("--tol", type=float, default=d.tol, help="L-BFGS gradient tolerance")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples for the CIs")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    parser.add_argument("--out", default="runs/theory", help="folder for the .md, .json and .png")
    parser.add_argument("--name", default=None, help="file stem (default theory-<setting>-<gating>)")


def config_from_args(args: argparse.Namespace) -> TheoryConfig:
    grid_args = (args.n_min, args.n_max, args.n_points)
    if any(v is not None for v in grid_args):
        if args.sizes is not None:
            raise ConfigError("give either --sizes or --n-min/--n-max/--n-points, not both")
        if any(v is None for v in grid_args):
            raise ConfigError("--n-min, --n-max and --n-points go together")
        sizes = log_grid(*grid_args)
    else:
        sizes = args.sizes if args.sizes is not None else list(DEFAULT_SIZES)
    return TheoryConfig(setting=args.setting, gating=args.gating, n_true=args.n_true, n_experts=args.n_experts,
                        dim=args.dim, sizes=sizes, seeds=args.seeds, seed=args.seed, restarts=args.restarts,
                        init=args.init, init_noise=args.init_noise, init_cells=args.init_cells,
                        var_min=args.var_min, param_bound=args.param_bound, max_iter=args.max_iter, tol=args.tol,
                        bootstrap=args.bootstrap, threads=args.threads)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from competesmoe.theory.report import markdown_table, write_outputs
    from competesmoe.theory.study import run_study

    print(f"competesmoe theory: {cfg.setting} experts, {cfg.gating} gating, N*={cfg.n_true}, N={cfg.n_experts}, "
          f"n={cfg.sizes}, {cfg.seeds} seeds", flush=True)
    result = run_study(cfg, log=lambda msg: print(msg, flush=True))
    paths = write_outputs(result, args.out, args.name or f"theory-{cfg.setting}-{cfg.gating}")
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
