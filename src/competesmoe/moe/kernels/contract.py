"""The contract every fused dispatch operator pair shares (`looped`, `triton_moe`): shapes for
torch.compile's fake tensors, autograd, and the call that decides what to keep for backward.

forward(x_TD, w1, b1, w2, b2, w_TK, idx_TK, act: str, keep: bool) -> (out, h_MH)
    out = Σ_k w_tk g_{idx_tk}(x_t) [T, O] when w_TK is given, else g_{idx_tk}(x_t) [T, K, O];
    h_MH = the sorted pre-activations [T·K, H_in] kept for backward (`keep`), else [0, H_in].
backward(g, x_TD, w1, b1, w2, b2, w_TK, idx_TK, h_MH, act: str, needs: list[bool]) -> [dx, dW1, db1, dW2, db2, dw_TK]
    an input that `needs` no gradient (frozen, or absent) gets an empty tensor.
"""
from __future__ import annotations

import torch


def _fake_forward(x_TD, w1, b1, w2, b2, w_TK, idx_TK, act, keep):
    T, K = idx_TK.shape
    O = w2.shape[1]
    out = x_TD.new_empty(T, O) if w_TK is not None else x_TD.new_empty(T, K, O)
    return out, x_TD.new_empty(T * K if keep else 0, w1.shape[1])


def _fake_backward(g, x_TD, w1, b1, w2, b2, w_TK, idx_TK, h_MH, act, needs):
    like = (x_TD, w1, b1, w2, b2, w_TK)
    return [torch.empty_like(t) if n and t is not None else x_TD.new_empty(0) for t, n in zip(like, needs)]


def register(forward, backward) -> None:
    """Give a forward/backward custom-operator pair its fake implementations and its autograd formula."""
    forward.register_fake(_fake_forward)
    backward.register_fake(_fake_backward)

    def setup_context(ctx, inputs, output):
        x_TD, w1, b1, w2, b2, w_TK, idx_TK, act, keep = inputs
        ctx.save_for_backward(x_TD, w1, b1, w2, b2, w_TK, idx_TK, output[1])   # indices too: saved-tensor hooks see them
        ctx.act, ctx.keep = act, keep
        ctx.mark_non_differentiable(output[1])

    def grad(ctx, g, _):
        x_TD, w1, b1, w2, b2, w_TK, idx_TK, h_MH = ctx.saved_tensors
        if not ctx.keep:
            raise RuntimeError(f"{forward} ran without keeping its pre-activations (no input required a gradient)")
        needs = list(ctx.needs_input_grad[:6])
        grads = backward(g, x_TD, w1, b1, w2, b2, w_TK, idx_TK, h_MH, ctx.act, needs)
        return (*[gr if n else None for gr, n in zip(grads, needs)], None, None, None)

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def call(forward, x_TD, w1, b1, w2, b2, idx_TK, act: str, w_TK=None) -> torch.Tensor:
    """The operator's output, keeping the pre-activations only when some input needs a gradient."""
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_TD, w1, b1, w2, b2, w_TK))
    return forward(x_TD, w1, b1, w2, b2, w_TK, idx_TK, act, keep)[0]
