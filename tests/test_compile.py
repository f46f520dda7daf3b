"""torch.compile sees through an MoE layer: no graph break in a block (the dispatch kernels are custom
operators), one graph for a routed step and one for a competition step whichever layers compete, and the
compiled model trains to the same losses as the eager one."""
from __future__ import annotations

import copy

import pytest
import torch

from competesmoe.config import ROUTERS, MoEConfig, RouterConfig
from competesmoe.model.transformer import ModelConfig, MoETransformer
from competesmoe.moe import CompetitionSchedule, attach_schedule, on_optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(router: str, layers: int = 4, **moe) -> MoETransformer:
    torch.manual_seed(0)
    opts = RouterConfig(n_shared=1) if router.startswith("sharede") else RouterConfig()
    cfg = ModelConfig(vocab_size=64, n_layers=layers, d_model=32, n_heads=2, max_seq_len=16,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, router=router,
                                    router_opts=opts, **moe))
    return MoETransformer(cfg).train()


@pytest.mark.parametrize("router", ROUTERS)
def test_a_block_has_no_graph_break(router):
    block = _model(router, layers=1).blocks[0]
    x, pos = torch.randn(2, 15, 32), torch.arange(15)
    for compete in ([False, True] if router == "competesmoe" else [False]):
        ex = torch._dynamo.explain(block)(x, pos, None, compete)
        reasons = [b.reason.splitlines()[0] for b in ex.break_reasons]
        assert ex.graph_break_count == 0 and ex.graph_count == 1, reasons


@pytest.mark.parametrize("backend_dtype", ["loop", "grouped_mm-bf16"])
def test_compiled_training_equals_eager_with_two_graphs(backend_dtype):
    """6 steps, layers competing on different steps in different combinations: two graphs in all (the
    routed and the competition block), and the same losses as eager. With aot_eager (same kernels, no
    fusion) the losses are bit-identical in fp32; in bf16 autocast within 1e-3 (one rounding order)."""
    backend, bf16 = ("loop", False) if backend_dtype == "loop" else ("grouped_mm", True)
    eager = _model("competesmoe", backend=backend)
    compiled = copy.deepcopy(eager)
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    torch._dynamo.reset()
    compiled.compile(backend=count)
    losses, tables = [], []
    for m in (eager, compiled):
        torch.manual_seed(1)
        schedule = CompetitionSchedule(n_layers=4, total_steps=6, omega=0.5, a_max=2, warmup=0.0, seed=3)
        attach_schedule(m, schedule)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        run = []
        for _ in range(6):
            ids = torch.randint(0, 64, (2, 16))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = m(ids[:, :-1], ids[:, 1:])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            on_optimizer_step(m)
            run.append(out.loss.item())
        losses.append(run)
        tables.append(schedule.table)
    patterns = {tuple(col) for col in tables[0].T}
    assert len(patterns) >= 3 and tables[0].any() and not tables[0].all()   # several kinds of step
    assert len(graphs) == 2
    if bf16:
        assert losses[0] == pytest.approx(losses[1], abs=1e-3)
    else:
        assert losses[0] == losses[1]
