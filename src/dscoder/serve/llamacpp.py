"""llama.cpp server's ``POST /infill`` (what llama.vscode sends): the middle between ``input_prefix`` and
``input_suffix``, with ``input_extra`` chunks of other files first and ``prompt`` as the middle's start."""

from __future__ import annotations

from fastapi import APIRouter, Request

from dscoder.engine import SamplingParams
from dscoder.errors import DscoderError
from dscoder.serve import prompts
from dscoder.serve.errors import APIError
from dscoder.serve.generation import Generation, sse
from dscoder.serve.protocol import InfillRequest
from dscoder.serve.state import ServerState, state_of

router = APIRouter()


def infill_params(state: ServerState, body: InfillRequest) -> SamplingParams:
    max_tokens = state.check_max_tokens(None if body.n_predict < 0 else body.n_predict, "n_predict")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              repetition_penalty=body.repeat_penalty, stop=tuple(s for s in body.stop if s),
                              seed=body.seed, ignore_eos=body.ignore_eos, stream=body.stream)
    except DscoderError as e:
        raise APIError(400, str(e)) from None


@router.post("/infill")
async def infill(body: InfillRequest, request: Request):
    state = state_of(request)
    params = infill_params(state, body)
    extra = "".join(str(c.get("text", "")) for c in body.input_extra)
    prompts.check_text_size(state, len(extra) + len(body.input_prefix) + len(body.input_suffix) + len(body.prompt))
    ids = await prompts.fim_ids(state, extra + body.input_prefix, body.input_suffix)
    if body.prompt:
        ids = ids + await prompts.text_ids(state, body.prompt)
    prompts.check_ids(state, ids)
    gen = Generation(state, [ids], [params])
    seq = gen.seqs[0]

    def final():
        return {"content": seq.text if not body.stream else "", "stop": True, "model": state.model_name,
                "tokens_predicted": len(seq.token_ids), "tokens_evaluated": len(ids),
                "stop_type": "limit" if seq.finish_reason == "length" else "eos"}

    if body.stream:
        async def events():
            async for _, _, delta, _, done in gen.updates():
                if delta:
                    yield sse({"content": delta, "stop": False})
                if done:
                    yield sse(final())
        return gen.stream(events())
    try:
        await gen.wait(request)
    finally:
        gen.close()
    return final()
