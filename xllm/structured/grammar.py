"""Structured outputs: GrammarSpecs compiled against the model's tokenizer by xgrammar, a
matcher per request, and the token bitmask the sampler applies.

Why xgrammar (measured by ``python -m bench.grammar``, docs/benchmarks.md): on the demo
model's 49k-token vocabulary its per-token mask costs about a tenth of llguidance's, which
computes masks lazily and so has no compile step; xgrammar's compile of a typical schema
takes milliseconds, and it is cached and done off the engine step.

- ``GrammarCompiler.submit(spec)`` compiles on a background thread and returns a Future;
  equal specs (``GrammarSpec.key``) share one compilation, and the last ``cache_size``
  compiled grammars stay cached. The engine admits a request to the scheduler only once its
  grammar is compiled, so no step waits for a compile.
- ``check(spec)`` only parses the spec (no tokenizer): what the API and the master use to
  refuse a bad schema, regex or grammar with a 400 before anything is queued.
- A request's matcher (xgrammar's GrammarMatcher) accepts each sampled token and fills the
  request's row of the batch's bitmask (bit set = token allowed) before each sampling.

JSON is generated compactly (", " and ": " separators, no other whitespace): small models
given free whitespace tend to emit it until max_tokens, and the output parses the same.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from xllm.structured.spec import GrammarSpec

__all__ = ["GrammarCompiler", "check", "check_json_schema", "new_bitmask",
           "preload_grammar_engine"]

_SEPARATORS = (", ", ": ")
# The JSON grammar the OpenAI json_object mode asks for: one object (any keys and values).
_JSON_OBJECT_SCHEMA = {"type": "object"}


_import_lock = threading.Lock()  # one importer at a time: see _xgr


def _xgr() -> Any:
    # Two threads importing xgrammar at once (the preload and a request's check) could see
    # it half-initialized through transformers' lazy modules; the lock makes one wait.
    try:
        with _import_lock:
            import xgrammar
    except ImportError as e:  # a dependency of the package; absent only in broken installs
        raise RuntimeError("structured outputs need the xgrammar package: pip install "
                           "xgrammar") from e
    return xgrammar


_preload_lock = threading.Lock()
_preloading: threading.Thread | None = None


def preload_grammar_engine() -> None:
    """Imports xgrammar (and the transformers it loads, about a second) on a background
    thread, so that a server's first structured request does not wait for it on its event
    loop. Idempotent."""
    global _preloading
    with _preload_lock:
        if _preloading is None:
            _preloading = threading.Thread(target=_import_quietly, name="xllm-grammar-import",
                                           daemon=True)
            _preloading.start()


def _import_quietly() -> None:
    try:
        _xgr()
    except RuntimeError:
        pass  # reported when a request needs it


def _grammar(spec: GrammarSpec) -> Any:
    """xgrammar's Grammar for ``spec`` (parsing and conversion only). ValueError, saying what
    is wrong, for a spec that does not parse."""
    xgr = _xgr()
    try:
        if spec.kind == "json":
            schema = json.loads(spec.value)
            check_json_schema(schema)
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False,
                                                separators=_SEPARATORS)
        if spec.kind == "json_object":
            return xgr.Grammar.from_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=False,
                                                separators=_SEPARATORS)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            options = spec.choices
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(o) for o in options))
        return xgr.Grammar.from_ebnf(spec.value)
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError and its own types on bad input
        raise ValueError(f"invalid {_NAMES[spec.kind]}: {_first_line(e)}") from None


_NAMES = {"json": "JSON schema", "json_object": "JSON object spec", "regex": "regex",
          "choice": "choice", "grammar": "grammar"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def check_json_schema(schema: Any) -> None:
    """The schema is valid JSON Schema (2020-12), or ValueError naming the first problem."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {e.message}") from None


def check(spec: GrammarSpec) -> None:
    """ValueError when ``spec`` does not parse (a bad schema, regex or grammar)."""
    _grammar(spec)


def new_bitmask(rows: int, vocab_size: int) -> Any:
    """An int32 bitmask tensor [rows, ceil(vocab_size / 32)], every token allowed."""
    return _xgr().allocate_token_bitmask(rows, vocab_size)


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer on a background thread, cached.

    ``tokenizer``: xllm's Tokenizer; ``vocab_size``: the model's (its logits' width, which
    may exceed the tokenizer's); ``stop_token_ids``: the tokens that end a request (a
    grammar that is complete allows only these)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], *,
                 cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(set(stop_token_ids))
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._futures: OrderedDict[str, Future[Any]] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="xllm-grammar")
        self._compiler: Any = None  # built on the pool's thread, at the first compile

    def _xgr_compiler(self) -> Any:
        if self._compiler is None:
            from transformers import PreTrainedTokenizerFast

            xgr = _xgr()
            hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer.backend)
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop_ids)
            # Our pool is the one thread that compiles; xgrammar's own cache is ours.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def warm(self) -> None:
        """Loads the grammar engine and reads the vocabulary on the compiler's thread now,
        so that the first request's compile is only its own (a server calls this once its
        model is loaded)."""
        self._pool.submit(self._xgr_compiler)

    def _compile(self, spec: GrammarSpec) -> Any:
        grammar = _grammar(spec)
        try:
            return self._xgr_compiler().compile_grammar(grammar)
        except Exception as e:
            raise ValueError(f"the {_NAMES[spec.kind]} could not be compiled: "
                             f"{_first_line(e)}") from None

    def submit(self, spec: GrammarSpec) -> Future[Any]:
        """The compiled grammar of ``spec``, as a Future (done at once when cached). Its
        exception is a ValueError that says what is wrong with the spec."""
        key = spec.key
        with self._lock:
            future = self._futures.get(key)
            if future is not None:
                self._futures.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._futures[key] = future
            while len(self._futures) > self._cache_size:
                self._futures.popitem(last=False)
        # A failed compile is not cached: the same bad spec fails the same way, quickly.
        future.add_done_callback(lambda f, k=key: f.exception() and self._forget(k, f))
        return future

    def _forget(self, key: str, future: Future[Any]) -> None:
        with self._lock:
            if self._futures.get(key) is future:
                del self._futures[key]

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (waits for the compile). ValueError for a bad spec."""
        return self.submit(spec).result()

    def matcher(self, compiled: Any, accepted: Iterable[int] = ()) -> Any:
        """A matcher at the start of ``compiled``, advanced over ``accepted`` (a resumed
        request's tokens so far). ValueError if those tokens do not fit the grammar."""
        m = _xgr().GrammarMatcher(compiled)
        for i, token in enumerate(accepted):
            if not m.accept_token(int(token)):
                raise ValueError(f"generated token {i} ({token}) does not fit the request's "
                                 "structured-output grammar")
        return m

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
