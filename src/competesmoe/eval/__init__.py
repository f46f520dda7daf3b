"""Model-agnostic zero-shot evaluation: LAMBADA, BLiMP, PIQA, ARC-E/C, HellaSwag, WikiText-2 PPL.

    results = evaluate(model, tokenizer, ["all"], data_dir="../shared/data/eval", batch_size=16)
    write_report(results, "runs/eval")

Scoring follows lm-evaluation-harness; see docs/eval.md.
"""
from .evaluator import TASKS, evaluate, expand_tasks
from .metrics import perplexity, token_perplexity
from .interface import HFTokenizerAdapter, LogitsModel, TextTokenizer, TokenizersAdapter, as_tokenizer
from .report import load_results, results_markdown, table_rows, write_report
from .scoring import Scorer, encode_pair, loglikelihood_tokens, rolling_windows
from .tasks import TaskDataError, resolve_data_dir

__all__ = ["TASKS", "evaluate", "expand_tasks", "LogitsModel", "TextTokenizer", "TokenizersAdapter",
           "HFTokenizerAdapter", "as_tokenizer", "write_report", "results_markdown", "table_rows",
           "load_results", "Scorer", "encode_pair", "loglikelihood_tokens", "rolling_windows",
           "TaskDataError", "resolve_data_dir", "perplexity", "token_perplexity"]
