"""Sampling for the whole batch at once: one call picks the next token of every request.

Order of work (as vLLM): (1) logprobs of the RAW model logits, if any row asks; (2) repetition,
frequency and presence penalties; (3) suppression of EOS/stop ids below ``min_tokens``; (4) greedy
rows: argmax; (5) the other rows: divide by temperature, top-k, top-p, min-p, then draw.

Drawing is inverse-CDF sampling with one uniform number per row (probability-proportional pick
over the kept tokens), done in two levels (block sums in float64, then one block) so it costs
about one pass over the logits. An exponential race (probs / Exp(1) noise, argmax) needs one
random number per *token*: torch's CPU generator makes ~3M of them for a 64 x 49152 batch in
tens of milliseconds, more than the whole forward pass of a small model. One number per row keeps
per-request seeds just as easy: a seeded row draws its number from its own generator.

Top-k/top-p never sort the vocabulary when they can avoid it: a two-level top-k (block maxima,
then the best blocks) gives candidates, and a row is resolved from them when its kept set provably
ends inside them; otherwise the row is retried with more candidates, and finally with a sort.

Batch invariance of seeded rows holds by construction: each seeded row is sampled alone (a
``[1, vocab]`` slice through the same code), its number drawn from ``torch.Generator`` seeded with
a 64-bit hash of (seed, tokens generated so far), and every step before it (penalties, suppression,
temperature) is element-wise with that row's own scalars. So its token is a function of (seed,
step, logits row) only - not of the batch size, its position or its neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xllm.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "apply_penalties", "apply_suppression"]

_INF = float("inf")
_ARGMAX_BLOCK = 256  # argmax: block maxima over 256-wide blocks, then one block
_CDF_BLOCK = 256  # inverse CDF: block sums, then a cumsum inside one block
_TOPK_BLOCK = 64  # two-level top-k: k best blocks of 64 hold the k best tokens
_ESCALATE = 16  # an unresolved top-p row is retried with 16x more candidates, then sorted
_SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as vLLM): 1/T would overflow
_TOP_P_CANDIDATES = 128  # first guess of a top-p row's nucleus size (most fit in far fewer)
_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, step: int) -> int:
    """64-bit generator seed of a seeded request at ``step`` (= tokens generated so far):
    splitmix64 of the seed, plus the step, mixed again, so neighbouring seeds and steps give
    unrelated streams."""
    return _splitmix64((_splitmix64(seed & _MASK64) + step) & _MASK64)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class Penalties:
    """Penalty state of the rows that use any penalty (``rows``; None = every row)."""

    rows: torch.Tensor | None  # int64 [p]
    repetition: torch.Tensor  # float32 [p, 1]
    frequency: torch.Tensor  # float32 [p, 1]
    presence: torch.Tensor  # float32 [p, 1]
    counts: torch.Tensor  # float32 [p, vocab]: occurrences of each token in the output
    seen: torch.Tensor | None  # bool [p, vocab]: in prompt or output (None: no repetition penalty)
    any_frequency: bool
    any_presence: bool


@dataclass
class RandomGroup:
    """Non-greedy rows sampled together: all unseeded full-vocabulary rows, all unseeded top-k/
    top-p rows, or ONE seeded row (sampled alone so its token ignores the rest of the batch)."""

    rows: torch.Tensor | None  # int64 [m] rows of the batch; None = every row
    temperature: torch.Tensor  # float32 [m, 1]
    min_p: torch.Tensor | None  # float32 [m, 1]; None = no row uses min-p
    top_k: torch.Tensor | None  # int64 [m], 0 = off; None = no row uses top-k
    top_p: torch.Tensor | None  # float64 [m], 1 = off; None = no row uses top-p
    top_p_full_mass: torch.Tensor | None  # bool [m]: top-p without top-k (needs the full mass)
    restricted: bool  # some row uses top-k or top-p
    candidates: int  # first number of candidate tokens for restricted rows
    seed: int | None = None  # mix_seed(seed, step) of a seeded row

    def select(self, idx: torch.Tensor) -> RandomGroup:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx)

        return RandomGroup(
            None,
            self.temperature.index_select(0, idx),
            pick(self.min_p),
            pick(self.top_k),
            pick(self.top_p),
            pick(self.top_p_full_mass),
            self.restricted,
            self.candidates,
            self.seed,
        )


@dataclass
class SamplingBatch:
    """Everything the sampler needs about a batch's rows, built once per step by ``build``."""

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
    greedy_rows: torch.Tensor | None  # int64; None when there are none (or all rows are greedy)
    random_groups: list[RandomGroup]
    penalties: Penalties | None
    suppress_rows: torch.Tensor | None  # int64 [s] with suppress_tokens: (row, token) to mask
    suppress_tokens: torch.Tensor | None
    logprob_rows: torch.Tensor | None  # int64; None = every row asks (or none does)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        suppress_token_ids: list[list[int]] | None = None,
    ) -> SamplingBatch:
        """``suppress_token_ids[i]``: ids masked to -inf in row i this step (the engine passes
        EOS + stop ids while a request has fewer than min_tokens outputs); ids outside the
        vocabulary can never be sampled, so they are ignored."""
        n = len(params)
        _check_rows("prompt_token_ids", prompt_token_ids, n)
        _check_rows("output_token_ids", output_token_ids, n)
        if suppress_token_ids is not None:
            _check_rows("suppress_token_ids", suppress_token_ids, n)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        device = torch.device(device)
        v = vocab_size

        greedy = [p.temperature < _SAMPLING_EPS for p in params]
        top_k = [p.top_k if 0 < p.top_k < v else 0 for p in params]
        full_rows: list[int] = []
        restricted_rows: list[int] = []
        groups: list[RandomGroup] = []
        for i, p in enumerate(params):
            if greedy[i]:
                continue
            if p.seed is not None:
                step = len(output_token_ids[i])
                groups.append(_group([i], params, top_k, v, device, mix_seed(p.seed, step)))
            elif top_k[i] or p.top_p < 1.0:
                restricted_rows.append(i)
            else:
                full_rows.append(i)
        unseeded = [r for r in (full_rows, restricted_rows) if r]
        groups[:0] = [_group(r, params, top_k, v, device, None, len(r) == n) for r in unseeded]

        greedy_idx = [i for i in range(n) if greedy[i]]
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            n=n,
            vocab_size=v,
            device=device,
            params=list(params),
            all_greedy=n > 0 and len(greedy_idx) == n,
            any_top_k=any(top_k[i] for i in range(n) if not greedy[i]),
            any_top_p=any(p.top_p < 1.0 for p, g in zip(params, greedy, strict=True) if not g),
            any_min_p=any(p.min_p > 0.0 for p, g in zip(params, greedy, strict=True) if not g),
            any_penalties=any(_uses_penalty(p) for p in params),
            max_logprobs=max((params[i].logprobs for i in asking), default=None),
            greedy_rows=_index(greedy_idx, device) if 0 < len(greedy_idx) < n else None,
            random_groups=groups,
            penalties=_build_penalties(params, prompt_token_ids, output_token_ids, v, device),
            **_build_suppression(suppress_token_ids, v, device),
            logprob_rows=_index(asking, device) if 0 < len(asking) < n else None,
        )

    # Per-row views of the parameters (for callers and tests; the sampler uses the groups).
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
        return torch.tensor(
            [getattr(p, name) for p in self.params], dtype=dtype, device=self.device
        )


def _check_rows(name: str, rows: object, n: int) -> None:
    if not isinstance(rows, (list, tuple)) or len(rows) != n:
        got = len(rows) if isinstance(rows, (list, tuple)) else type(rows).__name__
        raise ValueError(
            f"{name} must be a list with one list of token ids per row ({n}), got {got}"
        )


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _uses_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _group(
    rows: list[int],
    params: list[SamplingParams],
    top_k: list[int],
    v: int,
    device: torch.device,
    seed: int | None,
    all_rows: bool = False,
) -> RandomGroup:
    ps = [params[i] for i in rows]
    ks = [top_k[i] for i in rows]
    any_k = any(ks)
    any_p = any(p.top_p < 1.0 for p in ps)
    full_mass = [p.top_p < 1.0 and not k for p, k in zip(ps, ks, strict=True)]
    # A top-k row needs k + 1 candidates: the extra one shows whether the k-th value is tied.
    need = [
        k + 1 if k else _TOP_P_CANDIDATES for k, p in zip(ks, ps, strict=True) if k or p.top_p < 1.0
    ]

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    return RandomGroup(
        rows=None if all_rows else _index(rows, device),
        temperature=col([p.temperature for p in ps]),
        min_p=col([p.min_p for p in ps]) if any(p.min_p > 0.0 for p in ps) else None,
        top_k=torch.tensor(ks, dtype=torch.long, device=device) if any_k else None,
        top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float64, device=device)
        if any_p
        else None,
        top_p_full_mass=torch.tensor(full_mass, device=device) if any(full_mass) else None,
        restricted=any_k or any_p,
        candidates=min(max(need, default=1), v),
        seed=seed,
    )


def _flat_tokens(
    name: str, lists: list[list[int]], rows: list[int], v: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row position, token) pairs of ``lists[rows[j]]`` for j = 0.., checked against the vocab."""
    chosen = [lists[r] for r in rows]
    lengths = torch.tensor([len(t) for t in chosen], dtype=torch.long)
    tokens = torch.tensor([t for ts in chosen for t in ts], dtype=torch.long)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= v):
        bad = int(((tokens < 0) | (tokens >= v)).nonzero()[0])
        row = rows[int(torch.searchsorted(lengths.cumsum(0), torch.tensor(bad), right=True))]
        raise ValueError(
            f"{name}[{row}] holds token id {int(tokens[bad])}, outside the vocabulary [0, {v})"
        )
    row_pos = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    return row_pos.to(device), tokens.to(device)


def _build_penalties(
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
    v: int,
    device: torch.device,
) -> Penalties | None:
    rows = [i for i, p in enumerate(params) if _uses_penalty(p)]
    if not rows:
        return None
    ps = [params[i] for i in rows]

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    # Vectorised counting: one scatter-add of every (row, token) pair, no loop over tokens.
    counts = torch.zeros(len(rows), v, device=device)
    row_pos, tokens = _flat_tokens("output_token_ids", outputs, rows, v, device)
    counts.index_put_((row_pos, tokens), torch.ones_like(tokens, dtype=counts.dtype), True)
    seen = None
    rep_rows = [j for j, p in enumerate(ps) if p.repetition_penalty != 1.0]
    if rep_rows:
        seen = counts > 0
        row_pos, tokens = _flat_tokens(
            "prompt_token_ids", prompts, [rows[j] for j in rep_rows], v, device
        )
        rep_idx = _index(rep_rows, device)
        seen.index_put_((rep_idx[row_pos], tokens), torch.ones_like(tokens, dtype=torch.bool))
    return Penalties(
        rows=None if len(rows) == len(params) else _index(rows, device),
        repetition=col([p.repetition_penalty for p in ps]),
        frequency=col([p.frequency_penalty for p in ps]),
        presence=col([p.presence_penalty for p in ps]),
        counts=counts,
        seen=seen,
        any_frequency=any(p.frequency_penalty != 0.0 for p in ps),
        any_presence=any(p.presence_penalty != 0.0 for p in ps),
    )


def _build_suppression(
    suppress: list[list[int]] | None, v: int, device: torch.device
) -> dict[str, torch.Tensor | None]:
    none: dict[str, torch.Tensor | None] = {"suppress_rows": None, "suppress_tokens": None}
    if not suppress:
        return none
    lengths = torch.tensor([len(ids) for ids in suppress], dtype=torch.long)
    tokens = torch.tensor([t for ids in suppress for t in ids], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(suppress)), lengths)
    if tokens.numel() and int(tokens.min()) < 0:
        row = int(rows[int((tokens < 0).nonzero()[0])])
        raise ValueError(f"suppress_token_ids[{row}] must hold token ids >= 0")
    inside = tokens < v
    if not bool(inside.any()):
        return none
    return {"suppress_rows": rows[inside].to(device), "suppress_tokens": tokens[inside].to(device)}


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
        if seed is not None and not isinstance(seed, int):
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
                gen.manual_seed(self._seed & 0xFFFF_FFFF_FFFF_FFFF)
            self._generators[device] = gen
        return gen

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        _check_logits(logits, batch)
        n, device = batch.n, logits.device
        k = batch.max_logprobs
        if n == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            if k is None:
                return SamplerOutput(empty)
            return SamplerOutput(
                empty,
                torch.empty(0, k + 1, device=device),
                torch.empty(0, k + 1, dtype=torch.long, device=device),
                empty.clone(),
            )
        raw = logits if logits.dtype == torch.float32 else logits.float()
        processed = raw
        if batch.penalties is not None or batch.suppress_rows is not None:
            processed = raw.clone()  # the caller's logits stay untouched
            apply_penalties(processed, batch)
            apply_suppression(processed, batch)

        if batch.all_greedy:
            tokens = argmax_first(processed)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=device)
            if batch.greedy_rows is not None:
                rows = batch.greedy_rows
                tokens.index_copy_(0, rows, argmax_first(processed.index_select(0, rows)))
            for group in batch.random_groups:
                self._sample_group(processed, group, tokens)

        out = SamplerOutput(tokens)
        if k is not None:
            _fill_logprobs(out, raw, batch, k)
        return out

    def _sample_group(self, logits: torch.Tensor, group: RandomGroup, tokens: torch.Tensor) -> None:
        rows = logits if group.rows is None else logits.index_select(0, group.rows)
        m, device = rows.shape[0], rows.device
        if group.seed is None:
            gen = self._generator(device)
        else:
            # A fresh generator per (seed, step): the row's draw ignores everything else.
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
    """Repetition (prompt + output tokens), then frequency and presence (output tokens), in place.

    Repetition as HF/vLLM: a seen token's positive logit is divided by the penalty, a negative
    one multiplied. Frequency/presence as OpenAI: ``logit -= frequency * count + presence *
    (count > 0)`` (applied as two subtractions, frequency first, like vLLM).
    """
    pen = batch.penalties
    if pen is None:
        return
    sub = logits if pen.rows is None else logits.index_select(0, pen.rows)
    if pen.seen is not None:
        scaled = torch.where(sub > 0, sub / pen.repetition, sub * pen.repetition)
        sub = torch.where(pen.seen, scaled, sub)
    if pen.any_frequency:
        sub = sub - pen.frequency * pen.counts
    if pen.any_presence:
        sub = sub - pen.presence * (pen.counts > 0)
    if pen.rows is None:
        logits.copy_(sub)
    else:
        logits.index_copy_(0, pen.rows, sub)


def apply_suppression(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Mask each row's suppressed ids (EOS/stop ids below min_tokens) to -inf, in place."""
    if batch.suppress_rows is not None:
        logits.index_put_((batch.suppress_rows, batch.suppress_tokens), logits.new_tensor(-_INF))


def argmax_first(x: torch.Tensor) -> torch.Tensor:
    """Row argmax, ties -> lowest index, in two levels: ``amax`` over 256-wide blocks streams
    the row several times faster than ``torch.argmax``; the first block holding the row maximum
    holds its first occurrence, and only that block is searched element by element."""
    m, v = x.shape
    if v <= 4 * _ARGMAX_BLOCK:
        return x.argmax(-1)
    block_max = _blocked(x, _ARGMAX_BLOCK, torch.amax)
    first_block = block_max.argmax(-1, keepdim=True)  # argmax returns the first maximum
    idx, valid = _block_indices(first_block, _ARGMAX_BLOCK, v)
    vals = x.gather(1, idx).masked_fill_(~valid, -_INF)
    return idx.gather(1, vals.argmax(-1, keepdim=True)).squeeze(1)


def topk_two_level(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest per row, best first. The k best tokens lie in the k
    blocks with the largest block maxima, so only k * 64 gathered values are searched."""
    m, v = x.shape
    if k * _TOPK_BLOCK * 4 > v:
        return x.topk(k, dim=-1)
    block_max = _blocked(x, _TOPK_BLOCK, torch.amax)
    blocks = block_max.topk(k, dim=-1).indices  # [m, k]
    idx, valid = _block_indices(blocks, _TOPK_BLOCK, v)  # [m, k * 64]
    cand = x.gather(1, idx).masked_fill_(~valid, -_INF)
    vals, pos = cand.topk(k, dim=-1)
    return vals, idx.gather(1, pos)


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
    offs = torch.arange(block, device=blocks.device)
    idx = (blocks.unsqueeze(-1) * block + offs).flatten(1)
    valid = idx < v
    return idx.clamp_(max=v - 1), valid


def _scaled(vals: torch.Tensor, row_max: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``vals / T - max / T``: logits divided by temperature, shifted so the row maximum is 0."""
    return torch.addcdiv(-(row_max / temperature), vals, temperature)


def _sample_full(logits: torch.Tensor, group: RandomGroup, u: torch.Tensor) -> torch.Tensor:
    """Temperature (and min-p) over the whole vocabulary: weights exp(l/T - max/T), then draw."""
    weights = _scaled(logits, logits.amax(-1, keepdim=True), group.temperature).exp_()
    if group.min_p is not None:
        # min-p as vLLM: drop tokens whose probability is below min_p x the top probability;
        # the top token's weight is exactly 1, so that is ``weight < min_p``.
        weights.masked_fill_(weights < group.min_p, 0.0)
    return _inverse_cdf(weights, u)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn with probability proportional to ``weights`` [m, V] (>= 0, each row > 0)
    for uniforms ``u`` [m] (float64). Block sums are accumulated in float64 so tail tokens keep
    their share; within the chosen block a short float64 cumsum finds the token."""
    m, v = weights.shape
    sums = _blocked(weights, _CDF_BLOCK, torch.sum).double().cumsum_(-1)  # [m, blocks]
    target = u.unsqueeze(1) * sums[:, -1:]
    block = torch.searchsorted(sums, target, right=True)
    # u * total may round up to total: fall back to the last block with weight (it ends at total).
    block = torch.minimum(block, torch.searchsorted(sums, sums[:, -1:].contiguous()))
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
    """Top-k / top-p / min-p rows from their best ``candidates`` tokens (sorted descending).

    Kept tokens are those with scaled logit >= a per-row threshold, so ties at a boundary are all
    kept (as HF/vLLM). A row is resolved when its last candidate is not kept (nothing beyond it
    can be) and, with top-k, lies strictly below the k-th value (so the top-k mass is complete);
    other rows are retried with more candidates, and at last with a full sort.
    """
    m, v = logits.shape
    if candidates * 4 >= v:
        candidates = v
        vals, ids = logits.sort(dim=-1, descending=True)
    else:
        vals, ids = topk_two_level(logits, candidates)
    scaled = _scaled(vals, vals[:, :1], group.temperature)  # [m, K], column 0 == 0
    weights = scaled.exp()
    neg_inf = scaled.new_tensor(-_INF)
    keep = torch.ones_like(scaled, dtype=torch.bool)
    kth = k_on = None
    if group.top_k is not None:
        k_on = (group.top_k > 0).unsqueeze(1)
        kth_idx = (group.top_k.clamp(1, candidates) - 1).unsqueeze(1)
        kth = torch.where(k_on, scaled.gather(1, kth_idx), neg_inf)  # [m, 1]
        keep = scaled >= kth
    if group.top_p is not None:
        cum = torch.where(keep, weights, 0.0).double().cumsum_(-1)
        mass = cum[:, -1:]  # the top-k set's mass: exact for top-k rows
        if group.top_p_full_mass is not None:
            # top-p without top-k is over the whole vocabulary: its total mass needs every token.
            if full_mass is None:
                full_mass = _scaled(logits, vals[:, :1], group.temperature).exp_().sum(-1)
            mass = torch.where(
                group.top_p_full_mass.unsqueeze(1), full_mass.double()[:, None], mass
            )
        p = group.top_p.unsqueeze(1)
        # Position j is in the nucleus when the mass before it is < p * mass (vLLM's rule).
        count = 1 + (cum[:, :-1] < p * mass).sum(-1, keepdim=True)
        pth = torch.where(p < 1.0, scaled.gather(1, count - 1), neg_inf)
        keep &= scaled >= pth
    if group.min_p is not None:
        keep &= weights >= group.min_p

    tokens = _inverse_cdf_sorted(torch.where(keep, weights, 0.0), keep, u)
    tokens = ids.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if candidates == v:
        return tokens
    unresolved = keep[:, -1]
    if k_on is not None:
        unresolved |= (k_on & (scaled[:, -1:] >= kth)).squeeze(1)
    if bool(unresolved.any()):  # a sync, but only a CPU-side decision about a few rows
        rows = unresolved.nonzero().squeeze(1)
        sub_mass = None if full_mass is None else full_mass.index_select(0, rows)
        retry = max(candidates * _ESCALATE, 2048)
        tokens[rows] = _sample_restricted(
            logits.index_select(0, rows),
            group.select(rows),
            u.index_select(0, rows),
            retry,
            sub_mass,
        )
    return tokens


def _inverse_cdf_sorted(weights: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position drawn from candidate weights [m, K] whose kept entries form a prefix."""
    cum = weights.double().cumsum_(-1)
    pos = torch.searchsorted(cum, u.unsqueeze(1) * cum[:, -1:], right=True)
    last = keep.sum(-1, keepdim=True) - 1  # u * total rounding up: the last kept position
    return torch.minimum(pos, last).squeeze(1)


def _fill_logprobs(out: SamplerOutput, raw: torch.Tensor, batch: SamplingBatch, k: int) -> None:
    """Log-softmax of the raw logits: the sampled token's logprob and rank, then the top k."""
    rows = batch.logprob_rows
    logits = raw if rows is None else raw.index_select(0, rows)
    tokens = out.token_ids if rows is None else out.token_ids.index_select(0, rows)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    ranks = (logprobs > chosen).sum(-1) + 1
    lp, ids = chosen, tokens.unsqueeze(1)
    if k > 0:
        top_lp, top_ids = topk_two_level(logprobs, k)
        lp, ids = torch.cat([chosen, top_lp], 1), torch.cat([ids, top_ids], 1)
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
