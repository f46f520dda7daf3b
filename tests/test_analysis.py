"""Routing metrics (Section 5.2.2, Appendices F–G) on hand-made routings, the top-(K+1) shift, and
`competesmoe analyze` against naive recomputations on a trained run."""
import json
import math

import pytest
import torch
from torch import nn

from competesmoe.analysis import metrics
from competesmoe.analysis.analyze import analyze_checkpoints, checkpoint_paths, run_token_set
from competesmoe.analysis.collect import collect
from competesmoe.analysis.shift import top_k_shift
from competesmoe.cli import main as cli_main
from competesmoe.config import MoEConfig
from competesmoe.moe import MoE, moe_layers
from competesmoe.train import Trainer, load_trained, run_preset

SMALL = ["model.n_layers=2", "model.d_model=64", "model.moe.d_model=64", "model.moe.d_expert=32",
         "model.moe.n_experts=8", "model.moe.top_k=2", "model.max_seq_len=32", "data.seq_len=32",
         "data.vocab_size=320", "data.synthetic_train_chars=60000", "data.synthetic_valid_chars=12000",
         "data.progress=false", "train.batch_size=4", "train.eval_batches=1", "train.log_every=1",
         "train.tensorboard=false", "train.warmup_steps=1"]


# --- metrics on hand-made routings ---------------------------------------------------------------
def test_ecr_identical_is_zero_and_disjoint_is_one():
    a = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [6, 7]])]
    assert metrics.expert_change_rate(a, a) == {"ecr": 0.0, "per_layer": [0.0, 0.0]}
    # order inside a selection does not matter
    assert metrics.expert_change_rate(a, [t.flip(-1) for t in a])["ecr"] == 0.0
    b = [torch.tensor([[2, 3], [0, 1]]), torch.tensor([[0, 1], [2, 3]])]
    assert metrics.expert_change_rate(a, b) == {"ecr": 1.0, "per_layer": [1.0, 1.0]}


def test_ecr_partial_overlap_by_hand():
    a = [torch.tensor([[0, 1, 2], [3, 4, 5]])]
    b = [torch.tensor([[0, 1, 7], [5, 6, 7]])]  # token 0 keeps 2/3, token 1 keeps 1/3
    assert metrics.expert_change_rate(a, b)["ecr"] == pytest.approx(1 - (2 / 3 + 1 / 3) / 2)


def test_ecr_rejects_mismatched_routings():
    with pytest.raises(ValueError, match="same number"):
        metrics.expert_change_rate([torch.zeros(2, 2, dtype=torch.long)], [])
    with pytest.raises(ValueError, match="same shape"):
        metrics.expert_change_rate([torch.zeros(2, 2, dtype=torch.long)], [torch.zeros(3, 2, dtype=torch.long)])


def test_agreement_by_hand():
    router = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    comp = torch.tensor([[1, 0], [2, 9], [8, 9], [6, 7]])
    a = metrics.agreement(router, comp)
    assert a["agreement"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert a["top1_agreement"] == pytest.approx((0 + 1 + 0 + 1) / 4)


def test_uniform_router_has_maximal_entropies():
    N, K, T = 8, 2, 64
    idx = torch.arange(T * K).remainder(N).view(T, K)     # every expert chosen equally often
    assert metrics.selection_entropy(idx, N) == pytest.approx(math.log(N))
    assert metrics.softmax_entropy(torch.zeros(T, N)) == pytest.approx(math.log(N))
    assert metrics.weight_entropy(torch.full((T, K), 0.5)) == pytest.approx(math.log(K))
    assert metrics.selection_entropy(torch.zeros(T, 1, dtype=torch.long), N) == pytest.approx(0.0)
    # weights are renormalised: a constant scale does not change the entropy
    assert metrics.weight_entropy(torch.full((T, K), 3.0)) == pytest.approx(math.log(K))


def test_expert_load_matrix():
    load = metrics.expert_load([torch.tensor([[0, 1], [0, 2]]), torch.tensor([[3, 3], [3, 3]])], 4)
    assert load.shape == (2, 4)
    assert load[0].tolist() == [0.5, 0.25, 0.25, 0.0]
    assert load[1].tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="out of range"):
        metrics.expert_load([torch.tensor([[5]])], 4)


# --- top-(K+1) shift ------------------------------------------------------------------------------
class Wrap(nn.Module):
    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe


def _naive_shift(logits_TN, K, weight_fn):
    idx, w = [], []
    for row in logits_TN.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])[1:K + 1]   # ranks 2..K+1
        idx.append(order)
        w.append(weight_fn(torch.tensor([row[i] for i in order], dtype=torch.float64)).tolist())
    return torch.tensor(idx), torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize("router,extra,weight_fn", [
    ("smoe", {}, lambda z: z.softmax(-1)),
    ("xmoe", {}, lambda z: z.softmax(-1)),
    ("moeut", {}, lambda z: torch.sigmoid(z) / torch.sigmoid(z).sum()),   # renormalised to the top-K mass below
    ("sharede_v3", {}, lambda z: 2.5 * torch.sigmoid(z) / torch.sigmoid(z).sum()),
])
def test_shift_selects_ranks_2_to_k_plus_1_with_renormalised_weights(router, extra, weight_fn):
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=3, router=router)
    if router == "sharede_v3":
        cfg.router_opts.routed_scale = 2.5
        cfg.router_opts.n_shared = 1
    layer = MoE(cfg)
    model = Wrap(layer).eval()
    x = torch.randn(40, 16)
    with torch.no_grad():
        before = layer(x)
        with top_k_shift(model):
            shifted = layer(x)
        after = layer(x)
    K = cfg.k_routed
    idx, w = _naive_shift(shifted.router_logits.double(), K, weight_fn)
    assert torch.equal(shifted.indices, idx)
    if router == "moeut":  # raw sigmoid weights: total kept equal to the router's usual top-K total
        w = w * torch.sigmoid(before.router_logits.double().topk(K).values).sum(-1, keepdim=True)
    torch.testing.assert_close(shifted.weights.double(), w, rtol=1e-5, atol=1e-6)
    assert torch.equal(after.indices, before.indices), "routing must be restored after the block"
    assert "select" not in layer.router.__dict__


def test_shift_refuses_training_mode_and_too_few_experts():
    layer = MoE(MoEConfig(d_model=8, d_expert=4, n_experts=2, top_k=2))
    with pytest.raises(ValueError, match="eval"):
        with top_k_shift(Wrap(layer).train()):
            pass
    with pytest.raises(ValueError, match="K\\+1=3 <= N=2"):
        with top_k_shift(Wrap(layer).eval()):
            layer(torch.randn(3, 8))
    assert "select" not in layer.router.__dict__


# --- on a trained run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    cfg = run_preset("tiny", SMALL + [f"train.out_dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
                                      "train.steps=4", "train.ckpt_every=2", "train.eval_every=4",
                                      "train.keep_last=10", "router=competesmoe", "omega=0.5"])
    Trainer(cfg, log=lambda *_: None).train()
    return tmp / "run"


def _by_hand(model, seqs_BS1, batch_size):
    """Independently of `collect`: each MoE layer's input [T, D] and realised routing [T, K] on the sequences
    (eval mode, the same batches), the competition's winners from `MoE.competition_winners` on that input,
    and the mean next-token cross-entropy from the logits."""
    layers = moe_layers(model)
    xs, idx = [[] for _ in layers], [[] for _ in layers]
    def hook(i):
        def fn(module, args, out):
            xs[i].append(args[0].reshape(-1, args[0].shape[-1]))
            idx[i].append(out.indices)
        return fn
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in seqs_BS1.split(batch_size):
            logits = model.eval()(seq[:, :-1]).logits.double()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="sum"))
            count += seq[:, 1:].numel()
        winners = [layer.competition_winners(torch.cat(x))[0] for layer, x in zip(layers, xs)]
    for h in handles:
        h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(i) for i in idx], winners, nll / count


def _naive_overlap(a_TK, b_TK):
    """Per token |A ∩ B| / K by sets."""
    return [len(set(a) & set(b)) / len(a) for a, b in zip(a_TK.tolist(), b_TK.tolist())]


def test_collect_records_routing_winners_and_loss_of_the_model(run_dir):
    model, cfg, _ = load_trained(run_dir, log=lambda *_: None)
    seqs = torch.randint(0, cfg.model.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    r = collect(model, seqs, batch_size=2)
    xs, idx, winners, loss = _by_hand(model, seqs, batch_size=2)
    assert r.tokens == 24 and r.loss == pytest.approx(loss, rel=1e-5)
    for layer, rec, x, i, win in zip(moe_layers(model), r.layers, xs, idx, winners):
        assert rec.cat("indices").shape == (24, 2)
        assert torch.equal(rec.cat("indices"), i)
        assert torch.equal(rec.cat("winners"), win)            # the competition's I_C, not the router's
        torch.testing.assert_close(rec.cat("logits"), layer.router(x).logits_TN.float())
    assert any(not torch.equal(rec.cat("winners"), rec.cat("indices")) for rec in r.layers), \
        "the token set should show the router and the competition disagreeing somewhere"


def test_analysis_report_matches_naive_recomputation(run_dir):
    paths = checkpoint_paths([run_dir])
    assert [p.name for p in paths] == ["step_00000002", "step_00000004"]
    seqs = run_token_set(paths[-1], max_tokens=64, log=lambda *_: None)
    report = analyze_checkpoints([paths[-1], paths[-1]], seqs, batch_size=16, log=lambda *_: None)
    assert report["ecr"][0]["ecr"] == 0.0 and report["ecr"][0]["per_layer"] == [0.0, 0.0]
    model, _, _ = load_trained(paths[-1], log=lambda *_: None)
    _, idx, winners, loss = _by_hand(model, seqs, batch_size=16)
    agree = report["agreement"][0]
    assert agree["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    for got, i, win in zip(agree["per_layer"], idx, winners):
        assert got["agreement"] == pytest.approx(sum(_naive_overlap(i, win)) / len(i))
        assert got["top1_agreement"] == pytest.approx(sum(a == b for a, b in zip(i[:, 0].tolist(), win[:, 0].tolist())) / len(i))
    assert agree["agreement"] == pytest.approx(sum(a["agreement"] for a in agree["per_layer"]) / 2)
    final = report["final"]
    N, K = report["n_experts"], report["top_k"]
    for row, i in zip(final["load"], idx):
        flat = i.flatten().tolist()
        assert row == pytest.approx([flat.count(e) / (len(i) * K) for e in range(N)])
    for ent, i in zip(final["entropy"], idx):
        p = [i.flatten().tolist().count(e) / i.numel() for e in range(N)]
        assert ent["selection"] == pytest.approx(-sum(q * math.log(q) for q in p if q > 0), rel=1e-5)
    assert final["shift"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_analyze_cli_writes_report(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["analyze", str(run_dir), "--tokens", "64", "--out", str(out)]) == 0
    for name in ("analysis.md", "analysis.json", "ecr.png", "agreement.png", "load.png", "entropy.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "analysis.json").read_text())
    assert report["steps"] == [2, 4] and len(report["ecr"]) == 1
    # ECR from step 2 to step 4 by hand: 1 - |I ∩ I'| / K per token, averaged over tokens then layers
    paths = checkpoint_paths([run_dir])
    seqs = run_token_set(paths[-1], max_tokens=64, log=lambda *_: None)
    idx = [_by_hand(load_trained(p, log=lambda *_: None)[0], seqs, batch_size=16)[1] for p in paths]
    per_layer = [1 - sum(_naive_overlap(a, b)) / len(a) for a, b in zip(*idx)]
    assert report["ecr"][0]["per_layer"] == pytest.approx(per_layer)
    assert report["ecr"][0]["ecr"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert "Top-(K+1) shift" in (out / "analysis.md").read_text()


def test_analyze_cli_errors_are_clear(run_dir, tmp_path, capsys):
    """Bad input: one line `error: ...` on stderr, exit 1, nothing written."""
    (tmp_path / "empty").mkdir()
    for argv, msg in (([str(tmp_path / "missing")], "no such run or checkpoint folder"),
                      ([str(tmp_path / "empty")], "holds no checkpoint"),
                      ([str(run_dir), "--tokens", "0"], "at least one token"),
                      ([str(run_dir), "--data", str(tmp_path / "nope.txt")], "nope.txt")):
        assert cli_main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
