"""Tokenization: the fast tokenizer, chat templates and incremental detokenization."""

from .detokenizer import IncrementalDetokenizer
from .tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
