"""Several processes on CPU with gloo: data parallel (DDP), sharded (FSDP2) and expert parallel training.

* training with 2 processes gives the losses and weights of 1 process with the same global batch;
* the expert-parallel layer gives the single-process layer's outputs and gradients (normal and
  competition steps, both exchanges, uneven token counts);
* checkpoints written by 2 ranks resume on 1 and vice versa; exact resume after a killed rank;
* ranks whose competition schedules differ stop with a clear error.

Tolerances: a run on 2 processes sums its gradients in another order (each rank's mean, then the mean
of ranks), so float32 results agree to rounding, not bit for bit; the layer tests run in float64.
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from competesmoe.config import CompetitionConfig, LossConfig, MoEConfig
from competesmoe.data import BatchIterator, DataError
from competesmoe.data.batches import RankShard
from competesmoe.moe import CompetitionSchedule, MoE
from competesmoe.moe.expert_parallel import ExpertParallelExperts, exchange_method
from competesmoe.train import Trainer, run_preset
from competesmoe.train import checkpoint as ckpt
from competesmoe.train.distributed import Dist, DistributedError

from test_train import SMALL

STEPS, CKPT = 8, 4
COMMON = SMALL + ["router=competesmoe", "omega=0.3", "a_max=1", f"train.steps={STEPS}", f"train.ckpt_every={CKPT}",
                  f"train.eval_every={CKPT}", "train.grad_accum=2", "train.keep_last=10"]
# float32 over 8 AdamW steps: the two reduction orders differ by rounding (~1e-7 per step); Adam's
# normalised update turns that into at most a few 1e-6 on the weights.
ATOL = 2e-5


def _args(tmp_path, name, extra):
    sets = COMMON + [f"data.cache_dir={tmp_path / 'cache'}", *extra]
    return ["train", "--out", str(tmp_path / name)] + [a for s in sets for a in ("--set", s)]


def torchrun(tmp_path, name, *extra, resume=False, popen=False, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "competesmoe", *_args(tmp_path, name, extra)] + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def single(tmp_path, name, *extra, resume=False):
    cfg = run_preset("tiny", COMMON + [f"train.out_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                                       *extra])
    return Trainer(cfg, resume=resume, log=lambda *a: None).train()


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    path = ckpt.checkpoints(run / "checkpoints")[-1]
    return ckpt.full_model_tensors(path) if ckpt.is_sharded(path) else load_file(str(path / "model.safetensors"))


def assert_same_run(a: Path, b: Path, atol=ATOL):
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for s in la:
        assert abs(la[s] - lb[s]) < atol, (s, la[s], lb[s])
    wa, wb = weights(a), weights(b)
    assert set(wb) - set(wa) <= {"head.weight"}          # tied to embed.weight; safetensors stores it once
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def competed(run: Path) -> int:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("competing_layers", 0) for r in rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process reference and the 2-process runs compared with it (built once)."""
    tmp = tmp_path_factory.mktemp("dist")
    single(tmp, "one")
    logs = {name: torchrun(tmp, name, *extra) for name, extra in
            {"ddp": [], "fsdp": ["train.parallel=fsdp"], "ep": ["train.expert_parallel=2"]}.items()}
    return tmp, logs


def test_ddp_equals_one_process_with_the_same_global_batch(runs):
    tmp, logs = runs
    assert "distributed: 2 processes (gloo), ddp" in logs["ddp"]
    assert logs["ddp"].count("final validation perplexity") == 1       # printed by rank 0 only
    assert competed(tmp / "one") > 0                                      # competition steps are included
    assert_same_run(tmp / "one", tmp / "ddp")


def test_fsdp2_equals_one_process(runs):
    tmp, logs = runs
    assert "distributed: 2 processes (gloo), fsdp" in logs["fsdp"]
    assert ckpt.is_sharded(ckpt.checkpoints(tmp / "fsdp" / "checkpoints")[-1])
    assert_same_run(tmp / "one", tmp / "fsdp")


def test_expert_parallel_training_equals_one_process(runs):
    tmp, logs = runs
    assert "expert parallel: 2 ranks per group, 4 experts of each layer per rank, exchange all_to_all" in logs["ep"]
    assert_same_run(tmp / "one", tmp / "ep")


def test_four_processes_ddp_times_two_way_expert_parallelism_equals_one_process(runs):
    """Two data-parallel groups of two expert-parallel ranks: expert gradients summed over the 2 replicas."""
    tmp, _ = runs
    log = torchrun(tmp, "ddp4-ep2", "train.expert_parallel=2", nproc=4)
    assert "distributed: 4 processes (gloo), ddp x expert parallel 2" in log
    assert "expert parallel: 2 ranks per group, 4 experts of each layer per rank" in log
    assert_same_run(tmp / "one", tmp / "ddp4-ep2")


def _resume_from(src: Path, dst: Path, step: int) -> None:
    shutil.copytree(src, dst)
    for path in ckpt.checkpoints(dst / "checkpoints"):
        if ckpt.step_of(path) > step:
            shutil.rmtree(path)


def test_checkpoint_of_two_ranks_resumes_on_one(runs):
    tmp, _ = runs
    for src in ("fsdp", "ep"):        # FSDP2 shards and expert shards
        _resume_from(tmp / src, tmp / f"{src}-to-one", CKPT)
        single(tmp, f"{src}-to-one", f"train.parallel=none", resume=True)
        assert_same_run(tmp / "one", tmp / f"{src}-to-one")
        assert not ckpt.is_sharded(ckpt.checkpoints(tmp / f"{src}-to-one" / "checkpoints")[-1])


def test_checkpoint_of_one_process_resumes_on_two_ranks_sharded(runs):
    tmp, _ = runs
    _resume_from(tmp / "one", tmp / "one-to-two", CKPT)
    log = torchrun(tmp, "one-to-two", "train.parallel=fsdp", "train.expert_parallel=2", resume=True)
    assert "resumed from" in log
    assert_same_run(tmp / "one", tmp / "one-to-two")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def test_killed_rank_leaves_the_last_checkpoint_and_resume_is_exact(runs):
    tmp, _ = runs
    # a longer run, so the kill lands between the first checkpoint and the end
    extra = ["train.steps=40", "train.ckpt_every=4"]
    proc = torchrun(tmp, "killed", *extra, popen=True)
    root, deadline = tmp / "killed" / "checkpoints", time.time() + 120
    while time.time() < deadline and not ckpt.checkpoints(root):
        time.sleep(0.005)
    workers = [c for c in _children(proc.pid)]
    assert workers, "torchrun's workers not found"
    os.kill(workers[-1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    left = ckpt.checkpoints(root)
    assert left and ckpt.step_of(left[-1]) < 40, "the run must really have been interrupted"
    for path in left:
        ckpt.verify(path)                                   # every checkpoint left is complete
    torchrun(tmp, "killed", *extra, resume=True)
    torchrun(tmp, "whole", *extra)
    a, b = weights(tmp / "whole"), weights(tmp / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                   # same P: bit-identical


# --- the expert-parallel layer, and the schedule check, in spawned processes --------------------------
def _spawn(fn, *args):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(fn, args=(os.path.join(d, "store"), *args), nprocs=2, join=True)


def _init(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _layer_worker(rank, store):
    _init(rank, store)
    assert exchange_method(dist.group.WORLD) == "all_to_all"   # gloo has all_to_all_single in torch 2.13
    B, S, D = 2, 5, 8
    # the last case: experts wider out than in (a LLaVA connector's experts), where a rank that receives no
    # pair must still expect output-wide rows back
    for kappa, method, dtype, d_out in [("softplus", "all_to_all", torch.float64, None),
                                        ("softmax", "all_gather", torch.float64, None),
                                        ("softplus", "all_gather", torch.float32, None),
                                        ("softmax", "all_to_all", torch.float64, 11)]:
        cfg = MoEConfig(d_model=D, d_expert=4, n_experts=6, top_k=2, router="competesmoe", d_out=d_out,
                        competition=CompetitionConfig(kappa=kappa),
                        losses=LossConfig(balance="entropy", balance_coef=0.1, zloss_coef=0.0))
        torch.manual_seed(0)
        ref = MoE(cfg).to(dtype)
        ep = copy.deepcopy(ref)
        ep.experts = ExpertParallelExperts(ep.experts, dist.group.WORLD, exchange=method)
        assert ep.experts.w1.shape[0] == 3
        x = torch.randn(2 * B, S, D, dtype=dtype)
        c = torch.randn(d_out or D, dtype=dtype)
        mine = slice(rank * B, (rank + 1) * B)
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for compete in (False, True):
            for m in (ref, ep):
                m.zero_grad()
            xr, xe = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
            out_r, out_e = ref(xr, compete=compete), ep(xe, compete=compete)
            assert out_e.competed == compete
            torch.testing.assert_close(out_e.y, out_r.y[mine], **tol)
            torch.testing.assert_close(out_e.indices, out_r.indices.view(2 * B, S, -1)[mine].reshape(-1, 2))
            # mean losses: the full batch's loss is the mean of the two ranks' losses
            ((out_r.y * c).sum(-1).mean() + out_r.aux_loss).backward()
            ((out_e.y * c).sum(-1).mean() + out_e.aux_loss).backward()
            torch.testing.assert_close(xe.grad / 2, xr.grad[mine], **tol)
            for name, p in ep.named_parameters():
                g = p.grad.clone()
                if name.startswith("experts."):       # this rank's experts: both ranks' tokens already in it
                    torch.testing.assert_close(g / 2, ref.get_parameter(name).grad[rank * 3:(rank + 1) * 3], **tol)
                else:                                  # replicated: sum over ranks (what DDP averages)
                    dist.all_reduce(g)
                    torch.testing.assert_close(g / 2, ref.get_parameter(name).grad, **tol)
        # all experts on all tokens, with another token count on each rank
        xt = x[mine].reshape(-1, D)[: 7 + 3 * rank]
        with torch.no_grad():
            torch.testing.assert_close(ep.experts.forward_all(xt), ref.experts.forward_all(xt), **tol)
            idx = torch.randint(0, 6, (len(xt), 2))
            torch.testing.assert_close(ep.experts(xt, idx), ref.experts(xt, idx), **tol)
            wi, ws = ep.competition_winners(xt)
            ri, rs = ref.competition_winners(xt)
            torch.testing.assert_close(wi, ri)
            torch.testing.assert_close(ws, rs, **tol)
        # every pair for rank 0's experts: rank 1 receives nothing, yet takes part in both backward exchanges
        idx = torch.randint(0, 3, (len(xt), 2))
        ref.zero_grad(), ep.zero_grad()
        xe, xr = xt.clone().requires_grad_(), xt.clone().requires_grad_()
        ep.experts(xe, idx).sum().backward()
        ref.experts(xr, idx).sum().backward()
        torch.testing.assert_close(xe.grad, xr.grad, **tol)
        assert (ep.experts.w1.grad is None) == (rank == 1)
    _schedule_check(rank)
    dist.destroy_process_group()


def _schedule_check(rank):
    d = Dist(rank=rank, world=2)
    d.check_schedule(CompetitionSchedule(4, 50, omega=0.3, seed=7))                 # same everywhere: accepted
    try:
        d.check_schedule(CompetitionSchedule(4, 50, omega=0.3, seed=7 + rank))     # rank 1 differs
    except DistributedError as e:
        assert "competition schedule differs between ranks" in str(e) and "ranks [0]" in str(e), e
    else:
        raise AssertionError("mismatched schedules were accepted")


def test_expert_parallel_layer_equals_the_single_process_layer_and_mismatched_schedules_are_refused():
    _spawn(_layer_worker)       # one pair of processes for both (each start imports torch and competesmoe)


def test_rank_shards_are_the_rows_of_the_global_batch_and_share_one_position():
    tokens = np.arange(5000) % 97
    whole = BatchIterator(tokens, 16, 6, seed=3)
    shards = [RankShard(BatchIterator(tokens, 16, 6, seed=3), r, 3) for r in range(3)]
    for _ in range(40):                       # several epochs: batches straddle epoch boundaries
        assert torch.equal(torch.cat([next(s) for s in shards]), next(whole))
    assert all(s.state_dict() == whole.state_dict() for s in shards)
    with pytest.raises(DataError, match="batch_size=6 .* must be divisible by the 4 processes"):
        RankShard(whole, 0, 4)


def test_single_process_refuses_expert_parallel_and_config_checks(tmp_path):
    with pytest.raises(DistributedError, match="needs 2 processes"):
        single(tmp_path, "x", "train.expert_parallel=2")
    with pytest.raises(Exception, match="train.parallel='tp' is not one of"):
        run_preset("tiny", ["train.parallel=tp"])
    with pytest.raises(Exception, match="must divide the 16 routed experts"):
        run_preset("tiny", ["train.expert_parallel=3"])


def test_optimizer_state_is_created_only_where_missing():
    """A checkpoint of a run where some weight never had a gradient (SigLIP's pooling head under LLaVA) creates
    that weight's state (zeros) and leaves every other weight's moments and step count as they were (it used
    to step all of them once at lr 0, decaying their moments: training after a sharded checkpoint drifted)."""
    from competesmoe.train.distributed import ensure_optimizer_state
    used, unused = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([used, unused], lr=0.1)
    used.grad = torch.randn(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[used].items()}
    w_used, w_unused = used.detach().clone(), unused.detach().clone()
    grad = used.grad
    ensure_optimizer_state(opt)
    assert all(torch.equal(opt.state[used][k], before[k]) for k in before)
    assert torch.equal(opt.state[unused]["exp_avg"], torch.zeros(2))
    assert torch.equal(opt.state[unused]["exp_avg_sq"], torch.zeros(2))
    assert torch.equal(used.detach(), w_used) and torch.equal(unused.detach(), w_unused)
    assert used.grad is grad and unused.grad is None and opt.param_groups[0]["lr"] == 0.1
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    ensure_optimizer_state(fresh)                       # no step ran: every weight gets zero state
    assert len(fresh.state) == 1
