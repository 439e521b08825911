"""Data pipeline: Megatron ``.bin``/``.idx`` datasets, tokenizers, the embedded default corpus,
GPT sample building, blending/splitting, mock data, and ``megacore preprocess``."""

from megacore.data.blended import BlendedDataset, blend_counts, blend_index, parse_split, split_document_ranges
from megacore.data.builder import build_datasets, build_default_corpus, build_tokenizer, tokenizer_vocab_size
from megacore.data.cache import default_cache_dir
from megacore.data.corpus import corpus_fingerprint, default_corpus
from megacore.data.gpt_dataset import GPTDataset, InMemoryDocuments, make_sample
from megacore.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, data_prefix, optimal_dtype
from megacore.data.mock import MockGPTDataset
from megacore.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer,
                                     train_bpe)

__all__ = [
    "BlendedDataset", "blend_counts", "blend_index", "parse_split", "split_document_ranges",
    "build_datasets", "build_default_corpus", "build_tokenizer", "tokenizer_vocab_size",
    "default_cache_dir", "corpus_fingerprint", "default_corpus",
    "GPTDataset", "InMemoryDocuments", "make_sample",
    "IndexedDataset", "IndexedDatasetBuilder", "data_prefix", "optimal_dtype",
    "MockGPTDataset",
    "HFTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "Tokenizer", "load_tokenizer", "train_bpe",
]
