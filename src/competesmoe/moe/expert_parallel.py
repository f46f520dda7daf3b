"""Expert parallelism: the experts of one MoE layer split over the E ranks of a process group.

`ExpertParallelExperts` replaces a layer's `Experts` and keeps its contract with global expert ids:
  * `forward(x_TD, idx_TK)` -> out_TKD: each (token, choice) pair travels to the rank that holds its
    expert, is computed there, and comes back (two all-to-all exchanges, differentiable);
  * `forward_all(x_TD)`     -> out_NTD: every rank's tokens go to every rank, each runs its own experts
    on all of them and sends the outputs back;
  * `all_affinities(x_TD, kappa, chunk)` -> (a_TN, lse_TD): the competition's all-expert pass
    (Section 2.2, steps 1-2) where each rank scores its own experts on every rank's tokens and only
    the affinities (T·N scalars, not T·N·D outputs) travel back; the token's owner then picks the
    winners among all N experts, so the choice is global.
Rank j of the group holds experts [j·N/E, (j+1)·N/E); its parameters are named and laid out as in
`Experts` (w1 [N/E, H, D], ...), so a checkpoint maps them onto slices of the full tensors.

Each rank computes exactly what the single-process layer computes on its own tokens; a rank's
tokens may differ from another's (data parallelism), and every rank of the group must call the same
layers in the same order (the competition schedule is the same on every rank).

The exchange is `torch.distributed.all_to_all_single` where the backend has it (NCCL; gloo in
torch >= 2.x on CPU as well), else an emulation with `all_gather` of padded buffers; `exchange="auto"`
probes the backend once per group. Shapes: T tokens, D d_model, N experts (global), K choices, E ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import competition as comp
from .experts import Experts
from .kernels.plan import SortedPairs
from .precision import compute_dtype, fp32

EXCHANGES = ("auto", "all_to_all", "all_gather")
_PROBED: dict[int, str] = {}   # id(group) -> the exchange that works on it


def exchange_method(group, requested: str = "auto") -> str:
    """"all_to_all" when the group's backend runs `all_to_all_single` (probed once), else "all_gather"."""
    if requested not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {requested!r}")
    if requested != "auto":
        return requested
    key = id(group)
    if key not in _PROBED:
        E = dist.get_world_size(group)
        probe = torch.zeros(E, device=_device(group))
        try:
            dist.all_to_all_single(torch.empty_like(probe), probe, group=group)
            _PROBED[key] = "all_to_all"
        except (RuntimeError, NotImplementedError):   # every rank's backend refuses it the same way
            _PROBED[key] = "all_gather"
    return _PROBED[key]


def _device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def all_gather_sizes(sizes: torch.Tensor, group) -> torch.Tensor:
    """[E, *sizes.shape]: every rank's integer vector (counts, lengths)."""
    parts = [torch.empty_like(sizes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sizes.contiguous(), group=group)
    return torch.stack(parts)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group, method: str) -> torch.Tensor:
    """Rows x[sum(send[:r]) : sum(send[:r+1])] go to rank r; returns the rows received, by source rank."""
    x = x.contiguous()
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    if method == "all_to_all":
        dist.all_to_all_single(out, x, recv, send, group=group)
        return out
    # all_gather emulation: every rank's send buffer, padded to the longest, reaches every rank, which
    # keeps the rows addressed to it. Costs E times the bytes of a true all-to-all.
    me, E = dist.get_rank(group), dist.get_world_size(group)
    send_EE = all_gather_sizes(torch.tensor(send, dtype=torch.int64, device=x.device), group).tolist()
    longest = max(sum(row) for row in send_EE)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    bufs = [torch.empty_like(padded) for _ in range(E)]
    dist.all_gather(bufs, padded, group=group)
    pieces = [bufs[src][sum(send_EE[src][:me]):sum(send_EE[src][:me + 1])] for src in range(E)]
    return torch.cat(pieces) if pieces else out


class _Exchange(torch.autograd.Function):
    """`_exchange` with autograd: the gradient makes the same trip backwards (send and recv swapped)."""

    @staticmethod
    def forward(ctx, x, send, recv, group, method):
        ctx.args = (send, recv, group, method)
        return _exchange(x, send, recv, group, method)

    @staticmethod
    def backward(ctx, g):
        send, recv, group, method = ctx.args
        return _exchange(g, recv, send, group, method), None, None, None, None


def exchange(x: torch.Tensor, send: list[int], recv: list[int], group, method: str) -> torch.Tensor:
    return _Exchange.apply(x, send, recv, group, method)


class ExpertParallelExperts(Experts):
    """This rank's N/E experts of a layer, with the `Experts` contract over all N (global ids)."""

    exchanges_tokens = True

    def __init__(self, full: Experts, group, exchange: str = "auto") -> None:
        E, j = dist.get_world_size(group), dist.get_rank(group)
        if full.n_experts % E:
            raise ValueError(f"expert parallelism over {E} ranks needs n_experts divisible by {E}, "
                             f"got {full.n_experts}")
        n = full.n_experts // E
        with torch.device("meta"):   # no allocation and no random init: the weights are the full ones' slice
            super().__init__(n, full.d_model, full.d_expert, full.act, full.b1 is not None, full.backend, full.d_out)
        for name in ("w1", "w2", "b1", "b2"):
            p = getattr(full, name)
            if p is not None:
                setattr(self, name, torch.nn.Parameter(p.detach()[j * n:(j + 1) * n].clone(),
                                                       requires_grad=p.requires_grad))
        self.n_global, self.ep_size, self.ep_rank, self.group = full.n_experts, E, j, group
        self.exchange = exchange_method(group, exchange)

    def extra_repr(self) -> str:
        return (f"experts {self.ep_rank * self.n_experts}..{(self.ep_rank + 1) * self.n_experts - 1} of "
                f"{self.n_global} (rank {self.ep_rank} of {self.ep_size}, {self.exchange}), " + super().extra_repr())

    def _local_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        return Experts.forward_all(self, x_TD)   # this rank's experts on every token: [N/E, T, D]

    # --- sparse dispatch ---------------------------------------------------------------------------
    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Expert `idx_TK[t, k]` (global id) applied to token t: [T, K, D] (unweighted)."""
        T, K = idx_TK.shape
        E, n, j = self.ep_size, self.n_experts, self.ep_rank
        plan = SortedPairs.of(idx_TK, self.n_global)            # pairs sorted by expert, hence by owner rank
        order_M, counts_N = plan.pair_M, plan.count_N
        counts_EN = all_gather_sizes(counts_N, self.group)      # [source rank, expert]: pairs each rank sends
        send = counts_N.view(E, n).sum(1).tolist()
        mine_En = counts_EN[:, j * n:(j + 1) * n]               # pairs for my experts, from each source
        recv = mine_En.sum(1).tolist()
        x_MD = x_TD.to(compute_dtype(x_TD)).index_select(0, plan.token_M)   # bf16 under autocast: half the bytes
        x_RD = exchange(x_MD, send, recv, self.group, self.exchange)
        local_R = torch.arange(n, device=x_TD.device).repeat(E).repeat_interleave(mine_En.reshape(-1))
        # Nothing for my experts: still an output [0, d_out] tied to the graph, so this rank joins the backward
        # exchanges (and receives rows as wide as the other ranks' outputs).
        out_RD = (super().forward(x_RD, local_R[:, None]).squeeze(1) if len(x_RD)
                  else x_RD[:, :1].expand(-1, self.d_out) * 0)
        out_MD = exchange(out_RD, recv, send, self.group, self.exchange)
        return out_MD.index_select(0, order_M.argsort()).view(T, K, -1)

    # --- all experts on all tokens -----------------------------------------------------------------
    def _gather_tokens(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Every rank's tokens, by rank: [sum(T_r), D], and the T_r."""
        sizes = all_gather_sizes(torch.tensor([x_TD.shape[0]], device=x_TD.device), self.group)[:, 0].tolist()
        x_AD = exchange(x_TD.to(compute_dtype(x_TD)).repeat(self.ep_size, 1), [x_TD.shape[0]] * self.ep_size, sizes, self.group,
                        self.exchange)
        return x_AD, sizes

    def forward_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert (all ranks') applied to every token of this rank: [N, T, D]."""
        T, E = x_TD.shape[0], self.ep_size
        x_AD, sizes = self._gather_tokens(x_TD)
        out_AnD = self._local_all(x_AD).transpose(0, 1)          # [sum T_r, N/E, D], rows by token owner
        back = exchange(out_AnD.reshape(x_AD.shape[0], -1), sizes, [T] * E, self.group, self.exchange)
        return back.view(E, T, self.n_experts, -1).permute(0, 2, 1, 3).reshape(self.n_global, T, -1)

    @torch.no_grad()
    def all_affinities(self, x_TD: torch.Tensor, kappa: str, chunk_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`competition.all_affinities` with each rank scoring its own experts on every rank's tokens:
        a_TN (global expert order) and, for `softmax`, the log-normaliser over all N experts, lse_TD."""
        T, E, j = x_TD.shape[0], self.ep_size, self.ep_rank
        x_AD, sizes = self._gather_tokens(x_TD)
        lse_AD = None
        if kappa == "softmax":   # per-coordinate logsumexp over all experts = over the ranks' partial ones
            lse_AD = torch.cat([fp32(self._local_all(c)).logsumexp(dim=0) for c in x_AD.split(chunk_tokens)])
            top = lse_AD.clone()
            dist.all_reduce(top, dist.ReduceOp.MAX, group=self.group)
            total = (lse_AD - top).exp()
            dist.all_reduce(total, group=self.group)
            lse_AD = top + total.log()
        a_An = torch.cat([comp.affinity(fp32(self._local_all(c)), kappa, None if lse_AD is None else l).T
                          for c, l in zip(x_AD.split(chunk_tokens),
                                          lse_AD.split(chunk_tokens) if lse_AD is not None else _nones())])
        back = exchange(a_An, sizes, [T] * E, self.group, self.exchange)          # [E·T, N/E] by expert owner
        a_TN = back.view(E, T, self.n_experts).transpose(0, 1).reshape(T, self.n_global)
        lse_TD = None if lse_AD is None else lse_AD[sum(sizes[:j]):sum(sizes[:j + 1])]
        return a_TN, lse_TD


def _nones():
    while True:
        yield None
