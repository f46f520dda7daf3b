"""Document processing for the competesmoe lm-eval tasks (same prompts as `competesmoe.eval`)."""
from __future__ import annotations

from typing import Any


def process_hellaswag(dataset: Any) -> Any:
    """`query` = preprocess(activity_label + ": " + ctx) (or ctx_a + " " + ctx_b.capitalize()),
    `choices` = preprocessed endings, `label` = int: exactly `competesmoe.eval.tasks`' HellaSwag items."""
    from competesmoe.eval.tasks import hellaswag_preprocess

    def one(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if doc.get("ctx_a") is not None else doc["ctx"]
        return {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "label": int(doc["label"])}

    return dataset.map(one)
