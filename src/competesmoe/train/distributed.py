"""Training on several processes with PyTorch's own distributed stack (torchrun, DDP, FSDP2, DCP).

    torchrun --nproc-per-node 4 -m competesmoe train --preset paper-151m                    # DDP
    torchrun --nproc-per-node 8 -m competesmoe train --set train.parallel=fsdp             # FSDP2
    torchrun --nproc-per-node 8 -m competesmoe train --set train.expert_parallel=4         # DDP x EP

`setup(train_cfg)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), initialises the
default process group (NCCL on CUDA, gloo on CPU) and returns a `Dist`; the Trainer asks it for
everything that depends on the number of processes P:
  * `parallelize(model)`: expert parallelism (each MoE layer's experts split over E ranks, see
    `moe/expert_parallel.py`), then DDP or FSDP2 `fully_shard` per layer unit (`layer_units`: our blocks,
    a Hugging Face model's decoder and vision-encoder layers) for the other weights;
  * `full_state_dict(model)`: every weight whole on rank 0 (the final Hugging Face folder of finetune);
  * `shard_batches(batches)`: each rank reads its rows of the config's global batch;
  * `check_schedule(schedule)`: every rank must hold the same competition table (else all stop);
  * `sync_context`, `after_backward`, `clip_grad_norm`, `reduce_metrics`: gradient sync once per
    optimizer step, the expert weights' own gradient all-reduce, the global gradient norm, metrics
    averaged over ranks;
  * `model_state`/`load_state`: checkpoints through torch.distributed.checkpoint (`checkpoint.py`).
With P = 1 and E = 1 every method is the single-process behaviour (no wrapper, no communication).

Ranks: rank = dp·E + ep, so the E ranks of an expert-parallel group are consecutive (one node).
Non-expert weights are replicated (DDP) or sharded (FSDP2) over all P ranks; expert weights are
split over the E ranks of a group and replicated over the P/E groups, whose gradients are summed
over those P/E replicas here.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CompeteSMoEError
from ..moe import moe_layers
from ..moe.expert_parallel import ExpertParallelExperts

PARALLEL = ("none", "ddp", "fsdp")


class DistributedError(CompeteSMoEError, RuntimeError):
    """Processes disagree, or the requested parallelism cannot be set up."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "none"          # what wraps the non-expert weights when world > 1
    ep: int = 1                     # expert-parallel group size E
    ep_group: object = None
    edp_group: object = None        # the P/E ranks holding the same experts
    mesh: object = None             # DeviceMesh ("dp", "ep") for DTensor views of expert weights
    train_model: nn.Module | None = None
    expert_names: set[str] = field(default_factory=set)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Does any weight live in pieces on different ranks (then checkpoints go through DCP)?"""
        return self.world > 1 and (self.parallel == "fsdp" or self.ep > 1)

    def logger(self, log):
        return log if self.is_main else (lambda *a, **k: None)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, fn):
        """fn() on rank 0 first (it fills caches on disk), then on the other ranks."""
        if self.world == 1:
            return fn()
        out = fn() if self.is_main else None
        dist.barrier()
        if not self.is_main:
            out = fn()
        dist.barrier()
        return out

    # --- wrapping ---------------------------------------------------------------------------------
    def parallelize(self, model: nn.Module, log=print) -> nn.Module:
        """Split the experts (E > 1), then wrap for data parallelism; returns the module to call in training."""
        if self.ep > 1:
            n = moe_layers(model)[0].cfg.n_routed
            if n % self.ep:
                raise DistributedError(f"train.expert_parallel={self.ep} must divide the {n} routed experts of each layer")
            for layer in moe_layers(model):
                layer.experts = ExpertParallelExperts(layer.experts, self.ep_group)
            self.expert_names = {f"{name}.{p}" for name, m in model.named_modules()
                                 if isinstance(m, ExpertParallelExperts) for p, _ in m.named_parameters()}
            method = moe_layers(model)[0].experts.exchange
            log(f"expert parallel: {self.ep} ranks per group, {n // self.ep} experts of each layer "
                f"per rank, exchange {method} ({dist.get_backend()}); parameter counts are this rank's")
        self.train_model = model
        if self.world == 1:
            return model
        experts = {p for name, p in model.named_parameters() if name in self.expert_names}
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            if self.expert_names:
                DDP._set_params_and_buffers_to_ignore_for_model(model, sorted(self.expert_names))
            detach = any(l.cfg.competition.detach_router_off_competition for l in moe_layers(model))
            unused = detach or getattr(model, "may_skip_parameters", False)
            self.train_model = DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                                   find_unused_parameters=unused, **_no_buffer_broadcast(DDP))
        else:  # fsdp: every layer unit its own FSDP2 unit, the rest (embedding, head, final norm) the root's
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            world_mesh = init_device_mesh(self.device.type, (self.world,))
            units = layer_units(model)
            for unit in units:
                fully_shard(unit, mesh=world_mesh, ignored_params={p for p in unit.parameters() if p in experts} or None)
            fully_shard(model, mesh=world_mesh, ignored_params=experts or None)
        log(f"distributed: {self.world} processes ({dist.get_backend()}), {self.parallel}"
            f"{f' ({len(units)} layer units + the root)' if self.parallel == 'fsdp' else ''}"
            f"{f' x expert parallel {self.ep}' if self.ep > 1 else ''}")
        return self.train_model

    def adapt_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """FSDP2 with expert parallelism mixes DTensor weights and plain expert shards in one param group,
        which the fused multi-tensor (foreach) update refuses: those groups update tensor by tensor."""
        for g in optimizer.param_groups:
            kinds = {hasattr(p, "device_mesh") for p in g["params"]}
            if len(kinds) > 1:
                g["foreach"] = False
        return optimizer

    @contextlib.contextmanager
    def sync_context(self, last: bool):
        """Gradients are reduced over ranks on the last micro-batch of an optimizer step only."""
        m = self.train_model
        if self.world > 1 and self.parallel == "ddp" and not last:
            with m.no_sync():
                yield
            return
        if self.world > 1 and self.parallel == "fsdp":
            m.set_requires_gradient_sync(last)
        yield

    # --- per step ---------------------------------------------------------------------------------
    def expert_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for name, p in model.named_parameters() if name in self.expert_names]

    def after_backward(self, model: nn.Module) -> None:
        """Expert weights' gradients: Σ over the P/E replicas of each expert, / P (as DDP averages the
        rest: the global loss is the mean of the ranks' losses). DeepSeek-V3 expert loads: Σ over ranks."""
        if self.world == 1:
            return
        for p in self.expert_params(model):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.edp_group is not None and dist.get_world_size(self.edp_group) > 1:
                dist.all_reduce(p.grad, group=self.edp_group)
            p.grad.div_(self.world)
        for layer in moe_layers(model):
            load = getattr(layer.router, "load", None)
            if load is not None and getattr(layer.router, "bias_balance", False):
                dist.all_reduce(load)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm (all weights, each counted once), clipped to max_norm when > 0."""
        params = [p for p in model.parameters() if p.grad is not None]
        experts = set(self.expert_params(model))
        if not experts:
            if max_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        dense = torch.nn.utils.get_total_norm([p.grad for p in params if p not in experts])
        dense = dense.full_tensor() if hasattr(dense, "full_tensor") else dense
        expert_sq = torch.nn.utils.get_total_norm([p.grad for p in params if p in experts]).square()
        dist.all_reduce(expert_sq, group=self.ep_group)   # replicas agree; the E ranks of a group add up
        norm = (dense.square() + expert_sq).sqrt()
        if max_norm > 0:   # torch's clip coefficient; grads one by one (FSDP2 DTensors and plain expert shards)
            coef = min(1.0, max_norm / (float(norm) + 1e-6))
            for p in params:
                p.grad.mul_(coef)
        return norm

    def reduce_metrics(self, micro: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Each micro-batch's scalars averaged over ranks (one all-reduce)."""
        if self.world == 1:
            return micro
        keys = [list(m) for m in micro]
        flat = torch.stack([m[k].detach().float().to(self.device) for m, ks in zip(micro, keys) for k in ks])
        dist.all_reduce(flat)
        flat = (flat / self.world).cpu()
        out, i = [], 0
        for ks in keys:
            out.append({k: flat[i + n] for n, k in enumerate(ks)})
            i += len(ks)
        return out

    def total(self, n: int) -> int:
        """n summed over ranks."""
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def all_agree(self, ok: bool) -> bool:
        """True only if `ok` on every rank (so all ranks skip, or all take, the same optimizer step)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(flag, dist.ReduceOp.MIN)
        return bool(flag.item())

    def check_schedule(self, schedule) -> None:
        """All ranks must compete on the same layers at the same steps: compare the table's digest."""
        if self.world == 1:
            return
        digests = [None] * self.world
        dist.all_gather_object(digests, schedule_digest(schedule))
        if len(set(digests)) > 1:
            groups = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            detail = "; ".join(f"ranks {rs}: {d[:12]}" for d, rs in groups.items())
            raise DistributedError("the competition schedule differs between ranks (" + detail + "); every rank "
                                   "must run the same train.steps, train.schedule.* and model.n_layers")

    def shard_batches(self, batches):
        if self.world == 1:
            return batches
        from ..data.batches import RankShard
        return RankShard(batches, self.rank, self.world)

    # --- checkpoints ------------------------------------------------------------------------------
    def model_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """{"model": name -> tensor, "optim": name -> {state tensors}} in this run's layout, sharing storage
        with the live weights and optimizer state: FSDP2 weights are DTensors already, expert shards
        become DTensor views (Shard(0) over "ep", Replicate over "dp"). DCP reshards between layouts."""
        if hasattr(model, "reshard"):   # FSDP2 keeps the root unsharded after a forward without backward (eval)
            model.reshard()
        ensure_optimizer_state(optimizer)
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        msd = dict(model.state_dict())
        osd = {names[id(p)]: dict(optimizer.state[p]) for g in optimizer.param_groups for p in g["params"]}
        if self.expert_names:
            from torch.distributed.tensor import DTensor, Replicate, Shard
            view = lambda t: DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)
            for name in self.expert_names:
                msd[name] = view(msd[name])
                osd[name] = {k: view(v) if v.dim() else v for k, v in osd[name].items()}
        return {"model": msd, "optim": osd}

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every weight whole, on the CPU of rank 0 (None on the other ranks); every rank must call it.
        FSDP2 shards are gathered by torch.distributed.checkpoint's `get_model_state_dict(full_state_dict=True,
        cpu_offload=True)`; the expert slices of expert parallelism (plain tensors FSDP2 ignores) are
        all-gathered over their group into the [N, ...] tensors of the single-process model."""
        if hasattr(model, "reshard"):   # FSDP2 keeps the root unsharded after a forward without backward (eval)
            model.reshard()
        if self.world == 1 or not self.sharded:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.is_main else None
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = model.state_dict()
        for name in sorted(self.expert_names):   # same order on every rank: one all_gather each
            local = model.get_parameter(name).detach()
            parts = [torch.empty_like(local) for _ in range(self.ep)]
            dist.all_gather(parts, local.contiguous(), group=self.ep_group)
            state[name] = torch.cat(parts)
        return {k: v.detach().cpu() for k, v in state.items()} if self.is_main else None

    def save(self, ckpt_root, step, model, optimizer, trainer_state: dict, config_yaml: str, keep_last=None,
             tokenizer_json=None):
        """A sharded checkpoint (every rank calls this): weights and optimizer state through DCP, the rest
        (rank 0's schedule, RNG, data position, counters, optimizer hyper-parameters) in trainer.pt."""
        from . import checkpoint as ckpt
        state = {k: v for k, v in trainer_state.items() if k != "optimizer"}
        state.update(optimizer_groups=optimizer_groups(optimizer), world_size=self.world, expert_parallel=self.ep)
        return ckpt.save_sharded(ckpt_root, step, self.model_state(model, optimizer), state, config_yaml,
                                 keep_last=keep_last, tokenizer_json=tokenizer_json)

    def load_state(self, model, optimizer, path, tensors, state, load_weights) -> None:
        """Weights and optimizer state from a checkpoint of any layout into this run's."""
        from . import checkpoint as ckpt
        if ckpt.is_sharded(path):
            target = self.model_state(model, optimizer)
            ckpt.load_shards(path, target)
            _set_groups(optimizer, state["optimizer_groups"])
            return
        if not self.sharded:                      # single-process format into a replicated model: as always
            load_weights(model, tensors, path)
            optimizer.load_state_dict(state["optimizer"])
            return
        # single-process format into shards: each rank copies its slices of the full tensors
        target = self.model_state(model, optimizer)
        from .runs import tied_names
        missing = set(target["model"]) - set(tensors) - tied_names(model)
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}")
        for name, t in target["model"].items():
            if name in tensors:
                copy_full(t, tensors[name])
        full = state["optimizer"]
        order = [n for g in optimizer.param_groups for n in _group_names(model, g)]
        for i, name in enumerate(order):
            for k, t in target["optim"][name].items():
                if i in full["state"]:   # a parameter without state there (never had a gradient) keeps zeros
                    copy_full(t, full["state"][i][k])
        _set_groups(optimizer, full["param_groups"])


def _no_buffer_broadcast(ddp_class) -> dict:
    """Buffers are never broadcast from rank 0 in forward: the DeepSeek-V3 load counts are rank-local until
    `after_backward` sums them, and the balancing bias stays equal on every rank because it is updated from
    that sum. (torch 2.13 renamed the option.)"""
    import inspect
    params = inspect.signature(ddp_class.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The model's repeated layers, the unit of FSDP2 sharding and of activation checkpointing: an
    `MoETransformer`'s blocks, or what the model names with `layer_units()` (a Hugging Face model's
    decoder layers and vision-encoder layers, `finetune.HFCausalLM`)."""
    if hasattr(model, "layer_units"):
        return list(model.layer_units())
    return list(getattr(model, "blocks", []))


def checkpoint_activations(model: nn.Module) -> int:
    """Activation checkpointing per layer unit: each unit's forward keeps only its inputs and recomputes its
    activations in backward (torch.utils.checkpoint, non-reentrant, RNG state preserved). The module tree
    and parameter names are unchanged (the unit's `forward` is wrapped in place), so checkpoints, FSDP2
    and expert parallelism see the same model. Returns the number of units."""
    import functools
    from torch.utils.checkpoint import checkpoint
    units = layer_units(model)
    for unit in units:
        def forward(*args, _inner=unit.forward, **kwargs):
            if not torch.is_grad_enabled():   # evaluation: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        unit.forward = functools.wraps(unit.forward)(forward)
    return len(units)


class NoMetrics:
    """The metrics writer of ranks other than 0."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def schedule_digest(schedule) -> str:
    s = schedule.state_dict()
    head = json.dumps({k: s[k] for k in ("n_layers", "total_steps", "config", "step")}, sort_keys=True)
    return hashlib.sha256(head.encode() + s["table"].numpy().tobytes()).hexdigest()


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (zeros) where a parameter has none yet (no step ran, or it never had a
    gradient: a weight the forward does not use), so that it can be saved and loaded in place: one step at
    lr 0 with zero gradients for those parameters alone; every other parameter (gradient None) is skipped,
    its moments and step count untouched."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = {p for p in params if p not in optimizer.state}
    if not missing:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p) if p in missing else None
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, gr in zip(params, grads):
        p.grad = gr


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The hyper-parameters of each param group (everything but the parameters)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]


def _set_groups(optimizer, groups: list[dict]) -> None:
    """Saved hyper-parameters (lr, betas, weight decay, ...); how the update runs (foreach) stays this run's."""
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: v for k, v in saved.items() if k not in ("params", "foreach")})


def _group_names(model, group) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for p in group["params"]]


def copy_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of a full tensor into `target` (a plain tensor or a DTensor view)."""
    full = full.to(target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        local = target.to_local()
        piece = distribute_tensor(full.to(local.device), target.device_mesh, target.placements, src_data_rank=None)
        local.copy_(piece.to_local())
        return
    if target.shape != full.shape:
        raise DistributedError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit {tuple(target.shape)}")
    target.copy_(full.to(target.device))


def is_main_process() -> bool:
    """Rank 0 of the process group, or a single process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def setup(train_cfg, device: torch.device, log=print) -> Dist:
    """The process group from torchrun's environment (nothing to do for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel, ep = train_cfg.parallel, train_cfg.expert_parallel
    if world == 1:
        if ep > 1:
            raise DistributedError(f"train.expert_parallel={ep} needs {ep} processes (torchrun --nproc-per-node {ep}); "
                                   "this is a single process")
        return Dist(device=device, parallel=parallel)
    if parallel == "none":
        raise DistributedError(f"started as {world} processes but train.parallel=none; use ddp or fsdp")
    if world % ep:
        raise DistributedError(f"train.expert_parallel={ep} must divide the number of processes ({world})")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    d = Dist(rank=rank, world=world, local_rank=local_rank, device=device, parallel=parallel, ep=ep)
    if ep > 1:
        from torch.distributed.device_mesh import init_device_mesh
        d.mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        d.ep_group, d.edp_group = d.mesh["ep"].get_group(), d.mesh["dp"].get_group()
    return d
