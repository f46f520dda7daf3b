"""Zero-shot evaluation engine: scoring rules checked against naive per-token loops on stub models."""
from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch

from competesmoe.eval import (TaskDataError, encode_pair, evaluate, expand_tasks, load_results, perplexity,
                              results_markdown, rolling_windows, table_rows, write_report)
from competesmoe.eval.interface import as_tokenizer
from competesmoe.eval.scoring import Scorer
from competesmoe.eval.tasks import load_blimp, load_multiple_choice, load_wikitext, split_wikitext_articles

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "eval").is_dir(), reason="../shared/data/eval not present")
EOS = 256
LN_V = math.log(257)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ByteTokenizer:
    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class StubLM(torch.nn.Module):
    """Deterministic causal LM over bytes + EOS: a bigram table plus (optionally) a causal running
    mean of embeddings, so that predictions depend on the whole window. float64 for exact checks."""

    def __init__(self, max_length: int = 16, seed: int = 0, contextual: bool = True, vocab: int = 257) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bigram = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))
        self.emb = torch.nn.Parameter(torch.randn(vocab, 8, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(8, vocab, generator=g, dtype=torch.float64) * contextual)
        self.max_length, self.eos_token_id = max_length, EOS
        self.batch_shapes: list[tuple[int, int]] = []

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        self.batch_shapes.append(tuple(ids_BS.shape))
        assert ids_BS.shape[1] <= self.max_length
        steps_S = torch.arange(1, ids_BS.shape[1] + 1, dtype=torch.float64)
        mean_BSD = self.emb[ids_BS].cumsum(1) / steps_S[None, :, None]
        return self.bigram[ids_BS] + mean_BSD @ self.out


def naive_ll(model: StubLM, context: list[int], target: list[int]) -> tuple[float, bool]:
    """Score `target` token by token, one unpadded forward per token. As lm-eval, the sequence is
    first cut to its last max_length + 1 tokens (left truncation), the same window for all targets."""
    window = (context + target)[-(model.max_length + 1):]
    total, greedy, start = 0.0, True, len(window) - len(target)
    for k, tok in enumerate(target):
        logp = torch.log_softmax(model(torch.tensor([window[:start + k]]))[0, -1], -1)
        total += logp[tok].item()
        greedy &= int(logp.argmax()) == tok
    return total, greedy


def mc_file(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))


def make_data_dir(root: Path) -> Path:
    """Tiny files in the shared data's formats."""
    root.mkdir(parents=True, exist_ok=True)
    mc_file(root / "lambada_openai.jsonl", [{"context": f"story {i} with a long tail of words", "continuation": w}
                                            for i, w in enumerate(["end", "cat", "mat", "a"])])
    mc_file(root / "piqa.jsonl", [{"query": f"Question: how {i}?\n", "choices": ["do it", "do not"], "gold": i % 2}
                                  for i in range(3)])
    for name in ("arc_easy", "arc_challenge"):
        mc_file(root / f"{name}.jsonl", [{"query": f"Question: what is {i}?", "choices": ["one", "two", "three"],
                                          "gold": i % 3} for i in range(5)])
    mc_file(root / "hellaswag_val.jsonl", [{"activity_label": "Cooking", "ctx": f"A man cooks {i}. he",
                                            "endings": ["eats.", "runs  away.", "sleeps [title] well", "sits."],
                                            "label": i % 4} for i in range(3)])
    (root / "blimp").mkdir()
    for name, n in (("alpha", 1), ("beta", 3)):
        with gzip.open(root / "blimp" / f"{name}.jsonl.gz", "wt") as f:
            for i in range(n):
                f.write(json.dumps({"sentence_good": f"The dog {i} runs.", "sentence_bad": f"Dog the {i} run.",
                                    "UID": name}) + "\n")
    (root / "wikitext2").mkdir()
    text = (" \n = First = \n \n The cat sat on the mat @-@ ok , fine . \n \n"
            " = = Sub = = \n \n More words here . \n \n = Second = \n \n Another article 's text . \n")
    (root / "wikitext2" / "test.txt").write_text(text)
    (root / "wikitext2" / "valid.txt").write_text(" = V = \n \n valid text . \n")
    return root


# --- scoring rules -------------------------------------------------------------------------------

def test_encode_pair_moves_trailing_space_and_uses_whole_encoding():
    vocab: dict[str, int] = {}

    class WordTok:  # " word" and "word" are different tokens, like GPT-2's BPE
        def encode(self, text: str) -> list[int]:
            return [vocab.setdefault(p, len(vocab)) for p in re.findall(r" ?\w+|\s+|[^\w\s]", text)]

    tok = WordTok()
    ctx, cont = encode_pair(tok, "Answer: ", "yes", prefix_token_id=99)
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")  # not encode(" ") + encode("yes")
    assert encode_pair(tok, "", " A dog.", 99) == ([99], tok.encode(" A dog."))
    with pytest.raises(ValueError, match="no tokens"):
        encode_pair(tok, "Answer:", "", 99)


def test_multiple_choice_matches_naive_loop_with_truncation(tmp_path):
    model = StubLM(max_length=12)
    query = "Question: " + "very long context " * 3  # longer than max_length: truncated from the left
    choices = ["ab", "xyz", "q"]
    scorer = Scorer(model, ByteTokenizer(), batch_size=2, progress=False)
    got = [ll for ll, _ in scorer.loglikelihood([(query + "\nAnswer:", " " + c) for c in choices])]
    naive = [naive_ll(model, list((query + "\nAnswer:").encode()), list((" " + c).encode()))[0] for c in choices]
    assert got == pytest.approx(naive, rel=1e-12)
    best = max(range(3), key=lambda i: naive[i])
    mc_file(tmp_path / "arc_easy.jsonl", [{"query": query, "choices": choices, "gold": g} for g in (best, best, (best + 1) % 3)])
    res = evaluate(model, ByteTokenizer(), ["arc_easy"], tmp_path, batch_size=2, progress=False)["tasks"]["arc_easy"]
    assert res["acc"] == pytest.approx(2 / 3) and res["n"] == 3


def test_acc_norm_divides_by_length_hand_computed(tmp_path):
    """Uniform model: every token costs ln(257), so ll(" " + c) = -(bytes(c) + 1) ln 257.
    acc picks the shortest choice; acc_norm (characters, as lm-eval) and acc_bytes differ on 'éé'."""
    model = StubLM(max_length=32, contextual=False)
    torch.nn.init.zeros_(model.bigram)
    mc_file(tmp_path / "piqa.jsonl", [
        {"query": "Question: q\n", "choices": ["ab", "abcdefgh"], "gold": 0},  # ll -3 vs -9; /len -1.5 vs -1.125
        {"query": "Question: q\n", "choices": ["ab", "abcdefgh"], "gold": 1},
        {"query": "Question: q\n", "choices": ["éé", "abc"], "gold": 0},  # ll -5 vs -4; /chars -2.5 vs -1.33;
    ])                                                                   # /bytes -1.25 vs -1.33
    scorer = Scorer(model, ByteTokenizer(), progress=False)
    lls = [ll for ll, _ in scorer.loglikelihood([("Question: q\nAnswer:", " éé"), ("Question: q\nAnswer:", " abc")])]
    assert lls == pytest.approx([-5 * LN_V, -4 * LN_V])
    res = evaluate(model, ByteTokenizer(), "piqa", tmp_path, progress=False)["tasks"]["piqa"]
    assert res["acc"] == pytest.approx(1 / 3)        # first item only (shortest is gold)
    assert res["acc_norm"] == pytest.approx(1 / 3)   # second item only (longest is gold)
    assert res["acc_bytes"] == pytest.approx(2 / 3)  # second and third ('éé' wins per byte)


def _successor_model(path: str, max_length: int = 64) -> StubLM:
    """Bigram model whose greedy successor of each byte along `path` is the next byte of `path`."""
    model = StubLM(max_length=max_length, contextual=False)
    with torch.no_grad():
        model.bigram.mul_(0.1)
        for a, b in zip(path.encode(), path.encode()[1:]):
            model.bigram[a, b] = 10.0
    return model


def test_lambada_exact_match_and_perplexity(tmp_path):
    model = _successor_model("e mat")  # after "...the": " ", "m", "a", "t"
    targets = ["mat", "map", "hat"]  # exact; last token misses; first token misses
    mc_file(tmp_path / "lambada_openai.jsonl", [{"context": "sat on the", "continuation": t} for t in targets])
    for bs in (1, 3):
        res = evaluate(model, ByteTokenizer(), ["lambada"], tmp_path, batch_size=bs, progress=False)["tasks"]["lambada"]
        assert res["acc"] == pytest.approx(1 / 3)
    naive = [naive_ll(model, list(b"sat on the"), list((" " + t).encode())) for t in targets]
    assert [g for _, g in naive] == [True, False, False]
    assert res["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in naive) / 3), rel=1e-10)


def test_blimp_compares_whole_sentences_after_eos(tmp_path):
    model = StubLM(max_length=64, seed=3)
    (tmp_path / "blimp").mkdir()
    paradigms = {"p1": [("Cats sleep.", "Cats sleeps.")],
                 "p2": [("He is here.", "He are here."), ("A big dog.", "Dog big a."), ("Yes we can.", "Can we yes.")]}
    for name, pairs in paradigms.items():
        mc_file(tmp_path / "blimp" / f"{name}.jsonl",  # plain .jsonl works as well as .jsonl.gz
                [{"sentence_good": g, "sentence_bad": b} for g, b in pairs])
    res = evaluate(model, ByteTokenizer(), ["blimp"], tmp_path, progress=False)["tasks"]["blimp"]
    expected = {}
    for name, pairs in paradigms.items():
        wins = [naive_ll(model, [EOS], list((" " + g).encode()))[0] > naive_ll(model, [EOS], list((" " + b).encode()))[0]
                for g, b in pairs]
        expected[name] = sum(wins) / len(wins)
    assert res["paradigms"] == pytest.approx(expected)
    assert res["acc"] == pytest.approx((expected["p1"] + expected["p2"]) / 2)  # macro average over paradigms
    assert res["n"] == 4
    assert 0 < res["acc"] < 1  # the comparison is not trivially all-good or all-bad here


def test_blimp_scores_space_prefixed_sentence_after_eos(tmp_path):
    """As lm-eval: P(" " + sentence | EOS). The table makes the good sentence win only in that form."""
    model = StubLM(max_length=32, contextual=False)
    with torch.no_grad():
        model.bigram.mul_(0.01)
        model.bigram[ord(" "), ord("C")] = 20.0  # " Cats ..." is likely
        model.bigram[EOS, ord("S")] = 20.0       # "Sleep ..." right after EOS would be likely
    (tmp_path / "blimp").mkdir()
    mc_file(tmp_path / "blimp" / "order.jsonl", [{"sentence_good": "Cats sleep.", "sentence_bad": "Sleep cats."}])
    assert evaluate(model, ByteTokenizer(), ["blimp"], tmp_path, progress=False)["tasks"]["blimp"]["acc"] == 1.0


def naive_rolling_ll(model: StubLM, tokens: list[int], stride: int) -> float:
    """Token i < L sees [EOS] + tokens[:i]; later tokens belong to the window ending at
    L + stride * ceil((i + 1 - L) / stride) and see that window's inputs (L positions) up to i."""
    L, total = model.max_length, 0.0
    for i, tok in enumerate(tokens):
        if i < L:
            context = [EOS] + tokens[:i]
        else:
            end = min(L + stride * math.ceil((i + 1 - L) / stride), len(tokens))
            context = tokens[end - L - 1:i]
        logp = torch.log_softmax(model(torch.tensor([context]))[0, -1], -1)
        total += logp[tok].item()
    return total


@pytest.mark.parametrize("stride", [8, 3, 1])
def test_rolling_perplexity_matches_naive_loop(stride):
    model = StubLM(max_length=8, seed=1)
    tokens = list(b"The quick brown fox jumps.")  # 26 tokens > max_length
    windows = rolling_windows(tokens, EOS, 8, stride)
    assert [t for _, cont in windows for t in cont] == tokens  # every token predicted exactly once
    assert all(len(c) + len(x) <= 9 and len(x) <= max(stride, 8) for c, x in windows)
    scorer = Scorer(model, ByteTokenizer(), batch_size=4, progress=False)
    got = scorer.rolling_loglikelihood([tokens], stride)[0]
    assert got == pytest.approx(naive_rolling_ll(model, tokens, stride), rel=1e-12)


def test_stride_changes_context_and_default_is_lm_eval_disjoint():
    model = StubLM(max_length=8, seed=1)
    tokens = list(b"The quick brown fox jumps.")
    assert rolling_windows(tokens, EOS, 8)[1] == (tokens[7:8], tokens[8:16])  # lm-eval: context_len = 1
    scorer = Scorer(model, ByteTokenizer(), progress=False)
    assert scorer.rolling_loglikelihood([tokens], 8) != pytest.approx(scorer.rolling_loglikelihood([tokens], 2))
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(tokens, EOS, 8, 9)


def test_wikitext_word_perplexity_and_articles(tmp_path):
    root = make_data_dir(tmp_path)
    model = StubLM(max_length=16, seed=2)
    res = evaluate(model, ByteTokenizer(), ["wikitext2"], root, progress=False)["tasks"]["wikitext2"]
    docs = load_wikitext(root)
    assert len(docs) == 2 and docs[1].startswith(" = Second = ")  # "= = Sub = =" does not split
    from competesmoe.eval.tasks import wikitext_detokenize
    assert "mat-ok, fine." in wikitext_detokenize(docs[0])
    lls = [naive_rolling_ll(model, list(wikitext_detokenize(d).encode()), 16) for d in docs]
    tokens = sum(len(wikitext_detokenize(d).encode()) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    assert res["tokens"] == tokens and res["words"] == words and res["n"] == 2
    assert res["ppl"] == pytest.approx(math.exp(-sum(lls) / tokens), rel=1e-10)
    assert res["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-10)
    raw = evaluate(model, ByteTokenizer(), ["wikitext2"], root, detokenize=False, progress=False)["tasks"]["wikitext2"]
    assert raw["tokens"] == sum(len(d.encode()) for d in docs)


def test_batching_and_padding_invariance(tmp_path):
    root = make_data_dir(tmp_path)
    runs = {}
    for bs in (1, 4):
        model = StubLM(max_length=24, seed=5)
        runs[bs] = evaluate(model, ByteTokenizer(), "all", root, batch_size=bs, progress=False)
        assert max(b for b, _ in model.batch_shapes) == bs
    assert runs[1]["tasks"] == runs[4]["tasks"]
    assert set(runs[1]["tasks"]) == set(expand_tasks("all"))


def test_limit_and_model_mode(tmp_path):
    root = make_data_dir(tmp_path)
    model = StubLM(max_length=24)
    model.train()
    res = evaluate(model, ByteTokenizer(), "all", root, limit=2, progress=False)
    assert model.training  # restored after evaluation
    counts = {task: r["n"] for task, r in res["tasks"].items()}
    assert counts == {"wikitext2": 2, "lambada": 2, "blimp": 3, "piqa": 2, "arc_easy": 2, "arc_challenge": 2,
                      "hellaswag": 2}  # blimp: first 2 pairs of each paradigm (1 + 2)
    assert res["settings"]["limit"] == 2 and res["settings"]["device"] == "cpu"


def test_prompts_follow_lm_eval(tmp_path):
    root = make_data_dir(tmp_path)
    assert load_multiple_choice("piqa", root)[0].context == "Question: how 0?\nAnswer:"
    assert load_multiple_choice("arc_challenge", root)[0].context == "Question: what is 0?\nAnswer:"
    hs = load_multiple_choice("hellaswag", root)[0]
    assert hs.context == "Cooking: A man cooks 0. he"
    assert hs.choices == ("eats.", "runs away.", "sleeps. well", "sits.")  # lm-eval's preprocess
    assert list(load_blimp(root)) == ["alpha", "beta"]


# --- errors ----------------------------------------------------------------------------------------

def test_loader_errors(tmp_path, monkeypatch):
    root = make_data_dir(tmp_path / "d")
    stub, tok = StubLM(), ByteTokenizer()
    with pytest.raises(TaskDataError, match=r"piqa\.jsonl.*--data-dir"):
        (root / "piqa.jsonl").unlink()
        evaluate(stub, tok, ["piqa"], root, progress=False)
    (root / "arc_easy.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="arc_easy.jsonl: no items"):
        evaluate(stub, tok, ["arc_easy"], root, progress=False)
    (root / "arc_easy.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": \n')
    with pytest.raises(TaskDataError, match=r"arc_easy.jsonl: line 2: not valid JSON"):
        evaluate(stub, tok, ["arc_easy"], root, progress=False)
    (root / "arc_easy.jsonl").write_text('{"query": "Q", "choices": ["a", "b"]}\n')
    with pytest.raises(TaskDataError, match=r"arc_easy.jsonl: line 1: missing field\(s\) \['gold'\]"):
        evaluate(stub, tok, ["arc_easy"], root, progress=False)
    (root / "arc_easy.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(TaskDataError, match="'gold'=2 is not an index"):
        evaluate(stub, tok, ["arc_easy"], root, progress=False)
    (root / "wikitext2" / "test.txt").write_text(" \n\n")
    with pytest.raises(TaskDataError, match="test.txt: no text"):
        evaluate(stub, tok, ["wikitext2"], root, progress=False)
    for f in (root / "blimp").iterdir():
        f.unlink()
    with pytest.raises(TaskDataError, match="no BLiMP paradigm files"):
        evaluate(stub, tok, ["blimp"], root, progress=False)
    with pytest.raises(TaskDataError, match="does not exist.*--data-dir"):
        evaluate(stub, tok, ["piqa"], tmp_path / "nowhere", progress=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/eval from here
    with pytest.raises(TaskDataError, match="--data-dir"):
        evaluate(stub, tok, ["piqa"], None, progress=False)
    with pytest.raises(ValueError, match="unknown task 'cbt'"):
        expand_tasks("piqa,cbt")


def test_model_without_max_length_needs_argument(tmp_path):
    root = make_data_dir(tmp_path)
    bare = torch.nn.Module()
    with pytest.raises(ValueError, match="max_length"):
        evaluate(bare, ByteTokenizer(), ["piqa"], root, progress=False)
    assert expand_tasks("all") == expand_tasks(["all", "piqa"])
    assert split_wikitext_articles("plain text\nno headings\n") == ["plain text\nno headings\n"]


# --- tokenizer adapters and report ------------------------------------------------------------------

def test_tokenizer_adapters():
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    adapted = as_tokenizer(tok)
    assert adapted.encode("hello world") == [2, 3] and adapted.eos_token_id == 0
    from transformers import PreTrainedTokenizerFast
    hf = as_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>"))
    assert type(hf).__name__ == "HFTokenizerAdapter"
    assert hf.encode("hello there") == [2, 1] and hf.eos_token_id == 0
    with pytest.raises(TypeError, match="encode"):
        as_tokenizer(object())


def test_report_table_and_json(tmp_path):
    root = make_data_dir(tmp_path / "data")
    a = evaluate(StubLM(max_length=24, seed=0), ByteTokenizer(), "all", root, name="SMoE", progress=False)
    b = evaluate(StubLM(max_length=24, seed=1), ByteTokenizer(), ["piqa", "lambada"], root, name="CompeteSMoE",
                 progress=False)
    paths = write_report([a, b], tmp_path / "out")
    assert load_results(paths["json"]) == json.loads(json.dumps([a, b]))
    rows = table_rows([a, b])
    accs = [100 * a["tasks"][t]["acc"] for t in ("lambada", "blimp", "piqa", "arc_easy", "arc_challenge", "hellaswag")]
    assert rows[0]["Avg."] == pytest.approx(sum(accs) / 6)
    assert rows[0]["PPL"] == pytest.approx(a["tasks"]["wikitext2"]["ppl"])
    assert rows[1]["ARC-E"] is None and rows[1]["Avg."] == pytest.approx(
        50 * (b["tasks"]["piqa"]["acc"] + b["tasks"]["lambada"]["acc"]))
    md = paths["markdown"].read_text()
    assert "| Model | PPL | LAMBADA | BLiMP | PIQA | ARC-E | ARC-C | HellaSwag | Avg. |" in md
    assert md.count("| CompeteSMoE |") == 3  # summary row + 2 detail rows
    piqa_row = next(line for line in md.splitlines() if line.startswith("| CompeteSMoE | piqa |"))
    items_per_s = b["tasks"]["piqa"]["n"] / b["settings"]["seconds"]["piqa"]
    assert piqa_row.endswith(f"| {items_per_s:.1f} |")
    assert "`acc_norm`" in results_markdown(a, mc_metric="acc_norm")
    scorer = Scorer(StubLM(max_length=24, seed=0), ByteTokenizer(), progress=False)
    a["tasks"]["gutenberg"] = perplexity(scorer, ["Some held-out text.", "More of it."])  # a caller-added PPL
    assert table_rows(a, ppl_task="gutenberg")[0]["PPL"] == a["tasks"]["gutenberg"]["ppl"]


# --- the real benchmark files ------------------------------------------------------------------------

@pytest.mark.shared_data
@needs_shared
def test_shared_benchmark_files():
    root = SHARED / "eval"
    from competesmoe.eval.tasks import load_lambada
    assert len(load_lambada(root)) == 5153
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042}
    for task, n in sizes.items():
        items = load_multiple_choice(task, root)
        assert len(items) == n and all(0 <= i.gold < len(i.choices) for i in items)
    assert load_multiple_choice("piqa", root, limit=1)[0].context.endswith("?\nAnswer:")
    assert load_multiple_choice("arc_easy", root, limit=1)[0].context.startswith("Question: ")
    blimp = load_blimp(root, limit=2)
    assert len(blimp) == 67 and all(len(p) == 2 for p in blimp.values())
    assert len(load_wikitext(root, "valid")) > 40
    res = evaluate(StubLM(max_length=32), ByteTokenizer(), "all", root, limit=2, progress=False)
    assert res["tasks"]["blimp"]["n"] == 134 and math.isfinite(res["tasks"]["wikitext2"]["ppl"])
