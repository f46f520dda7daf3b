"""Data pipeline for language-model pre-training: sources, synthetic corpus, BPE, token cache, batches.

    from competesmoe.data import DataConfig, prepare_data
    data = prepare_data(DataConfig(train="../shared/data/corpus/gutenberg/train.jsonl.gz", seq_len=512))
    batches = data.train_batches(batch_size=32)      # endless, shuffled, resumable
    x = next(batches)                                 # LongTensor[32, 513]
"""
from .batches import BatchIterator, SequentialBatches, gather, num_sequences, packed
from .config import DataConfig
from .prepare import PreparedData, holdout, prepare_data
from .sources import DataError, fingerprint, read_documents, read_file
from .synthetic import SyntheticCorpus
from .tokenizer import EOS, encode_documents, load_tokenizer, tokenizer_hash, train_bpe

__all__ = [
    "BatchIterator", "DataConfig", "DataError", "EOS", "PreparedData", "SequentialBatches", "SyntheticCorpus",
    "encode_documents", "fingerprint", "gather", "holdout", "load_tokenizer", "num_sequences", "packed", "prepare_data",
    "read_documents", "read_file", "tokenizer_hash", "train_bpe",
]
