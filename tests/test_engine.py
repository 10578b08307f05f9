"""The engine end to end on the real demo model, against transformers as the reference."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from xllm import LLM, SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Explain recursion in one sentence."}],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=False)


@pytest.fixture(scope="module")
def llm(demo_model_dir) -> LLM:  # noqa: ANN001
    # float32: exact against transformers (bf16 has its own checks: test_reduced_precision)
    return LLM(model=str(demo_model_dir), dtype="float32", max_num_batched_tokens=512,
               kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def hf_model(demo_model_dir):  # noqa: ANN001, ANN201
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo_model_dir),
                                                              dtype=torch.float32)
    return model.eval()


def _hf_greedy(hf_model, prompt_ids: list[int], max_new: int, eos: set[int]) -> list[int]:  # noqa: ANN001
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new,
                                do_sample=False, eos_token_id=sorted(eos), pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_demo_chat_greedy_matches_transformers(llm: LLM, hf_model) -> None:  # noqa: ANN001
    outputs = llm.chat(CHATS, GREEDY, use_tqdm=False)
    eos = llm.engine.eos_token_ids
    for out in outputs:
        ours = out.outputs[0].token_ids
        ref = _hf_greedy(hf_model, out.prompt_token_ids, 64, eos)
        assert ours == ref, f"prompt {out.prompt!r}: ours {ours} vs transformers {ref}"
        assert out.outputs[0].text == llm.tokenizer.decode(ours)
        assert out.outputs[0].finish_reason in ("stop", "length")


def test_batch_invariance_under_chunking_prefix_hits_and_preemption(demo_model_dir) -> None:  # noqa: ANN001
    prompts = [f"Story {i}: once upon a time, in a land far away, there lived a " + "very " * i
               + "curious fox who" for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = LLM(model=str(demo_model_dir), dtype="float32", max_num_seqs=1, kv_cache_memory_gb=0.1)
    reference = [alone.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids
                 for p in prompts]
    del alone
    # A tiny KV budget and token budget: chunked prefill, shared-prefix hits, preemption.
    tight = LLM(model=str(demo_model_dir), dtype="float32", max_num_seqs=16,
                max_num_batched_tokens=32, num_kv_blocks=30, block_size=8)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    sched = tight.engine.scheduler
    assert sched.num_preempted > 0, "the tiny KV budget should have forced preemption"
    assert sched.prefix_cache_hit_rate > 0, "shared prompt prefixes should hit the cache"


def test_bad_arguments_raise_value_error(llm: LLM) -> None:
    for kwargs in ({"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    too_long = [1] * (llm.engine.max_model_len + 1)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([too_long], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(model="demo", not_an_option=1)


def test_prompts_as_vllm_dicts(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    text = "The capital of France is"
    ids = llm.tokenizer.encode(text)
    plain = [o.outputs[0].token_ids for o in llm.generate([text, ids], params, use_tqdm=False)]
    assert plain[0] == plain[1]
    as_dicts = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in as_dicts] == plain
    one = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert len(one) == 1 and one[0].outputs[0].token_ids == plain[0]
    for bad in ({"text": text}, {"prompt": text, "prompt_token_ids": ids}, {"prompt": ids}):
        with pytest.raises(ValueError, match="exactly one key"):
            llm.generate([bad], params, use_tqdm=False)
    with pytest.raises(ValueError, match="text or a list of token ids"):
        llm.generate([[1, "two"]], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def _drive(engine, rid: str, prompt: list[int], params: SamplingParams,  # noqa: ANN001
           **resume: object) -> tuple[list[int], str, object]:
    """(new token ids, new text) from the deltas, and the final output."""
    engine.add_request(rid, prompt, params, **resume)
    ids, text, last = [], "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta_text, delta_ids = out.deltas[0]
            ids, text, last = ids + delta_ids, text + delta_text, out
    return ids, text, last


def test_resume_with_generated_tokens_continues_exactly(llm: LLM) -> None:
    """A request resumed with the tokens another engine generated continues as the
    uninterrupted run: the seeded draw's step and the penalties count those tokens."""
    engine = llm.engine
    prompt = llm.tokenizer.encode("Three animals that live in the sea:")
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16, frequency_penalty=1.0,
                            repetition_penalty=1.2, ignore_eos=True)
    ids, text, whole = _drive(engine, "whole", prompt, params)
    k = 6
    sent = llm.tokenizer.decode(ids[:k])
    more_ids, more_text, out = _drive(engine, "resumed", prompt, params,
                                      generated_token_ids=ids[:k], generated_text=sent)
    assert ids[:k] + more_ids == ids and sent + more_text == text
    assert out.outputs[0].token_ids == ids and out.outputs[0].text == text
    assert out.outputs[0].finish_reason == "length"
    for bad, match in [({"n": 2}, "n must be 1"), ({"max_tokens": k}, "nothing is left")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", prompt, replace(params, **bad), generated_token_ids=ids[:k])


def test_stop_strings_n_seed_and_logprobs(llm: LLM, hf_model) -> None:  # noqa: ANN001
    prompt = "The numbers from one to ten are: one, two, three,"
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert "five" in base.text
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=["five"],
                                                  ignore_eos=True), use_tqdm=False)[0]
    completion = stopped.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "five"
    assert completion.text == base.text[:base.text.index("five")]

    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, n=3,
                             ignore_eos=True)
    first = llm.generate(prompt, sampled, use_tqdm=False)[0]
    again = llm.generate([prompt, "unrelated filler prompt"], sampled, use_tqdm=False)[0]
    assert len(first.outputs) == 3
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]

    lp = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                             ignore_eos=True), use_tqdm=False)[0]
    ids = lp.prompt_token_ids + lp.outputs[0].token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for step, entry in enumerate(lp.outputs[0].logprobs):
        row = ref[len(lp.prompt_token_ids) - 1 + step]
        assert len(entry) >= 3
        for token_id, value in entry.items():
            assert value == pytest.approx(row[token_id].item(), abs=1e-3)


def test_the_ending_token_is_not_text(llm: LLM) -> None:
    """A request ended by EOS (or a stop token id) does not show that token's text, even with
    skip_special_tokens off (as vLLM); include_stop_str_in_output shows it."""
    eos = llm.tokenizer.decode([2], skip_special_tokens=False)
    assert eos == "<|im_end|>"
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    base = {"temperature": 0.0, "max_tokens": 60, "skip_special_tokens": False}
    plain, shown = llm.generate([ids, ids], [SamplingParams(**base), SamplingParams(
        **base, include_stop_str_in_output=True)], use_tqdm=False)
    assert plain.outputs[0].finish_reason == "stop" and plain.outputs[0].token_ids[-1] == 2
    assert not plain.outputs[0].text.endswith(eos)
    assert shown.outputs[0].text == plain.outputs[0].text + eos
