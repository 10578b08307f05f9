"""Incremental detokenization: the text each step adds, for streaming.

Decoding tokens one at a time is wrong twice over: a byte-level token can carry part of a
UTF-8 character (an emoji is often 2-4 tokens), and sentencepiece-style decoders drop a
word's leading space at the start of a sequence. So, like vLLM, each step decodes a small
window twice — ids[prefix_offset:read_offset] (already emitted) and ids[prefix_offset:]
(with the new tokens) — and emits the difference, holding it back while it ends in U+FFFD
(an incomplete character). The window starts a few tokens back so the decoder sees the
context a token's spelling depends on.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

# Prompt tokens kept as decoding context (vLLM uses the same 5).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Only the prompt's tail matters as context; keeping just that bounds memory.
        self._ids: list[int] = [int(t) for t in prompt_ids[-_CONTEXT_TOKENS:]]
        self._prefix = 0
        self._read = len(self._ids)
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self.num_output_tokens = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _emit(self, force: bool) -> str:
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not force):
            # Nothing visible yet (a skipped special token) or a character still incomplete:
            # keep the window and try again with the next token.
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 256:  # drop ids that no window will reach again
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._chunks.append(delta)
        self._text_cache = None
        return delta

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Adds generated tokens; returns the text they complete (possibly "")."""
        if not new_token_ids:
            return ""
        self._ids.extend(int(t) for t in new_token_ids)
        self.num_output_tokens += len(new_token_ids)
        return self._emit(force=False)

    def finish(self) -> str:
        """Flushes text held back for an incomplete character (emitted as U+FFFD, exactly as
        decode() of all ids renders it). Call once the sequence has ended."""
        return self._emit(force=True)

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache
