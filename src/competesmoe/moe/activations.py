"""One activation contract for every dispatch path: φ, and dφ from the same definition.

An `Activation` is looked up by a string key (the kernels are custom operators, which take strings, not
callables). Built-in keys have a closed-form derivative from aten's own backward ops; any other callable
(a Hugging Face MLP's `act_fn`, say) is registered under a key of its own and differentiated by autograd
of that callable, unless it is numerically the same function as a built-in, in which case the built-in's
closed form is used: the match is checked on a probe grid, values and derivatives, before it is trusted.
Gated activations (Llama's `silu(gate) * up`, Gemma's `gelu_tanh(gate) * up`) split [gate | up] in halves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Fn = Callable[[torch.Tensor], torch.Tensor]
Grad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (h, dL/dφ) -> dL/dh


def _quick_gelu(h: torch.Tensor) -> torch.Tensor:     # CLIP's activation: h·σ(1.702 h)
    return h * torch.sigmoid(1.702 * h)


def _quick_gelu_grad(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(1.702 * h)
    return g * (s + 1.702 * h * s * (1 - s))


# name -> (φ, dφ): the closed forms (aten's own backward formulas where aten has one).
BUILTIN: dict[str, tuple[Fn, Grad]] = {
    "relu": (F.relu, lambda h, g: torch.ops.aten.threshold_backward(g, h, 0)),
    "gelu": (F.gelu, lambda h, g: torch.ops.aten.gelu_backward(g, h)),
    "gelu_tanh": (lambda h: F.gelu(h, approximate="tanh"),
                  lambda h, g: torch.ops.aten.gelu_backward(g, h, approximate="tanh")),
    "silu": (F.silu, lambda h, g: torch.ops.aten.silu_backward(g, h)),
    "quick_gelu": (_quick_gelu, _quick_gelu_grad),
}
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}   # gated config names -> the gate's φ


@dataclass(frozen=True)
class Activation:
    """φ(h) for h [.., H_in]; gated: φ(gate) ⊙ up with h = [gate | up]."""
    key: str
    fn: Fn
    grad_fn: Grad | None        # closed form of dφ/dh, or None: autograd through `fn`
    gated: bool

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fn(gate) * up
        return self.fn(h)

    def grad(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """dL/dh from dL/dφ(h) = g, without keeping a graph."""
        if not self.gated:
            return self._elementwise_grad(h, g)
        gate, up = h.chunk(2, dim=-1)
        return torch.cat([self._elementwise_grad(gate, g * up), g * self.fn(gate)], dim=-1)

    def _elementwise_grad(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.grad_fn is not None:
            return self.grad_fn(h, g)
        # torch.func, not torch.autograd: this also runs inside the kernels' custom operators, where the
        # autograd dispatch keys are excluded
        return torch.func.vjp(self.fn, h.detach())[1](g)[0]


_REGISTRY: dict[str, Activation] = {}


def _register(act: Activation) -> Activation:
    _REGISTRY.setdefault(act.key, act)
    return _REGISTRY[act.key]


def lookup(key: str) -> Activation:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"unknown activation key {key!r}; known: {sorted(_REGISTRY)}") from None


def named(name: str) -> Activation:
    """A config's `activation` ("relu", "gelu", "silu", "swiglu", ...) as an `Activation`."""
    base, gated = (GATED[name], True) if name in GATED else (name, False)
    if base not in BUILTIN:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(BUILTIN) + sorted(GATED)}")
    fn, grad = BUILTIN[base]
    return _register(Activation(name, fn, grad, gated))


def _probe(dtype: torch.dtype) -> torch.Tensor:
    # explicit device: models are often built under `with torch.device("meta")` (from_pretrained)
    return torch.cat([torch.linspace(-8, 8, 401, dtype=dtype, device="cpu"),
                      torch.tensor([0.0, 1e-3, -1e-3, 30.0, -30.0], dtype=dtype, device="cpu")])


def same_function(fn: Fn, builtin: str) -> bool:
    """Whether `fn` and the built-in have the same values and derivatives on a probe grid (float64)."""
    ref_fn, ref_grad = BUILTIN[builtin]
    h = _probe(torch.float64).requires_grad_()
    try:
        y = fn(h)
        if not isinstance(y, torch.Tensor) or y.shape != h.shape or y.dtype != h.dtype:
            return False
        dy = torch.autograd.grad(y, h, torch.ones(y.shape, dtype=y.dtype, device="cpu"))[0]
    except (RuntimeError, TypeError):
        return False
    with torch.no_grad():
        hv = h.detach()
        ok_val = torch.allclose(y.detach(), ref_fn(hv), rtol=1e-9, atol=1e-12)
        ok_grad = torch.allclose(dy, ref_grad(hv, torch.ones(hv.shape, dtype=hv.dtype, device="cpu")), rtol=1e-9, atol=1e-12)
    return ok_val and ok_grad


def of(fn: Fn, gated: bool) -> Activation:
    """The `Activation` of any elementwise callable (e.g. a Hugging Face MLP's `act_fn`).

    Forward always calls `fn` itself (an upcycled model equals its dense model exactly); the derivative is
    a built-in closed form where `same_function` proves it equal, autograd through `fn` otherwise.
    """
    match = next((name for name in BUILTIN if same_function(fn, name)), None)
    grad = BUILTIN[match][1] if match else None
    ident = f"{type(fn).__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}@{id(fn):x}"
    key = f"{'gated:' if gated else ''}{match or 'autograd'}:{ident}"
    return _register(Activation(key, fn, grad, gated))


for _name in list(BUILTIN) + list(GATED):
    named(_name)

__all__ = ["Activation", "BUILTIN", "GATED", "named", "of", "lookup", "same_function"]
