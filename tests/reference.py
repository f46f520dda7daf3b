"""Naive references for the tests: plain loops over tokens and experts, written from the paper's equations.
Also `saved_storages`, the memory tests' one measure of what autograd keeps for backward.

Nothing here imports the library's math; only parameters are read from the modules under test.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch


@contextmanager
def saved_storages(exclude=()):
    """{storage pointer: bytes} of every distinct storage autograd saves for backward inside the block,
    except the storages of the tensors in `exclude` (parameters, inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def act(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.clamp(h, min=0)
    if name == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    if name == "silu":
        return h / (1 + torch.exp(-h))
    if name == "quick_gelu":
        return h / (1 + torch.exp(-1.702 * h))
    if name == "tanh":
        return (torch.exp(h) - torch.exp(-h)) / (torch.exp(h) + torch.exp(-h))
    raise ValueError(name)


# Gated activations: name -> the gate's activation (φ(gate) ⊙ up).
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def expert_out(experts, e: int, x_D: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """g_e(x) for one token, from the stacked weights; `activation` names φ (default: the experts' own name)."""
    activation = activation or experts.activation
    h = experts.w1[e] @ x_D                      # w1: [N, H_in, D] (out, in)
    if experts.b1 is not None:
        h = h + experts.b1[e]
    if activation in GATED:
        H = experts.d_expert
        gate, up = h[:H], h[H:]
        h = act(GATED[activation], gate) * up
    else:
        h = act(activation, h)
    out = experts.w2[e] @ h                      # w2: [N, O, H]
    if experts.b2 is not None:
        out = out + experts.b2[e]
    return out


def sparse_moe(experts, x_TD, idx_TK, w_TK, activation: str | None = None) -> torch.Tensor:
    """y_t = Σ_k w_tk g_{idx_tk}(x_t), token by token ([T, O])."""
    T, K = idx_TK.shape
    rows = []
    for t in range(T):
        acc = x_TD.new_zeros(experts.w2.shape[1])
        for k in range(K):
            acc = acc + w_TK[t, k] * expert_out(experts, int(idx_TK[t, k]), x_TD[t], activation)
        rows.append(acc)
    return torch.stack(rows)


def softmax(v: list[float] | torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v)
    e = torch.exp(v - v.max())
    return e / e.sum()


def topk_indices(v: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries, by a full sort."""
    v = v.detach()
    return sorted(range(len(v)), key=lambda i: -float(v[i]))[:k]


def router_reference(router_name: str, router, x_TD: torch.Tensor, k: int, opts) -> tuple[torch.Tensor, list, list]:
    """(logits_TN, idx per token, weights per token) computed token by token."""
    logits, idx, weights = [], [], []
    for t in range(x_TD.shape[0]):
        x = x_TD[t].double()
        if router_name in ("xmoe", "pcosine"):
            z = router.proj.weight.double() @ x
            eps = opts.cosine_eps if router_name == "pcosine" else 0.0
            h = torch.stack([
                (z @ e) / ((z.norm() + eps) * (e.norm() + eps)) / opts.temperature
                for e in router.expert_emb.double()])
        else:
            h = router.gate.weight.double() @ x
            if router.gate.bias is not None:
                h = h + router.gate.bias.double()
        if router_name in ("moeut", "sharede_v3"):
            s = 1 / (1 + torch.exp(-h))
            sel = s + router.expert_bias.double() if router_name == "sharede_v3" and opts.bias_balance else s
            I = topk_indices(sel, k)
            w = s[I]
            if router_name == "sharede_v3":
                w = opts.routed_scale * w / w.sum()
            elif opts.normalize:
                w = w / w.sum()
        else:
            I = topk_indices(h, k)
            w = softmax(h[I])
        logits.append(h)
        idx.append(I)
        weights.append(w)
    return torch.stack(logits), idx, weights


def kappa(name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "softplus":
        return torch.log1p(torch.exp(v))
    if name == "sigmoid":
        return 1 / (1 + torch.exp(-v))
    return act(name, v)


def competition_reference(experts, x_TD, k: int, kappa_name: str, eps: float):
    """Per token: all expert outputs, affinities, winners, normalised weights, output."""
    N = experts.n_experts
    winners, weights, ys, affs = [], [], [], []
    for t in range(x_TD.shape[0]):
        outs = [expert_out(experts, e, x_TD[t]).double() for e in range(N)]
        if kappa_name == "norm":
            a = torch.stack([o.pow(2).sum().sqrt() for o in outs])
        elif kappa_name == "softmax":  # softmax across experts for each output coordinate, then mean
            O = torch.stack(outs)
            a = torch.stack([
                torch.stack([torch.exp(O[i, d]) / torch.exp(O[:, d]).sum() for d in range(O.shape[1])]).mean()
                for i in range(N)])
        else:
            a = torch.stack([kappa(kappa_name, o).mean() for o in outs])
        I = topk_indices(a, k)
        aw = torch.clamp(a[I], min=eps)
        s = aw / aw.sum()
        ys.append(sum(s[j] * outs[i] for j, i in enumerate(I)))
        winners.append(I)
        weights.append(s)
        affs.append(a)
    return winners, weights, torch.stack(ys), torch.stack(affs)


def distill_reference(logits_TN, target_TN, winners, alpha: float, k: int) -> float:
    total = 0.0
    T, N = logits_TN.shape
    target_TN = target_TN.detach()
    for t in range(T):
        p = softmax(logits_TN[t].detach().double())
        mse = sum(float(p[i] - target_TN[t, i]) ** 2 for i in range(N)) / N
        reg = sum(float(target_TN[t, j] - p[j]) ** 2 for j in winners[t])
        total += mse + alpha / k * reg
    return total / T


def diversity_reference(out_TKD) -> float:
    T, K, _ = out_TKD.shape
    out_TKD = out_TKD.detach()
    total = 0.0
    for t in range(T):
        s = 0.0
        for i in range(K):
            for j in range(K):
                if i != j:
                    a, b = out_TKD[t, i].double(), out_TKD[t, j].double()
                    if a.norm() > 0 and b.norm() > 0:  # a zero output has no direction: similarity 0
                        s += float(a @ b / (a.norm() * b.norm()))
        total += s / (K * (K - 1))
    return total / T


def switch_reference(logits_TN, idx) -> float:
    T, N = logits_TN.shape
    counts = [0] * N
    for row in idx:
        for e in row:
            counts[int(e)] += 1
    n_assign = sum(counts)
    P = [sum(float(softmax(logits_TN[t].detach().double())[i]) for t in range(T)) / T for i in range(N)]
    return N * sum(counts[i] / n_assign * P[i] for i in range(N))


def entropy_reference(logits_BSN) -> float:
    B, S, N = logits_BSN.shape
    total = 0.0
    for b in range(B):
        p = [sum(float(softmax(logits_BSN[b, s].detach().double())[i]) for s in range(S)) / S for i in range(N)]
        total += sum(pi * math.log(pi) for pi in p if pi > 0)
    return total / B


def zloss_reference(logits_TN) -> float:
    return sum(float(torch.log(torch.exp(row.detach().double()).sum())) ** 2 for row in logits_TN) / logits_TN.shape[0]
