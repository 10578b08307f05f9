"""POST /v1/embeddings: OpenAI's embeddings, from the served model's final hidden states.

Each input runs as an embedding request (SamplingParams.pooling): its prompt is computed in
full, alongside whatever else the engine is batching, and its final hidden states are
pooled (``--embedding-pooling``: the last token's, or the mean) and L2-normalized. Any
causal LM served here answers; an embedding model (Qwen3-Embedding, e5-mistral: last-token
pooling) gives embeddings worth having.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from xllm.api.errors import APIError
from xllm.api.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from xllm.api.sampling import check_context
from xllm.api.serving import OpenAIServing
from xllm.sampling_params import SamplingParams

__all__ = ["create_embedding"]


async def create_embedding(serving: OpenAIServing, req: EmbeddingRequest,
                           raw: Request) -> Response:
    serving.check_model(req.model)
    serving.check_ready()
    size = serving.engine.hidden_size
    if req.dimensions is not None and req.dimensions != size:
        raise APIError.bad_request(f"dimensions is {req.dimensions}, but this model's "
                                   f"embeddings have {size} (they are not shortened)",
                                   param="dimensions")
    prompts = await serving.prompt_inputs(req.input, "input")
    for p in prompts:  # one position is sampled after the prompt (and thrown away)
        check_context(len(p.token_ids), 1, serving.max_model_len, "input")
    params = SamplingParams(temperature=0.0, max_tokens=1,
                            pooling=serving.settings.embedding_pooling)
    job = serving.submit(prompts, [params] * len(prompts), priority=req.priority,
                         offline=False)
    final = await serving.finished_outputs(job, raw)
    if final is None:
        return Response(status_code=499)  # nobody is listening
    data = []
    for i in range(len(prompts)):
        vector = final[i].embedding
        if vector is None:
            raise APIError(500, "the engine returned no embedding for an input "
                           f"(finish reason {final[i].outputs[0].finish_reason})")
        if req.encoding_format == "base64":
            packed = np.asarray(vector, dtype="<f4").tobytes()
            data.append(EmbeddingData(index=i, embedding=base64.b64encode(packed).decode()))
        else:
            data.append(EmbeddingData(index=i, embedding=vector))
    tokens = sum(len(p.token_ids) for p in prompts)
    body = EmbeddingResponse(data=data, model=serving.model_name,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return JSONResponse(body.model_dump())
