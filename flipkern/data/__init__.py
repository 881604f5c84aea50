"""Data for the pretraining job: the built-in synthetic dataset, CSV/TSV and
WebDataset-style tar shards, tokenizers, and the rank-independent loader."""
from .datasets import CorruptSample, CsvDataset, DataError, TarShardDataset, detect_type, expand_braces, expand_urls
from .loader import (
                     Collate,
                     GlobalBatchSampler,
                     SkipBad,
                     make_eval_loader,
                     make_train_loader,
                     num_keep_for,
                     sample_keep_indices,
)
from .synthetic import SyntheticConfig, SyntheticShapes
from .tokenizer import BPETokenizer, ByteTokenizer, build_tokenizer
from .transforms import CLIP_MEAN, CLIP_STD, denormalize, preprocess

__all__ = [
    "SyntheticConfig", "SyntheticShapes", "CsvDataset", "TarShardDataset", "DataError", "CorruptSample",
    "detect_type", "expand_braces", "expand_urls", "ByteTokenizer", "BPETokenizer", "build_tokenizer",
    "GlobalBatchSampler", "SkipBad", "Collate", "make_train_loader", "make_eval_loader", "num_keep_for",
    "sample_keep_indices", "preprocess", "denormalize", "CLIP_MEAN", "CLIP_STD",
]
