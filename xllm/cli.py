"""The ``xllm`` command: ``xllm generate --model demo --prompt "..."``, ``xllm serve`` (the
OpenAI-compatible server, same as ``xllm-server``) and ``xllm bench serve`` (the serving
load generator, same as ``python -m bench.serve``).

Engine options are generated from EngineConfig's fields, one flag per field
(``xllm.config.add_engine_options``), so the CLI and the config can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from xllm.config import add_engine_options, engine_config_from_args


def _generate(args: argparse.Namespace) -> int:
    from xllm.engine.llm import LLM
    from xllm.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed,
                            stop=args.stop or [])
    llm = LLM(**dataclasses.asdict(config))
    prompts = args.prompt
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                           use_tqdm=not args.quiet)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    for out in outputs:
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": completion.text,
                              "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}))
        else:
            print(completion.text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # serve and bench serve own their whole command line; hand it over untouched.
    if argv[:1] == ["serve"]:
        from xllm.api.server import main as serve_main

        return serve_main(argv[1:])
    if argv[:2] == ["bench", "serve"]:
        from xllm.benchmarks.serve import main as bench_main

        return bench_main(argv[2:])
    parser = argparse.ArgumentParser(prog="xllm", description="xllm command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="the OpenAI-compatible server (xllm serve --help)",
                   add_help=False)
    bench = sub.add_parser("bench", help="benchmarks: bench serve (xllm bench serve --help)")
    bench.add_argument("suite", choices=["serve"])
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message "
                     "and apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(gen)
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except ValueError as e:
        print(f"xllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
