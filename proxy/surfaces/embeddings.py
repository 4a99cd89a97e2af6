"""Embeddings (`POST /v1/embeddings`): validated, reserved from an estimate of `input` (an
embedding has no output, so the worst case is the input at the input price), settled from
`usage.prompt_tokens`. Never a stream.
"""

from __future__ import annotations

from proxy.config import Settings
from proxy.errors import InvalidRequest, UpstreamFailed
from proxy.metering import StreamMeter, Usage, usage_from_body
from proxy.surfaces.base import OpenAIErrors, Parsed
from proxy.surfaces.completions import prompt_tokens, prompts_of
from proxy.validation import check_model, json_object_or_none, parse_json_object


class Embeddings(OpenAIErrors):
    route = "embeddings"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = parse_json_object(raw)
        model = check_model(body)
        inputs = prompts_of(body.get("input"))
        if inputs is None:
            raise InvalidRequest(
                "input must be a string, an array of strings, an array of tokens "
                "or an array of token arrays",
                param="input",
            )
        return Parsed(
            body=body,
            model=model,
            stream=False,
            content=raw,
            prompt_estimate=prompt_tokens(inputs),
            completion_max=0,
            priced=True,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return False

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        body = json_object_or_none(payload)
        if body is None:
            raise UpstreamFailed(
                "Upstream answered with a body that is not an embedding list", reason="invalid"
            )
        return usage_from_body(body)

    def stream_meter(self) -> StreamMeter:
        return StreamMeter()  # never used: no embeddings answer is a stream
