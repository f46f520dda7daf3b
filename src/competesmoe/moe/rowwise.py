"""Row-block evaluation with recomputation: reductions over large rows without full-size float32 copies.

`rowwise(fn, x)` evaluates fn on blocks of rows of x; with a gradient it keeps only x for backward and
recomputes each block there, so fn's float32 temporaries exist for one block at a time and backward
writes a single gradient of x's size. The competition (affinity, winner weights, diversity) and the
language-model loss over a large vocabulary use it.
"""
from __future__ import annotations

import torch

from .kernels.plan import block_elements as default_block_elements


class _RowwiseRecompute(torch.autograd.Function):
    """fn(x, *consts) block by block along dim 0; backward recomputes fn per block (no saved temporaries).

    fn returns one tensor or a tuple of tensors, each with the rows of x along dim 0.
    """

    @staticmethod
    def forward(ctx, fn, rows: int, x, *consts):
        ctx.fn, ctx.rows = fn, rows
        ctx.save_for_backward(x, *consts)
        return _blocks(fn, rows, x, consts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *g):
        x, *consts = ctx.saved_tensors
        gx = torch.empty_like(x)           # the only full-size buffer: one gradient for every output
        for i in range(0, x.shape[0], ctx.rows):
            # the recompute runs as forward did (autocast off), wherever backward is called from
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                xb = x[i:i + ctx.rows].detach().requires_grad_()
                yb = ctx.fn(xb, *(c[i:i + ctx.rows] for c in consts))
                yb = yb if isinstance(yb, tuple) else (yb,)
                used = [(y, gi[i:i + ctx.rows]) for y, gi in zip(yb, g) if y.requires_grad]
                gb = torch.autograd.grad([y for y, _ in used], xb, [gi for _, gi in used], allow_unused=True)[0]
            gx[i:i + ctx.rows] = 0 if gb is None else gb
        return (None, None, gx) + (None,) * len(consts)


def _blocks(fn, rows, x, consts):
    outs = [fn(xb, *cb) for xb, *cb in zip(x.split(rows), *(c.split(rows) for c in consts))]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def rowwise(fn, x: torch.Tensor, *consts: torch.Tensor, block_elements: int | None = None):
    """fn applied to blocks of rows of x (dim 0) with the matching rows of `consts` (no gradient for them).

    fn must treat rows independently and may return a tuple. With a gradient, only x and consts are kept
    for backward, and backward materialises a single gradient of x's size. `block_elements` overrides the
    device's default block size (elements of x per block).
    """
    if any(c.requires_grad for c in consts):
        raise ValueError("rowwise: the constant inputs must not require a gradient")
    row = max(1, x[:1].numel())
    budget = block_elements or default_block_elements(x.device)   # fn's float32 temporaries: a few times this
    rows = max(1, budget // row)
    with torch.autocast(x.device.type, enabled=False):   # explicit float32 inside fn; same in backward
        if torch.compiler.is_compiling():   # the compiler plans memory (and recomputation) itself
            return fn(x, *consts)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return _blocks(fn, rows, x, consts)
        return _RowwiseRecompute.apply(fn, rows, x, *consts)
