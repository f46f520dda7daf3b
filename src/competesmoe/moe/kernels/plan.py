"""The sort-by-expert plan every sparse dispatch shares, and the block sizes of blocked computations.

Pairs m = t·K + k (token t's k-th choice) are sorted by expert, stably; every dispatch path (grouped_mm,
the CPU loop, the Triton kernels, expert parallelism) reads the same plan. Nothing here reads a value
back to the host: the counts stay on the device until a path asks for them.
Shapes: T tokens, K choices, N experts, M = T·K pairs (sorted order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements per block of a blocked computation (the competition's all-expert pass, `rowwise`): on CPU small
# blocks stay in cache and in the allocator's free lists (docs/results/competition-chunk-cpu.md);
# accelerators want fewer, larger blocks (fewer kernel launches).
_BLOCK_ELEMENTS = {"cpu": 1 << 20}
_BLOCK_ELEMENTS_DEFAULT = 1 << 25


def block_elements(device: torch.device | str) -> int:
    """Elements per block of a blocked computation on `device`."""
    return _BLOCK_ELEMENTS.get(torch.device(device).type, _BLOCK_ELEMENTS_DEFAULT)


@dataclass
class SortedPairs:
    pair_M: torch.Tensor        # sorted row m -> its pair t·K + k (int64)
    token_M: torch.Tensor       # sorted row m -> its token t
    expert_M: torch.Tensor      # sorted row m -> its expert
    count_N: torch.Tensor       # pairs per expert (int64)

    @classmethod
    def of(cls, idx_TK: torch.Tensor, n_experts: int) -> "SortedPairs":
        K = idx_TK.shape[1]
        flat_M = idx_TK.reshape(-1)
        pair_M = flat_M.argsort(stable=True)
        # (bincount reads the maximum back to the host; a scatter-add does not)
        count_N = torch.zeros(n_experts, dtype=torch.int64, device=idx_TK.device).index_add_(
            0, flat_M, torch.ones_like(flat_M))
        return cls(pair_M, pair_M // K, flat_M.index_select(0, pair_M), count_N)

    @property
    def start_N(self) -> torch.Tensor:
        """First sorted row of each expert."""
        return self.count_N.cumsum(0) - self.count_N

    @property
    def offsets_N(self) -> torch.Tensor:
        """End row of each expert, int32: `torch.nn.functional.grouped_mm`'s `offs`."""
        return self.count_N.cumsum(0).to(torch.int32)

    def sorted_weights(self, w_TK: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The routing weights in sorted-pair order, [M], in `dtype` (None stays None)."""
        return None if w_TK is None else w_TK.reshape(-1).index_select(0, self.pair_M).to(dtype)

    def counts(self) -> list[int]:
        """Pairs per expert on the host (one device sync)."""
        return self.count_N.tolist()
