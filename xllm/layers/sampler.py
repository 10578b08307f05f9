"""Sampling for the whole batch at once: one call picks the next token of every request.

Order of work (as vLLM): (1) logprobs of the RAW model logits, if any row asks; (2) repetition,
frequency and presence penalties, then each row's logit_bias, then the structured-output
token bitmask of the rows that have one; (3) suppression of EOS/stop ids below
``min_tokens``; (4) greedy rows: argmax; (5) the other rows: divide by temperature, top-k,
top-p, min-p, then draw.

Drawing is inverse-CDF sampling with one uniform number per row over the kept tokens' weights,
in two levels (float64 sums of 256-token blocks, then one block) so it costs about one pass. An
exponential race (probs / Exp(1) noise, argmax) needs one random number per *token*, and torch's
CPU generator takes tens of milliseconds for the ~3M of a 64 x 49152 batch - more than a small
model's forward pass. With one number per row, a seeded row simply draws it from its own generator.

Top-k, top-p and min-p avoid sorting the vocabulary: a two-level top-k (block maxima, then the
best blocks) yields candidates, and a row is decided from them when its kept set provably ends
inside them; otherwise it is retried with more candidates and, for top-k/top-p, at last a sort.

Seeded rows are batch invariant by construction: each is sampled alone (a [1, vocab] slice through
the same code) with its number drawn from a ``torch.Generator`` seeded by a 64-bit hash of (seed,
tokens generated so far), and the steps before (penalties, suppression) are element-wise with its
own scalars. Its token is a function of (seed, step, logits row) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from xllm import _C
from xllm.sampling_params import SamplingParams

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "apply_penalties",
    "apply_suppression",
    "apply_token_bitmask",
    "has_penalties",
]

_INF = float("inf")
_SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as vLLM): 1/T would overflow
_FIRST_CANDIDATES = 128  # first guess of a top-p/min-p row's kept-set size (most need far fewer)
_ESCALATE = 16  # an undecided row is retried with 16x more candidates (then sorted)
_ARGMAX_BLOCK = 256  # argmax: block maxima, then the first block holding the maximum
_CDF_BLOCK = 256  # inverse CDF: block sums, then a cumsum inside one block
_TOPK_BLOCK = 64  # two-level top-k: the k best blocks of 64 hold the k best tokens
_RANK_LIST = 16  # logprobs: ranks read off a top-16 list when the token is in it
_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, step: int) -> int:
    """Generator seed of a seeded request at ``step`` (tokens generated so far): splitmix64 of
    the seed, plus the step, mixed again - neighbouring seeds and steps give unrelated streams."""
    return _splitmix64((_splitmix64(seed & _MASK64) + step) & _MASK64)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# ---------------------------------------------------------------------------------- the batch


@dataclass
class Penalties:
    """Sparse penalty updates: positions in the flattened ``[n, vocab]`` logits (row * vocab +
    token) and what to do there, so the cost follows the tokens, not the vocabulary."""

    repetition_index: torch.Tensor | None  # int64 [s]: prompt + output tokens, rep != 1 (repeats)
    repetition: torch.Tensor | None  # float32 [s]: that row's penalty
    output_index: torch.Tensor | None  # int64 [t]: distinct output tokens, rows with freq/pres
    frequency: torch.Tensor | None  # float32 [t]: frequency_penalty * count
    presence: torch.Tensor | None  # float32 [t]: presence_penalty


@dataclass
class RandomGroup:
    """Non-greedy rows sampled together: the unseeded full-vocabulary rows, the unseeded rows
    with top-k/top-p/min-p, or ONE seeded row (alone, so its neighbours cannot matter)."""

    rows: torch.Tensor | None  # int64 [m] rows of the batch; None = every row
    temperature: torch.Tensor | None  # float32 [m, 1]; None = every T is 1 (no division)
    min_p: torch.Tensor | None  # float32 [m, 1], 0 = off; None = no row uses it
    top_k: torch.Tensor | None  # int64 [m], 0 = off; None = no row uses it
    top_p: torch.Tensor | None  # float64 [m, 1], 1 = off; None = no row uses it
    needs_full_mass: torch.Tensor | None  # bool [m]: top-p without top-k; None = no such row
    min_p_only: torch.Tensor | None  # bool [m]: min-p is the only restriction; None = no such row
    restricted: bool  # rows use top-k/top-p/min-p (candidate path)
    candidates: int  # first number of candidates for the restricted path
    seed: int | None = None  # mix_seed(seed, step) of a seeded row

    def select(self, idx: torch.Tensor) -> RandomGroup:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx)

        return RandomGroup(
            None, pick(self.temperature), pick(self.min_p), pick(self.top_k), pick(self.top_p),
            pick(self.needs_full_mass), pick(self.min_p_only), self.restricted, self.candidates,
            self.seed,
        )  # fmt: skip


@dataclass
class SamplingBatch:
    """Everything the sampler needs about a batch's rows, built once per step by ``build``.

    The flags let the sampler skip work nobody asked for; the per-row parameter tensors
    (``temperature``, ``top_k``, ...) are built on demand, as the sampler works on ``groups``.
    """

    n: int
    vocab_size: int
    device: torch.device
    params: list[SamplingParams]
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalties: bool
    max_logprobs: int | None  # None: no row asks for logprobs
    greedy_rows: torch.Tensor | None  # int64; None when there are none (or every row is greedy)
    groups: list[RandomGroup]
    penalties: Penalties | None
    suppress_index: torch.Tensor | None  # int64: row * vocab + token to mask to -inf
    logprob_rows: torch.Tensor | None  # int64; None = every row asks (or none does)
    bias_index: torch.Tensor | None = None  # int64: row * vocab + token given a logit_bias
    bias: torch.Tensor | None = None  # float32: that bias
    # Structured outputs: row mask_rows[i] may only sample tokens whose bit is set in
    # bitmask[i] (int32 words, bit j % 32 of word j // 32 = token j; xgrammar's layout).
    mask_rows: torch.Tensor | None = None  # int64 [m]
    bitmask: torch.Tensor | None = None  # int32 [m, ceil(vocab / 32)]

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        suppress_token_ids: list[list[int]] | None = None,
        num_pending: list[int] | None = None,
        mask_rows: list[int] | None = None,
        bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """``suppress_token_ids[i]``: ids masked to -inf in row i this step (the engine passes
        EOS + stop ids while a request has fewer than min_tokens outputs); ids outside the
        vocabulary can never be sampled anyway and are ignored. Seeded rows use
        ``len(output_token_ids[i])`` as their step, plus ``num_pending[i]``: outputs a step
        still in flight is sampling, not yet in the list (overlap scheduling). A row with
        penalties cannot have any: they depend on those tokens' values."""
        if not isinstance(params, (list, tuple)):
            raise ValueError(
                f"params must be a list of SamplingParams, got {type(params).__name__}"
            )
        n = len(params)
        _check_rows("prompt_token_ids", prompt_token_ids, n)
        _check_rows("output_token_ids", output_token_ids, n)
        if suppress_token_ids is not None:
            _check_rows("suppress_token_ids", suppress_token_ids, n)
        if num_pending is not None and len(num_pending) != n:
            raise ValueError(f"num_pending has {len(num_pending)} entries for {n} rows")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        device, v = torch.device(device), vocab_size
        if (mask_rows is None) != (bitmask is None):
            raise ValueError("mask_rows and bitmask go together")
        if mask_rows is not None:
            words = -(-v // 32)
            if (bitmask.dtype != torch.int32 or bitmask.dim() != 2  # type: ignore[union-attr]
                    or bitmask.shape[0] != len(mask_rows) or bitmask.shape[1] < words):
                raise ValueError(f"bitmask must be int32 [{len(mask_rows)}, >= {words}] (one "
                                 "row of words per masked row)")
            if any(not 0 <= r < n for r in mask_rows):
                raise ValueError(f"mask_rows must be rows of the batch, in [0, {n})")

        greedy = [p.temperature < _SAMPLING_EPS for p in params]
        top_k = [p.top_k if 0 < p.top_k < v else 0 for p in params]
        restricted = [
            bool(k) or p.top_p < 1.0 or p.min_p > 0.0 for p, k in zip(params, top_k, strict=True)
        ]
        plain: list[int] = []
        limited: list[int] = []
        seeded: list[RandomGroup] = []
        for i, p in enumerate(params):
            if greedy[i]:
                continue
            if p.seed is not None:
                step = len(output_token_ids[i]) + (num_pending[i] if num_pending else 0)
                seeded.append(_group([i], params, top_k, v, device, mix_seed(p.seed, step)))
            else:
                (limited if restricted[i] else plain).append(i)
        groups = [_group(r, params, top_k, v, device, None, len(r) == n) for r in (plain, limited)]

        sampled = [(p, k) for p, k, g in zip(params, top_k, greedy, strict=True) if not g]
        greedy_idx = [i for i in range(n) if greedy[i]]
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        penalties = _build_penalties(params, prompt_token_ids, output_token_ids, v, device)
        if penalties is not None and num_pending and any(
            num_pending[i] and has_penalties(p) for i, p in enumerate(params)
        ):
            raise ValueError(
                "a row with penalties has outputs still being sampled (num_pending): build "
                "its batch once they are in output_token_ids"
            )
        return cls(
            n=n,
            vocab_size=v,
            device=device,
            params=list(params),
            all_greedy=n > 0 and len(greedy_idx) == n,
            any_top_k=any(k for _, k in sampled),
            any_top_p=any(p.top_p < 1.0 for p, _ in sampled),
            any_min_p=any(p.min_p > 0.0 for p, _ in sampled),
            any_penalties=penalties is not None,
            max_logprobs=max((params[i].logprobs for i in asking), default=None),
            greedy_rows=_index(greedy_idx, device) if 0 < len(greedy_idx) < n else None,
            groups=[g for g in groups if g is not None] + seeded,
            penalties=penalties,
            suppress_index=_build_suppression(suppress_token_ids, v, device),
            logprob_rows=_index(asking, device) if 0 < len(asking) < n else None,
            **_build_bias(params, v, device),
            mask_rows=None if not mask_rows else _index(mask_rows, device),
            bitmask=None if not mask_rows else bitmask.to(device),  # type: ignore[union-attr]
        )

    @property
    def temperature(self) -> torch.Tensor:
        return self._per_row("temperature", torch.float32)

    @property
    def top_k(self) -> torch.Tensor:
        return self._per_row("top_k", torch.long)

    @property
    def top_p(self) -> torch.Tensor:
        return self._per_row("top_p", torch.float32)

    @property
    def min_p(self) -> torch.Tensor:
        return self._per_row("min_p", torch.float32)

    @property
    def repetition_penalty(self) -> torch.Tensor:
        return self._per_row("repetition_penalty", torch.float32)

    @property
    def presence_penalty(self) -> torch.Tensor:
        return self._per_row("presence_penalty", torch.float32)

    @property
    def frequency_penalty(self) -> torch.Tensor:
        return self._per_row("frequency_penalty", torch.float32)

    def _per_row(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        values = [getattr(p, name) for p in self.params]
        return torch.tensor(values, dtype=dtype, device=self.device)


def _check_rows(name: str, rows: object, n: int) -> None:
    if not isinstance(rows, (list, tuple)) or len(rows) != n:
        got = len(rows) if isinstance(rows, (list, tuple)) else type(rows).__name__
        raise ValueError(f"{name} must hold one list of token ids per row ({n} rows), got {got}")


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[float], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _group(
    rows: list[int],
    params: list[SamplingParams],
    top_k: list[int],
    v: int,
    device: torch.device,
    seed: int | None,
    all_rows: bool = False,
) -> RandomGroup | None:
    if not rows:
        return None
    ps = [params[i] for i in rows]
    ks = [top_k[i] for i in rows]
    any_k = any(ks)
    any_p = any(p.top_p < 1.0 for p in ps)
    any_min_p = any(p.min_p > 0.0 for p in ps)
    full_mass = [p.top_p < 1.0 and not k for p, k in zip(ps, ks, strict=True)]
    min_p_only = [p.min_p > 0.0 and p.top_p == 1.0 and not k for p, k in zip(ps, ks, strict=True)]
    # A top-k row needs k + 1 candidates: the extra one shows whether the k-th value is tied.
    need = [k + 1 if k else _FIRST_CANDIDATES for k in ks]
    return RandomGroup(
        rows=None if all_rows else _index(rows, device),
        temperature=None
        if all(p.temperature == 1.0 for p in ps)
        else _column([p.temperature for p in ps], device),
        min_p=_column([p.min_p for p in ps], device) if any_min_p else None,
        top_k=torch.tensor(ks, dtype=torch.long, device=device) if any_k else None,
        top_p=_column([p.top_p for p in ps], device, torch.float64) if any_p else None,
        needs_full_mass=torch.tensor(full_mass, device=device) if any(full_mass) else None,
        min_p_only=torch.tensor(min_p_only, device=device) if any(min_p_only) else None,
        restricted=any_k or any_p or any_min_p,
        candidates=min(max(need), v),
        seed=seed,
    )


def _int64(name: str, lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """All ids of ``lists`` as one int64 CPU tensor, plus each list's length. ``np.fromiter``
    copies the ints ~10x faster than ``torch.tensor`` of a long Python list."""
    lengths = [len(ids) for ids in lists]
    try:
        flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=sum(lengths))
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{name} must hold lists of int token ids ({e})") from None
    return torch.from_numpy(flat), torch.tensor(lengths, dtype=torch.long)


def _flat_keys(
    name: str, lists: list[list[int]], rows: list[int], v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row * v + token, row) of every token of ``lists[r]`` for r in rows (CPU), range-checked."""
    tokens, lengths = _int64(name, [lists[r] for r in rows])
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= v):
        bad = int(((tokens < 0) | (tokens >= v)).nonzero()[0])
        raise ValueError(
            f"{name}[{int(row_of[bad])}] holds token id {int(tokens[bad])}, outside the "
            f"vocabulary [0, {v})"
        )
    return row_of * v + tokens, row_of


def argmax_only(batch: SamplingBatch | None) -> bool:
    """Whether sampling ``batch`` is the argmax of the raw logits and nothing more: every row
    greedy, no logprobs, penalties, suppressed ids, logit bias or grammar mask (Sampler
    then returns ``argmax_first(logits)``)."""
    return (batch is not None and batch.all_greedy and batch.max_logprobs is None
            and batch.penalties is None and batch.suppress_index is None
            and batch.bias_index is None and batch.mask_rows is None)


def plain_greedy(p: SamplingParams) -> bool:
    """Whether a row with these params, once past its min_tokens and without a grammar, is
    sampled as the argmax of its raw logits (a batch of such rows is ``argmax_only``)."""
    return (p.temperature < _SAMPLING_EPS and p.logprobs is None and not has_penalties(p)
            and not p.logit_bias)


def has_penalties(p: SamplingParams) -> bool:
    """Whether a row's logits depend on its earlier tokens (repetition, frequency, presence)."""
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _build_penalties(
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
    v: int,
    device: torch.device,
) -> Penalties | None:
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    out_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if not rep_rows and not out_rows:
        return None
    pen = Penalties(None, None, None, None, None)
    if rep_rows:
        keys_p, _ = _flat_keys("prompt_token_ids", prompts, rep_rows, v)
        keys_o, _ = _flat_keys("output_token_ids", outputs, rep_rows, v)
        # Repeated pairs are harmless (each copy computes the same value from the same logit),
        # so no sort/unique over the prompts is needed.
        keys = torch.cat([keys_p, keys_o])
        factor = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
        pen.repetition_index = keys.to(device)
        pen.repetition = factor[keys // v].to(device)
    if out_rows:
        keys, _ = _flat_keys("output_token_ids", outputs, out_rows, v)
        keys, counts = torch.unique(keys, return_counts=True)
        rows = keys // v
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)
        pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)
        pen.output_index = keys.to(device)
        pen.frequency = (freq[rows] * counts.float()).to(device)
        pen.presence = pres[rows].to(device)
    return pen


def _build_bias(params: list[SamplingParams], v: int,
                device: torch.device) -> dict[str, torch.Tensor | None]:
    """The batch's logit_bias entries as flat indices and values (ids outside the vocabulary
    can never be sampled and are left out)."""
    index: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                if token < v:
                    index.append(row * v + token)
                    values.append(bias)
    if not index:
        return {"bias_index": None, "bias": None}
    return {"bias_index": torch.tensor(index, dtype=torch.int64, device=device),
            "bias": torch.tensor(values, dtype=torch.float32, device=device)}


def _build_suppression(
    suppress: list[list[int]] | None, v: int, device: torch.device
) -> torch.Tensor | None:
    if not suppress:
        return None
    tokens, lengths = _int64("suppress_token_ids", suppress)
    rows = torch.repeat_interleave(torch.arange(len(suppress)), lengths)
    if tokens.numel() and int(tokens.min()) < 0:
        row = int(rows[int((tokens < 0).nonzero()[0])])
        raise ValueError(f"suppress_token_ids[{row}] must hold token ids >= 0")
    inside = tokens < v
    if not bool(inside.any()):
        return None
    return (rows[inside] * v + tokens[inside]).to(device)


# ---------------------------------------------------------------------------------- sampling


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [n]
    # float32 [n, k+1] / int64 [n, k+1]: column 0 the sampled token, then the top-k alternatives
    # (k = max requested, best first). Rows that asked for no logprobs hold NaN / -1.
    logprobs: torch.Tensor | None = None
    logprob_token_ids: torch.Tensor | None = None
    ranks: torch.Tensor | None = None  # int64 [n]: 1 + number of tokens with a higher logprob


class Sampler:
    """Callable ``(logits [n, vocab], batch) -> SamplerOutput``; never modifies ``logits``.

    ``seed`` seeds the generator shared by unseeded rows (reproducible runs); None draws one.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed & _MASK64)
            self._generators[device] = gen
        return gen

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        _check_logits(logits, batch)
        n, device, k = batch.n, logits.device, batch.max_logprobs
        if n == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            if k is None:
                return SamplerOutput(empty)
            ids = torch.empty(0, k + 1, dtype=torch.long, device=device)
            return SamplerOutput(empty, torch.empty(0, k + 1, device=device), ids, empty)
        raw = logits.float().contiguous()  # no-ops for the usual fp32 contiguous logits
        processed = raw
        if (batch.penalties is not None or batch.suppress_index is not None
                or batch.bias_index is not None or batch.mask_rows is not None):
            # a contiguous copy: the caller's logits stay untouched, and updates go to flat indices
            processed = raw.clone(memory_format=torch.contiguous_format)
            apply_penalties(processed, batch)
            if batch.bias_index is not None:
                processed.view(-1).index_add_(0, batch.bias_index, batch.bias)
            apply_token_bitmask(processed, batch)
            apply_suppression(processed, batch)

        if batch.all_greedy:
            tokens = argmax_first(processed)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=device)
            if batch.greedy_rows is not None:
                rows = batch.greedy_rows
                tokens.index_copy_(0, rows, argmax_first(processed[rows]))
            for group in batch.groups:
                self._sample_group(processed, group, tokens)

        out = SamplerOutput(tokens)
        if k is not None:
            _fill_logprobs(out, raw, batch, k)
        return out

    def _sample_group(self, logits: torch.Tensor, group: RandomGroup, tokens: torch.Tensor) -> None:
        # Whole rows are taken with advanced indexing, not index_select: for 2-D tensors
        # index_select copies row by row, one OpenMP region per row, which stalls for
        # milliseconds per row whenever the machine is oversubscribed.
        rows = logits if group.rows is None else logits[group.rows]
        m, device = rows.shape[0], rows.device
        if group.seed is None:
            gen = self._generator(device)
        else:  # a fresh generator per (seed, step): the row's draw ignores everything else
            gen = torch.Generator(device=device)
            gen.manual_seed(group.seed)
        u = torch.rand(m, generator=gen, dtype=torch.float64, device=device)
        if group.restricted:
            picked = _sample_restricted(rows, group, u, group.candidates, None)
        else:
            picked = _sample_full(rows, group, u)
        if group.rows is None:
            tokens.copy_(picked)
        else:
            tokens.index_copy_(0, group.rows, picked)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens), in
    place on contiguous ``logits`` [n, vocab]. Repetition as HF/vLLM: a seen token's positive
    logit is divided by the penalty, a negative one multiplied. Frequency/presence as OpenAI:
    ``logit -= frequency * count``, then ``logit -= presence`` for tokens in the output."""
    pen = batch.penalties
    if pen is None:
        return
    flat = logits.view(-1)
    if pen.repetition_index is not None:
        vals = flat.index_select(0, pen.repetition_index)
        factor = pen.repetition
        flat.index_copy_(
            0, pen.repetition_index, torch.where(vals > 0, vals / factor, vals * factor)
        )
    if pen.output_index is not None:
        vals = flat.index_select(0, pen.output_index)
        flat.index_copy_(0, pen.output_index, (vals - pen.frequency) - pen.presence)


def apply_token_bitmask(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """-inf, in place, on each masked row's tokens whose bit is clear (native on CPU: a masked
    vector store per 16 tokens; elsewhere the bits unpacked by torch)."""
    rows, bitmask = batch.mask_rows, batch.bitmask
    if rows is None or bitmask is None:
        return
    if logits.device.type == "cpu":
        _C.apply_token_bitmask(logits, bitmask, rows)
        return
    v = logits.shape[1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :v].bool()
    sub = logits.index_select(0, rows)
    logits.index_copy_(0, rows, sub.masked_fill_(~allowed, -_INF))


def apply_suppression(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Mask each row's suppressed ids (EOS/stop ids below min_tokens) to -inf, in place."""
    if batch.suppress_index is not None:
        logits.view(-1).index_fill_(0, batch.suppress_index, -_INF)


def argmax_first(x: torch.Tensor) -> torch.Tensor:
    """Row argmax, ties -> lowest index (a NaN, as torch.argmax, wins). On CPU fp32 the native
    ``argmax_rows`` (one vector pass for the maximum, a scan for its first index; ~5x the
    torch ops below on a batch's [64, 49152] logits). Elsewhere in two levels: ``amax`` over
    256-wide blocks streams the row several times faster than ``torch.argmax``; the first
    block holding the row maximum holds its first occurrence, and only that block is
    searched element by element."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] and x.stride(1) == 1:
        out = torch.empty(x.shape[0], dtype=torch.long)
        _C.argmax_rows(out, x)
        return out
    v = x.shape[1]
    if v <= 4 * _ARGMAX_BLOCK:
        return x.argmax(-1)
    first_block = _blocked(x, _ARGMAX_BLOCK, torch.amax).argmax(-1, keepdim=True)
    idx, valid = _block_indices(first_block, _ARGMAX_BLOCK, v)
    vals = x.gather(1, idx).masked_fill_(~valid, -_INF)
    return idx.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1)


def topk_two_level(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest per row, best first. The k best tokens lie in the k
    64-wide blocks with the largest maxima (plus a short tail block, always searched), so only
    those ~k * 64 values are copied (whole blocks, one index_select) and searched."""
    m, v = x.shape
    nb = v // _TOPK_BLOCK
    if k * _TOPK_BLOCK * 4 > v:
        return x.topk(k, dim=-1)
    x = x.contiguous()
    main = x[:, : nb * _TOPK_BLOCK].view(m, nb, _TOPK_BLOCK)
    blocks = main.amax(-1).topk(k, dim=-1).indices  # [m, k]
    width = k * _TOPK_BLOCK
    if v == nb * _TOPK_BLOCK:  # rows of blocks: one index_select copies whole blocks
        flat = blocks + torch.arange(0, m * nb, nb, device=x.device).unsqueeze(1)
        cand = x.view(m * nb, _TOPK_BLOCK).index_select(0, flat.view(-1)).view(m, width)
    else:
        rows = torch.arange(m, device=x.device).unsqueeze(1)
        cand = torch.cat([main[rows, blocks].view(m, width), x[:, nb * _TOPK_BLOCK :]], 1)
    vals, pos = cand.topk(k, dim=-1)
    in_main = blocks.gather(1, (pos // _TOPK_BLOCK).clamp_(max=k - 1)) * _TOPK_BLOCK
    ids = torch.where(pos < width, in_main + pos % _TOPK_BLOCK, pos - width + nb * _TOPK_BLOCK)
    return vals, ids


def _blocked(x: torch.Tensor, block: int, reduce) -> torch.Tensor:
    """``reduce`` over consecutive ``block``-wide column blocks; a short tail block included."""
    m, v = x.shape
    nb = v // block
    parts = [reduce(x[:, : nb * block].view(m, nb, block), -1)] if nb else []
    if v % block:
        parts.append(reduce(x[:, nb * block :], -1).unsqueeze(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _block_indices(blocks: torch.Tensor, block: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices [m, nblocks * block] of the given blocks (clamped) and which are real."""
    idx = (blocks.unsqueeze(-1) * block + torch.arange(block, device=blocks.device)).flatten(1)
    valid = idx < v
    return idx.clamp_(max=v - 1), valid


def _sample_full(logits: torch.Tensor, group: RandomGroup, u: torch.Tensor) -> torch.Tensor:
    """Temperature (and min-p) over the whole vocabulary: softmax(l / T), then draw."""
    x = logits if group.temperature is None else logits / group.temperature
    probs = torch.softmax(x, dim=-1)  # one fused, cache-friendly pass per row
    if group.min_p is not None:  # min-p as vLLM: p < min_p * p_max is dropped
        probs = torch.where(probs < group.min_p * probs.amax(-1, keepdim=True), 0.0, probs)
    return _inverse_cdf(probs, u)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn with probability proportional to ``weights`` [m, V] (>= 0, each row > 0) for
    uniforms ``u`` [m] (float64). Block sums accumulate in float64 so tail tokens keep their
    share; a short float64 cumsum inside the chosen block finds the token."""
    v = weights.shape[1]
    sums = _blocked(weights, _CDF_BLOCK, torch.sum).double().cumsum_(-1)  # [m, blocks]
    total = sums[:, -1:].contiguous()
    target = u.unsqueeze(1) * total
    # u * total may round up to total: then take the last block with weight (it ends at total).
    block = torch.minimum(
        torch.searchsorted(sums, target, right=True), torch.searchsorted(sums, total)
    )
    before = torch.where(block > 0, sums.gather(1, (block - 1).clamp_(min=0)), 0.0)
    idx, valid = _block_indices(block, _CDF_BLOCK, v)
    inner = weights.gather(1, idx).masked_fill_(~valid, 0.0).double().cumsum_(-1)
    pos = torch.searchsorted(inner, target - before, right=True)
    pos = torch.minimum(pos, torch.searchsorted(inner, inner[:, -1:].contiguous()))
    return idx.gather(1, pos).squeeze(1)


def _sample_restricted(
    logits: torch.Tensor,
    group: RandomGroup,
    u: torch.Tensor,
    candidates: int,
    full_mass: torch.Tensor | None,
) -> torch.Tensor:
    """Top-k / top-p / min-p rows drawn from their ``candidates`` best tokens.

    Kept tokens are those at or above a per-row threshold, so ties at a boundary are all kept
    (as HF/vLLM). A row is decided when its last candidate is not kept (nothing after it can be)
    and, with top-k, lies strictly below the k-th value (so the top-k mass is complete). Others
    are retried with more candidates - min-p-only rows over the whole vocabulary instead.
    """
    m, v = logits.shape
    if candidates * 4 >= v:
        candidates = v
        vals, ids = logits.sort(dim=-1, descending=True)
    else:
        vals, ids = topk_two_level(logits, candidates)
    scaled = vals - vals[:, :1]  # <= 0, the best is 0 (same arithmetic as softmax's shift)
    if group.temperature is not None:
        scaled /= group.temperature
    weights = scaled.exp()  # relative to the best token's
    keep = torch.ones_like(scaled, dtype=torch.bool)
    k_on = kth = None
    if group.top_k is not None:
        k_on = (group.top_k > 0).unsqueeze(1)
        kth_idx = (group.top_k.clamp(1, candidates) - 1).unsqueeze(1)
        kth = torch.where(k_on, scaled.gather(1, kth_idx), -_INF)  # [m, 1]
        keep = scaled >= kth
    if group.top_p is not None:
        cum = torch.where(keep, weights, 0.0).double().cumsum_(-1)
        mass = cum[:, -1:]  # the top-k set's mass: complete for decided top-k rows
        if group.needs_full_mass is not None and candidates < v:
            if full_mass is None:  # top-p over the whole vocabulary needs every token's weight
                x = logits if group.temperature is None else logits / group.temperature
                full_mass = 1.0 / torch.softmax(x, -1).gather(1, ids[:, :1]).double()
            mass = torch.where(group.needs_full_mass.unsqueeze(1), full_mass, mass)
        # Position j is in the nucleus when the mass before it is < p * mass (vLLM's rule).
        count = 1 + (cum[:, :-1] < group.top_p * mass).sum(-1, keepdim=True)
        keep &= scaled >= torch.where(group.top_p < 1.0, scaled.gather(1, count - 1), -_INF)
    if group.min_p is not None:
        keep &= weights >= group.min_p

    cum = torch.where(keep, weights, 0.0).double().cumsum_(-1)
    total = cum[:, -1:].contiguous()
    pos = torch.searchsorted(cum, u.unsqueeze(1) * total, right=True)
    pos = torch.minimum(pos, torch.searchsorted(cum, total))  # u * total rounded up to total
    tokens = ids.gather(1, pos).squeeze(1)
    if candidates == v:
        return tokens
    undecided = keep[:, -1]
    if k_on is not None:
        undecided |= (k_on & (scaled[:, -1:] >= kth)).squeeze(1)
    if bool(undecided.any()):  # a host sync, but only to pick a few rows to redo
        _redo(logits, group, u, candidates, full_mass, undecided, tokens)
    return tokens


def _redo(
    logits: torch.Tensor,
    group: RandomGroup,
    u: torch.Tensor,
    candidates: int,
    full_mass: torch.Tensor | None,
    undecided: torch.Tensor,
    tokens: torch.Tensor,
) -> None:
    """Resample the undecided rows: min-p-only rows over the whole vocabulary (their kept set is
    a plain threshold), the others from more candidates and at last a sort."""
    if group.min_p_only is not None:
        wide = (undecided & group.min_p_only).nonzero().squeeze(1)
        undecided = undecided & ~group.min_p_only
        if wide.numel():
            sub = group.select(wide)
            tokens[wide] = _sample_full(logits[wide], sub, u[wide])
    rows = undecided.nonzero().squeeze(1)
    if rows.numel():
        mass = None if full_mass is None else full_mass.index_select(0, rows)
        more = max(candidates * _ESCALATE, 2048)
        tokens[rows] = _sample_restricted(logits[rows], group.select(rows), u[rows], more, mass)


def _fill_logprobs(out: SamplerOutput, raw: torch.Tensor, batch: SamplingBatch, k: int) -> None:
    """Log-softmax of the raw logits: the sampled token's logprob and rank, then the top k."""
    rows = batch.logprob_rows
    logits = raw if rows is None else raw[rows]
    tokens = (out.token_ids if rows is None else out.token_ids.index_select(0, rows)).unsqueeze(1)
    m, v = logits.shape
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens)
    # Every token above the chosen one is in a top list holding the chosen one: count there, and
    # compare against the whole row only for rows whose token is not in the top list.
    listed = min(max(k, _RANK_LIST), v)
    top_lp, top_ids = topk_two_level(logprobs, listed)
    ranks = 1 + (top_lp > chosen).sum(-1)
    outside = ~(top_ids == tokens).any(-1)
    if bool(outside.any()):
        far = outside.nonzero().squeeze(1)
        ranks[far] = 1 + (logprobs[far] > chosen[far]).sum(-1)
    shown = min(k, v)
    lp = torch.cat([chosen, top_lp[:, :shown]], 1)
    ids = torch.cat([tokens, top_ids[:, :shown]], 1)
    if shown < k:  # a vocabulary smaller than the request: pad
        lp = torch.cat([lp, lp.new_full((m, k - shown), math.nan)], 1)
        ids = torch.cat([ids, ids.new_full((m, k - shown), -1)], 1)
    if rows is None:
        out.logprobs, out.logprob_token_ids, out.ranks = lp, ids, ranks
        return
    n = batch.n
    out.logprobs = lp.new_full((n, k + 1), math.nan).index_copy_(0, rows, lp)
    out.logprob_token_ids = ids.new_full((n, k + 1), -1).index_copy_(0, rows, ids)
    out.ranks = ranks.new_full((n,), -1).index_copy_(0, rows, ranks)


def _check_logits(logits: object, batch: SamplingBatch) -> None:
    if not isinstance(batch, SamplingBatch):
        raise ValueError(f"batch must be a SamplingBatch, got {type(batch).__name__}")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point torch.Tensor [num_rows, vocab_size]")
    if logits.dim() != 2 or tuple(logits.shape) != (batch.n, batch.vocab_size):
        raise ValueError(
            f"logits must have shape [{batch.n}, {batch.vocab_size}] (rows x vocab of the "
            f"SamplingBatch), got {list(logits.shape)}"
        )
    if logits.device != batch.device:
        raise ValueError(
            f"logits are on {logits.device} but the SamplingBatch was built for {batch.device}"
        )
