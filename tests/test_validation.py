"""`lm_loss`, the one validation loop (trainer, `competesmoe eval` valid_ppl, analysis), against a naive
per-token cross-entropy written here."""
import math

import pytest
import torch

from competesmoe.config import MoEConfig
from competesmoe.data import DataError
from competesmoe.model.transformer import ModelConfig, MoETransformer
from competesmoe.train import lm_loss


def _model() -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=6, top_k=2, router="competesmoe")
    return MoETransformer(ModelConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=2, max_seq_len=16, moe=moe))


def _naive_mean_nll(model, batches) -> tuple[float, int]:
    """Mean over every predicted token of -log softmax(logits)[target], token by token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch[:, :-1]).logits.double()
            for b in range(batch.shape[0]):
                for s in range(batch.shape[1] - 1):
                    row = logits[b, s]
                    total -= float(row[batch[b, s + 1]] - torch.logsumexp(row, 0))
                    count += 1
    return total / count, count


def test_lm_loss_is_the_per_token_mean_over_batches_of_any_size():
    model = _model().train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 40, (3, 9), generator=g), torch.randint(0, 40, (1, 9), generator=g)]  # unequal
    res = lm_loss(model, batches)
    model.eval()
    loss, count = _naive_mean_nll(model, batches)
    assert res.tokens == count == 32 and res.loss == pytest.approx(loss, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(loss), rel=1e-5) and res.seconds >= 0
    # under bf16 autocast (what the trainer passes for precision=bf16): close, in bf16's precision (~3 digits)
    bf16 = lm_loss(model, batches, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf16.tokens == 32 and bf16.loss == pytest.approx(loss, rel=2e-2)
    # a mean of the two batch means would weigh the single sequence 3x too much
    assert res.loss != pytest.approx((lm_loss(model, batches[:1]).loss + lm_loss(model, batches[1:]).loss) / 2, rel=1e-6)


def test_lm_loss_runs_in_eval_mode_restores_the_mode_and_uses_the_autocast():
    model = _model().train()
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(model.training)   # the forward runs in eval mode: no competition
        def __exit__(self, *exc):
            return False

    lm_loss(model, [torch.randint(0, 40, (2, 9))], autocast=Recorder)
    assert entered == [False] and model.training
    lm_loss(model.eval(), [torch.randint(0, 40, (2, 9))])
    assert not model.training


def test_lm_loss_without_tokens_is_a_data_error():
    with pytest.raises(DataError, match="no complete sequence"):
        lm_loss(_model(), [])
