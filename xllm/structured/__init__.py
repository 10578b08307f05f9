"""Structured outputs: what a request's output must match (spec) and its compiled grammar."""

from .spec import KINDS, GrammarSpec

__all__ = ["KINDS", "GrammarSpec"]
