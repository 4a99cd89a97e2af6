"""Metered pass-through: APIs Tollgate forwards as they are and charges from reported usage.

The operator's TOLLGATE_PASSTHROUGH_PATHS are authenticated and request-limited; they reserve
nothing, and a 2xx answer that reports `usage` (JSON or an SSE event) is charged from it.
"""

from __future__ import annotations

from proxy.config import Settings
from proxy.errors import InvalidRequest
from proxy.metering import StreamMeter, Usage, usage_from_body
from proxy.surfaces.base import OpenAIErrors, Parsed
from proxy.validation import MAX_MODEL_CHARS, is_utf8, json_object_or_none

UNKNOWN_MODEL = "-"


class Passthrough(OpenAIErrors):
    route = "passthrough"

    def parse(self, raw: bytes, settings: Settings) -> Parsed:
        body = json_object_or_none(raw) if raw else None
        model = body.get("model") if body is not None else None
        if isinstance(model, str) and len(model) > MAX_MODEL_CHARS:
            raise InvalidRequest(
                f"model must be at most {MAX_MODEL_CHARS} characters", param="model"
            )
        return Parsed(
            model=model if isinstance(model, str) and model and is_utf8(model) else UNKNOWN_MODEL,
            stream=bool(body and body.get("stream") is True),
            content=raw or None,
            prompt_estimate=0,
            completion_max=0,
            priced=False,
        )

    def accepts_stream(self, parsed: Parsed) -> bool:
        return True

    def usage_from_json(self, payload: bytes, parsed: Parsed) -> Usage | None:
        if b'"usage"' not in payload:  # most answers: nothing to parse
            return None
        body = json_object_or_none(payload)
        return usage_from_body(body) if body is not None else None

    def stream_meter(self) -> StreamMeter:
        return StreamMeter()
