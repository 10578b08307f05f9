"""The batch sampler against plain references: exact argmax, penalties and logprobs; sampled
distributions by chi-square with fixed seeds (deterministic); supports of top-k/top-p/min-p over
many draws; seeded rows independent of the batch around them."""

from __future__ import annotations

import math
import time

import pytest
import torch

from xllm import _C
from xllm.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_suppression,
    argmax_first,
    mix_seed,
    topk_two_level,
)
from xllm.sampling_params import SamplingParams as SP


def build(params, vocab, prompts=None, outputs=None, suppress=None) -> SamplingBatch:
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    return SamplingBatch.build(params, prompts, outputs, vocab, "cpu", suppress)


def draw(row: torch.Tensor, params: SP, draws: int, seed: int = 0) -> torch.Tensor:
    """``draws`` samples of one logits row: the row repeated down a batch of up to 2048 rows."""
    sampler, rows = Sampler(seed=seed), min(draws, 2048)
    logits = row.unsqueeze(0).expand(rows, -1).contiguous()
    batch = build([params] * rows, row.numel())
    chunks = [sampler(logits, batch).token_ids for _ in range(-(-draws // rows))]
    return torch.cat(chunks)[:draws]


def chi2_ok(samples: torch.Tensor, probs: torch.Tensor, z: float = 4.5) -> tuple[float, float]:
    """Chi-square of sample counts against ``probs`` (bins with expected count < 5 pooled) and
    the Wilson-Hilferty critical value at ``z`` sigmas (p ~ 3e-6)."""
    draws = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * draws
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 5:  # nothing worth a pooled bin: fold it into the largest one
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmax()] += counts[~big].sum()
        exp[exp.argmax()] += expected[~big].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    d = obs.numel() - 1
    if d < 1:  # a single bin: nothing to test
        return 0.0, 1.0
    crit = d * (1 - 2 / (9 * d) + z * math.sqrt(2 / (9 * d))) ** 3
    return stat, crit


# ---------------------------------------------------------------- greedy / argmax


@pytest.mark.parametrize("vocab", [7, 300, 1024, 1500, 49152])
def test_argmax_first_matches_torch_including_ties(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(-3, 4, (9, vocab), generator=g).float()  # many exact ties
    x[0] = 1.0  # every entry tied
    x[1, -1] = 10.0  # the max in the tail block
    x[2, :] = -math.inf
    x[2, vocab // 2] = 0.0
    assert torch.equal(argmax_first(x), x.argmax(-1))
    ties = x.max(-1, keepdim=True).values == x
    assert torch.equal(argmax_first(x), ties.float().argmax(-1))  # the FIRST maximum


@pytest.mark.parametrize("isa", _C.cpu_isas())
@pytest.mark.parametrize("vocab", [1, 7, 33, 300, 49152])
def test_native_argmax_rows_matches_torch(isa: str, vocab: int) -> None:
    """The native pick of greedy rows, at every ISA level: ties, +-inf, NaN (torch's first
    NaN wins), strided rows, and the two-level torch path (a non-CPU dtype) agreeing."""
    g = torch.Generator().manual_seed(vocab)
    wide = torch.randint(-3, 4, (8, vocab + 5), generator=g).float()
    x = wide[:, 2:2 + vocab]  # rows strided
    x[1] = -math.inf
    x[2, -1] = math.inf
    x[3, vocab // 3] = math.nan
    x[4, vocab - 1] = math.nan
    x[4, 0] = math.inf
    _C.set_cpu_isa(isa)
    try:
        got = argmax_first(x)
    finally:
        _C.set_cpu_isa(_C.detected_isa())
    assert torch.equal(got, x.argmax(-1))
    assert torch.equal(got, argmax_first(x.double()).long())  # the torch two-level form
    with pytest.raises(ValueError, match="must have contiguous rows"):
        _C.argmax_rows(torch.empty(vocab, dtype=torch.long), x.t())


def test_greedy_rows_are_argmax_and_ignore_top_k_p() -> None:
    logits = torch.randn(12, 1000, generator=torch.Generator().manual_seed(1))
    logits[3, [5, 700]] = 50.0  # tie -> lowest index
    params = [SP(temperature=0.0, top_k=(i % 3) * 5, top_p=0.5 + 0.04 * i) for i in range(12)]
    out = Sampler()(logits, build(params, 1000))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[3] == 5 and out.logprobs is None and out.ranks is None


# ---------------------------------------------------------------- distributions


@pytest.mark.parametrize("vocab,temperature", [(17, 1.0), (600, 0.7), (1500, 1.6)])
def test_temperature_matches_softmax(vocab: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(vocab)
    row = torch.randn(vocab, generator=g) * 2.5
    samples = draw(row, SP(temperature=temperature), 30000, seed=vocab)
    stat, crit = chi2_ok(samples, torch.softmax(row.double() / temperature, -1))
    assert stat < crit, (stat, crit)


def test_top_p_one_and_min_p_zero_keep_the_full_distribution() -> None:
    row = torch.randn(300, generator=torch.Generator().manual_seed(5)) * 2
    samples = draw(row, SP(temperature=0.9, top_p=1.0, min_p=0.0, top_k=-1), 30000, seed=3)
    stat, crit = chi2_ok(samples, torch.softmax(row.double() / 0.9, -1))
    assert stat < crit


def _kept_reference(row: torch.Tensor, t: float, k: int, p: float, min_p: float) -> torch.Tensor:
    """Boolean support of one row after top-k, top-p, min-p (float64, sort-based, vLLM rules)."""
    x = row.double() / t
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < k < x.numel():
        keep &= x >= x.topk(k).values[-1]
    if p < 1.0:
        probs = torch.where(keep, torch.softmax(torch.where(keep, x, -math.inf), -1), 0.0)
        sp, order = probs.sort(descending=True)
        before = sp.cumsum(0) - sp
        nucleus = torch.zeros_like(keep)
        nucleus[order[before < p]] = True
        keep &= nucleus
    if min_p > 0:
        keep &= torch.exp(x - x.max()) >= min_p
    return keep


@pytest.mark.parametrize(
    "vocab,t,k,p,min_p",
    [
        (2000, 1.0, 40, 1.0, 0.0),
        (2000, 0.8, 0, 0.7, 0.0),
        (2000, 1.3, 0, 1.0, 0.02),
        (2000, 1.0, 60, 0.8, 0.01),
        (3000, 1.0, 0, 1.0, 0.002),  # min-p keeps 160 > 128 candidates: whole-vocabulary path
        (20000, 0.8, 0, 0.9, 0.0),  # a nucleus of 274: retried with 2048 candidates
        (49152, 1.0, 0, 0.95, 0.0),  # a nucleus of 4429: 128, 2048 candidates, then a sort
        (5000, 0.5, 3000, 1.0, 0.0),  # large k: the sort path
    ],
)
def test_restricted_support_and_distribution(vocab, t, k, p, min_p) -> None:
    g = torch.Generator().manual_seed(vocab + k)
    row = torch.randn(vocab, generator=g) * 3
    keep = _kept_reference(row, t, k, p, min_p)
    small = int(keep.sum()) < 400  # big supports: only the support is checked
    draws = (12000 if vocab <= 5000 else 2000) if small else 64
    samples = draw(row, SP(temperature=t, top_k=k, top_p=p, min_p=min_p), draws, seed=k)
    assert keep[samples].all(), "sampled a token outside the kept support"
    probs = torch.softmax(torch.where(keep, row.double() / t, -math.inf), -1)
    if small:
        stat, crit = chi2_ok(samples, probs)
        assert stat < crit, (stat, crit)


def test_top_k_one_is_greedy_and_min_p_one_keeps_only_the_max() -> None:
    logits = torch.randn(32, 5000, generator=torch.Generator().manual_seed(2)) * 4
    for params in (SP(temperature=1.5, top_k=1), SP(temperature=2.0, min_p=1.0)):
        out = Sampler(seed=1)(logits, build([params] * 32, 5000))
        assert torch.equal(out.token_ids, logits.argmax(-1))


def test_min_p_boundary_is_inclusive() -> None:
    # Two tokens with probability ratio exactly 1/2 (logits differ by ln 2 at T=1, both exact in
    # float32 after the max shift): min_p = 0.5 keeps both, min_p slightly above drops the second.
    row = torch.full((64,), -100.0)
    row[10], row[20] = 0.0, -math.log(2.0)
    ratio = float(torch.exp(row[20] - row[10]))
    both = draw(row, SP(temperature=1.0, min_p=ratio), 4000, seed=1)
    one = draw(row, SP(temperature=1.0, min_p=min(1.0, ratio * 1.0001)), 4000, seed=1)
    assert set(both.tolist()) == {10, 20} and set(one.tolist()) == {10}


def test_ties_at_the_top_k_boundary_are_kept() -> None:
    row = torch.full((3000,), -50.0)
    row[[4, 900, 2999]] = 1.0  # three-way tie for the best, k = 2 keeps all three
    samples = draw(row, SP(temperature=1.0, top_k=2), 6000, seed=4)
    assert set(samples.tolist()) == {4, 900, 2999}


# ---------------------------------------------------------------- penalties / suppression


def _penalty_reference(row: torch.Tensor, prompt: list[int], output: list[int], p: SP):
    out = row.clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            v = out[t]
            out[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t in set(output):
        out[t] = out[t] - p.frequency_penalty * float(output.count(t))
    for t in set(output):
        out[t] = out[t] - p.presence_penalty
    return out


def test_penalties_match_a_per_row_reference() -> None:
    g = torch.Generator().manual_seed(3)
    vocab, n = 500, 10
    logits = torch.randn(n, vocab, generator=g) * 3
    params, prompts, outputs = [], [], []
    for i in range(n):
        params.append(
            SP(
                repetition_penalty=[1.0, 1.3, 0.7][i % 3],
                presence_penalty=[0.0, 0.5, -1.2, 2.0][i % 4],
                frequency_penalty=[0.0, 0.3, -0.4][(i // 2) % 3],
            )
        )
        prompts.append(torch.randint(0, vocab, (int(i * 7),), generator=g).tolist())
        outputs.append(torch.randint(0, vocab // 4, (int(i * 5),), generator=g).tolist())
    batch = build(params, vocab, prompts, outputs)
    assert batch.any_penalties
    processed = logits.clone()
    apply_penalties(processed, batch)
    for i in range(n):
        ref = _penalty_reference(logits[i], prompts[i], outputs[i], params[i])
        torch.testing.assert_close(processed[i], ref, rtol=1e-6, atol=1e-6)
    # and the sampler's greedy pick honours them
    greedy = [SP(temperature=0.0, **_pens(p)) for p in params]
    tokens = Sampler()(logits, build(greedy, vocab, prompts, outputs)).token_ids
    assert torch.equal(tokens, processed.argmax(-1))


def _pens(p: SP) -> dict:
    keys = ("repetition_penalty", "presence_penalty", "frequency_penalty")
    return {k: getattr(p, k) for k in keys}


def test_suppression_masks_the_given_ids_only() -> None:
    logits = torch.zeros(4, 300)
    logits[:, 7] = 20.0  # EOS would win every time
    logits[:, 9] = 19.0
    suppress = [[7], [7, 9], [], [7, 10_000]]  # an id outside the vocab is ignored
    batch = build([SP(temperature=0.0)] * 4, 300, suppress=suppress)
    processed = logits.clone()
    apply_suppression(processed, batch)
    assert processed[0, 7] == -math.inf and processed[1, 9] == -math.inf and processed[2, 7] == 20
    tokens = Sampler()(logits, batch).token_ids.tolist()
    assert tokens[0] == 9 and tokens[1] not in (7, 9) and tokens[2] == 7 and tokens[3] == 9
    random_rows = build([SP(temperature=5.0)] * 4, 300, suppress=[[7, 9]] * 4)
    for seed in range(20):
        assert not set(Sampler(seed=seed)(logits, random_rows).token_ids.tolist()) & {7, 9}


# ---------------------------------------------------------------- seeds


SEEDED_KINDS = [
    SP(temperature=0.9, seed=11),
    SP(temperature=1.2, top_k=20, seed=12),
    SP(temperature=0.8, top_p=0.9, seed=13),
    SP(temperature=1.0, min_p=0.05, seed=14),
    SP(temperature=1.0, top_p=0.97, top_k=500, repetition_penalty=1.2, seed=15),
]


@pytest.mark.parametrize("kind", range(len(SEEDED_KINDS)))
def test_seeded_row_is_independent_of_its_batch(kind: int) -> None:
    vocab = 49152
    g = torch.Generator().manual_seed(kind)
    target = torch.randn(vocab, generator=g) * 2
    prompt, output = [1, 2, 3, 5], [8, 13]
    params = SEEDED_KINDS[kind]
    alone = Sampler(seed=0)(target[None], build([params], vocab, [prompt], [output])).token_ids[0]
    others = [
        SP(temperature=0.0),
        SP(temperature=1.0),
        SP(top_k=5),
        SP(top_p=0.5),
        SP(temperature=0.7, seed=99),
        SP(min_p=0.1, logprobs=3),
    ]
    for sampler_seed, pos in enumerate((0, 9, 15)):
        rows = [others[i % len(others)] for i in range(16)]
        rows[pos] = params
        logits = torch.randn(16, vocab, generator=g) * 2
        logits[pos] = target
        prompts = [[4, 4]] * 16
        outputs = [[9] * (i % 4) for i in range(16)]
        prompts[pos], outputs[pos] = prompt, output
        batch = build(rows, vocab, prompts, outputs)
        assert Sampler(seed=sampler_seed)(logits, batch).token_ids[pos] == alone


def test_seeds_and_steps_give_different_streams() -> None:
    row = torch.zeros(1000)  # uniform: any two independent draws differ with p = 0.999
    tokens = {
        int(Sampler()(row[None], build([SP(seed=s)], 1000, [[]], [[0] * step])).token_ids[0])
        for s in range(4)
        for step in range(4)
    }
    assert len(tokens) >= 14
    assert mix_seed(1, 0) != mix_seed(0, 1) and mix_seed(-1, 0) != mix_seed(1, 0)
    assert all(0 <= mix_seed(s, t) < 2**64 for s in (-(2**70), 0, 2**70) for t in (0, 5))


def test_sampler_seed_makes_runs_reproducible() -> None:
    logits = torch.randn(20, 700, generator=torch.Generator().manual_seed(8))
    batch = build([SP(temperature=1.0, top_p=0.9)] * 10 + [SP(temperature=2.0)] * 10, 700)
    a = [Sampler(seed=5)(logits, batch).token_ids for _ in range(2)]
    assert torch.equal(a[0], a[1])


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_logits() -> None:
    g = torch.Generator().manual_seed(6)
    vocab = 3000
    logits = torch.randn(6, vocab, generator=g) * 3
    params = [
        SP(temperature=0.0, logprobs=0),
        SP(temperature=1.0, logprobs=5, repetition_penalty=1.5),  # penalties don't touch them
        SP(temperature=0.5, top_k=10, logprobs=3),
        SP(temperature=1.0),  # asks for none
        SP(temperature=1.0, top_p=0.5, logprobs=5, seed=3),
        SP(temperature=0.0, logprobs=2, presence_penalty=1.0),
    ]
    prompts, outputs = [[1, 2]] * 6, [[int(t) for t in logits[i].topk(3).indices] for i in range(6)]
    out = Sampler(seed=2)(logits, build(params, vocab, prompts, outputs))
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs.shape == (6, 6) and out.logprob_token_ids.shape == (6, 6)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert torch.isnan(out.logprobs[i]).all() and (out.logprob_token_ids[i] == -1).all()
            assert out.ranks[i] == -1
            continue
        tok = int(out.token_ids[i])
        assert out.logprob_token_ids[i, 0] == tok
        torch.testing.assert_close(out.logprobs[i, 0], ref[i, tok])
        assert out.ranks[i] == int((ref[i] > ref[i, tok]).sum()) + 1
        top = ref[i].topk(5)
        torch.testing.assert_close(out.logprobs[i, 1:], top.values)
        assert torch.equal(out.logprob_token_ids[i, 1:], top.indices)
        assert (out.logprobs[i, 1:].diff() <= 0).all()
    assert out.ranks[0] == 1  # greedy on unpenalised logits: the best token


def test_inverse_cdf_never_picks_zero_weight_tokens() -> None:
    from xllm.layers.sampler import _inverse_cdf

    g = torch.Generator().manual_seed(13)
    weights = torch.rand(6, 1000, generator=g)
    weights[weights < 0.7] = 0.0  # zero-weight runs, including whole 256-blocks:
    weights[:, 256:768] = 0.0
    weights[:, -50:] = 0.0  # and a zero tail
    u = torch.tensor([0.0, 0.25, 0.5, 0.999, 1 - 2**-53, 1 - 2**-30], dtype=torch.float64)
    picked = _inverse_cdf(weights, u)
    cum = weights.double().cumsum(-1)
    expected = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(1), right=True).squeeze(1)
    last = (weights > 0).double().cumsum(-1).argmax(-1)  # the last positive weight
    assert torch.equal(picked, torch.minimum(expected, last))
    assert (weights.gather(1, picked.unsqueeze(1)) > 0).all()


def test_topk_two_level_matches_torch_topk() -> None:
    g = torch.Generator().manual_seed(9)
    for vocab, k in ((49152, 20), (10001, 7), (1000, 30), (70000, 129)):
        x = torch.randn(5, vocab, generator=g)
        vals, ids = topk_two_level(x, k)
        ref = x.topk(k, -1)
        assert torch.equal(vals, ref.values) and torch.equal(x.gather(1, ids), vals)


# ---------------------------------------------------------------- batches and errors


def test_mixed_batch_of_everything() -> None:
    g = torch.Generator().manual_seed(10)
    vocab, n = 49152, 64
    logits = torch.randn(n, vocab, generator=g) * 3
    kinds = [
        SP(temperature=0.0),
        SP(temperature=0.8),
        SP(temperature=0.7, top_p=0.9),
        SP(top_k=50, seed=7),
        SP(min_p=0.1, temperature=1.3),
        SP(temperature=0.0, logprobs=4, frequency_penalty=0.5),
        SP(top_k=40, top_p=0.8, presence_penalty=0.4, repetition_penalty=1.1),
        SP(temperature=1.0, top_p=0.6, seed=123, logprobs=1),
    ]
    params = [kinds[i % len(kinds)] for i in range(n)]
    prompts = [torch.randint(0, vocab, (20,), generator=g).tolist() for _ in range(n)]
    outputs = [torch.randint(0, vocab, (i % 9,), generator=g).tolist() for i in range(n)]
    suppress = [[0, 1] if i % 5 == 0 else [] for i in range(n)]
    batch = build(params, vocab, prompts, outputs, suppress)
    assert not batch.all_greedy and batch.any_top_k and batch.any_top_p and batch.any_min_p
    assert batch.max_logprobs == 4
    before = logits.clone()
    out = Sampler(seed=0)(logits, batch)
    assert torch.equal(logits, before), "the sampler must not modify its input"
    processed = logits.clone()
    apply_penalties(processed, batch)
    apply_suppression(processed, batch)
    for i, p in enumerate(params):
        keep = _kept_reference(processed[i], max(p.temperature, 1e-6), p.top_k, p.top_p, p.min_p)
        tok = int(out.token_ids[i])
        assert keep[tok], (i, p)
        if p.temperature == 0.0:
            assert tok == int(processed[i].argmax())
        if suppress[i]:
            assert tok not in suppress[i]
    assert out.logprobs.shape == (n, 5)


def test_empty_batch() -> None:
    out = Sampler()(torch.empty(0, 100), build([], 100))
    assert out.token_ids.shape == (0,) and out.logprobs is None
    out = Sampler()(torch.empty(0, 100), build([], 100))
    assert out.token_ids.dtype == torch.long


def test_per_row_views_and_flags() -> None:
    params = [SP(temperature=0.0), SP(top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.1)]
    batch = build(params, 50)
    assert batch.temperature.tolist() == [0.0, 1.0] and batch.top_k.tolist() == [-1, 5]
    assert batch.any_penalties and batch.any_top_k and not batch.all_greedy
    assert batch.max_logprobs is None and batch.greedy_rows.tolist() == [0]
    assert build([SP(temperature=0.0)] * 3, 50).all_greedy


def test_bad_input_raises_value_error() -> None:
    with pytest.raises(ValueError, match="output_token_ids"):
        SamplingBatch.build([SP()], [[1]], [], 10)
    with pytest.raises(ValueError, match="vocab_size"):
        SamplingBatch.build([SP()], [[1]], [[]], 0)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] holds token id 10"):
        SamplingBatch.build([SP(), SP(repetition_penalty=1.2)], [[1], [3, 10]], [[], []], 10)
    with pytest.raises(ValueError, match=r"output_token_ids\[0\]"):
        SamplingBatch.build([SP(presence_penalty=1.0)], [[1]], [[-1]], 10)
    with pytest.raises(ValueError, match="suppress_token_ids"):
        SamplingBatch.build([SP()], [[1]], [[]], 10, suppress_token_ids=[[-3]])
    with pytest.raises(ValueError, match="params"):
        SamplingBatch.build([{"temperature": 0}], [[1]], [[]], 10)
    with pytest.raises(ValueError, match="params"):
        SamplingBatch.build(SP(), [[1]], [[]], 10)  # type: ignore[arg-type]
    batch = build([SP()] * 2, 10)
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(2, 11), batch)
    with pytest.raises(ValueError, match="floating-point"):
        Sampler()(torch.zeros(2, 10, dtype=torch.long), batch)
    with pytest.raises(ValueError, match="seed"):
        Sampler(seed="x")  # type: ignore[arg-type]


def test_non_contiguous_logits_give_the_same_tokens() -> None:
    logits = torch.randn(8, 6000, generator=torch.Generator().manual_seed(14)) * 3
    strided = logits.t().contiguous().t()  # same values, column-major
    params = [SP(temperature=0.0), SP(top_k=30), SP(top_p=0.8, logprobs=2), SP(min_p=0.1)] * 2
    batch = build(params, 6000, [[1, 2]] * 8, [[3]] * 8)
    a, b = Sampler(seed=3)(logits, batch), Sampler(seed=3)(strided, batch)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0, equal_nan=True)


def test_half_precision_logits_are_widened() -> None:
    logits = torch.randn(3, 400, generator=torch.Generator().manual_seed(4)).bfloat16()
    out = Sampler()(logits, build([SP(temperature=0.0, logprobs=1)] * 3, 400))
    assert (
        torch.equal(out.token_ids, logits.float().argmax(-1))
        and out.logprobs.dtype == torch.float32
    )


def test_large_vocab_batch_is_fast() -> None:
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(64, 49152, generator=g) * 4
    kinds = [SP(temperature=0.0), SP(temperature=0.8), SP(top_k=50), SP(top_p=0.9, min_p=0.05)]
    batch = build([kinds[i % 4] for i in range(64)], 49152)
    sampler = Sampler(seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, OpenMP barriers measure the neighbours
    try:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            sampler(logits, batch)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    # generous: tens of ms single-threaded even on a busy machine (see bench/sampler.py)
    assert min(times) < 0.3, times


def test_logit_bias_shifts_the_pick_and_leaves_logprobs_raw() -> None:
    """+100 all but forces a token, -100 bans the argmax; rows without a bias, and seeded
    rows, are untouched; logprobs are the raw model's (as vLLM and OpenAI report them)."""
    g = torch.Generator().manual_seed(5)
    vocab = 300
    logits = torch.randn(4, vocab, generator=g)
    top = logits.argmax(-1).tolist()
    params = [SP(temperature=0.0, logit_bias={7: 100.0}, logprobs=1),
              SP(temperature=0.0, logit_bias={top[1]: -100.0, vocab + 5: 3.0}),
              SP(temperature=0.0),
              SP(temperature=1.0, seed=3, logit_bias={11: 100.0})]
    out = Sampler(seed=0)(logits, build(params, vocab))
    tokens = out.token_ids.tolist()
    assert tokens[0] == 7 and tokens[3] == 11 and tokens[2] == top[2]
    masked = logits[1].clone()
    masked[top[1]] -= 100
    assert tokens[1] == int(masked.argmax())
    raw = torch.log_softmax(logits[0], -1)
    assert math.isclose(out.logprobs[0, 0].item(), raw[7].item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="logit_bias"):
        SP(logit_bias={-1: 1.0})
    with pytest.raises(ValueError, match=r"logit_bias\[3\]"):
        SP(logit_bias={3: 101.0})
