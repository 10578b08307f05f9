"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a list
of strings, or a grammar. Torch- and engine-free (SamplingParams, the API and the master's
wire format carry it); ``xllm.structured.grammar`` compiles it.

A spec is a kind and one string, so it crosses a process boundary as two fields and its
``key`` names its compiled grammar in the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["KINDS", "GrammarSpec"]

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
# json: a JSON schema (text); json_object: any JSON object (value ""); regex: a regular
# expression the whole output matches; choice: a JSON list of the allowed outputs;
# grammar: an EBNF grammar (GBNF's dialect, with a ``root`` rule).
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")

MAX_SPEC_CHARS = 1 << 20  # a schema or grammar longer than this is refused, not compiled


@dataclass(frozen=True)
class GrammarSpec:
    kind: Kind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a structured-output kind is one of {', '.join(KINDS)}; "
                             f"got {self.kind!r}")
        if not isinstance(self.value, str):
            raise ValueError(f"a structured-output spec's value is a string, got "
                             f"{type(self.value).__name__}")
        if len(self.value) > MAX_SPEC_CHARS:
            raise ValueError(f"the {self.kind} spec has {len(self.value)} characters; at most "
                             f"{MAX_SPEC_CHARS} are compiled")
        if self.kind == "json_object" and self.value:
            raise ValueError("a json_object spec takes no value")
        if self.kind != "json_object" and not self.value:
            raise ValueError(f"the {self.kind} spec is empty")

    @property
    def key(self) -> str:
        """Names the compiled grammar (equal specs share one compilation)."""
        return f"{self.kind}\0{self.value}"

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GrammarSpec:
        """A JSON schema given as a dict or as JSON text, re-serialized compactly (equal
        schemas share a cache entry whatever their spacing). Key order is kept: it is the
        order in which the output's properties are generated."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        if not isinstance(options, list) or not options:
            raise ValueError("choice needs a non-empty list of strings")
        if not all(isinstance(o, str) and o for o in options):
            raise ValueError("choice's options must be non-empty strings")
        return cls("choice", json.dumps(options, ensure_ascii=False))

    @property
    def choices(self) -> list[str]:
        assert self.kind == "choice"
        return list(json.loads(self.value))
