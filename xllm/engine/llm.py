"""The offline API: ``LLM(model="demo").generate(prompts, params)`` and ``.chat(messages)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from xllm.config import EngineConfig
from xllm.engine.llm_engine import LLMEngine
from xllm.engine.outputs import RequestOutput
from xllm.sampling_params import SamplingParams

Message = dict[str, Any]
Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Runs batches of prompts to completion on one engine (continuous batching inside).

    Keyword arguments are EngineConfig fields (max_num_seqs, block_size, dtype, ...).
    """

    def __init__(self, model: str = "demo", **engine_options: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: int | Sequence[int] = 0,
                 offline: bool = False) -> list[RequestOutput]:
        """Generates for every prompt; outputs in the prompts' order. A prompt is text, a list
        of token ids, or (as vLLM takes them) ``{"prompt": text}`` or ``{"prompt_token_ids":
        ids}``."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [_prompt_input(p) for p in prompts]
        params_list = _per_prompt(params or SamplingParams(), len(prompts), "params")
        priorities = _per_prompt(priority, len(prompts), "priority")
        engine = self.engine
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params_list, priorities, strict=True):
                rid = engine.new_request_id()
                engine.add_request(rid, prompt, p, priority=prio, offline=offline)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | Sequence[list[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(list(conv),
                                                      add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        # The template already carries the special tokens (BOS); encode without adding more.
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(token_ids, params, use_tqdm=use_tqdm)
        for out, text in zip(outputs, prompts, strict=True):
            out.prompt = text
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        pending = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req", dynamic_ncols=True)
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]


def _prompt_input(prompt: Prompt) -> str | list[int]:
    """Text or token ids from one prompt in any form ``generate`` takes."""
    if not isinstance(prompt, dict):
        return prompt
    keys = set(prompt)
    if keys == {"prompt"} and isinstance(prompt["prompt"], str):
        return prompt["prompt"]
    if keys == {"prompt_token_ids"} and not isinstance(prompt["prompt_token_ids"], (str, dict)):
        return list(prompt["prompt_token_ids"])
    raise ValueError("a prompt given as a dict holds exactly one key, 'prompt' (text) or "
                     f"'prompt_token_ids' (a list of token ids); got keys {sorted(keys)}")


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts; give one "
                             "per prompt or a single value")
        return list(value)
    return [value] * count
