"""The admin API (/admin/*): keys, credits and usage for operators, behind its own token.

With no TOLLGATE_ADMIN_TOKEN every /admin path answers 404; the token is compared in
constant time. The CLI performs the same operations through `parse_key_fields`.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.credits import usd_to_micros
from proxy.endpoints import read_body
from proxy.errors import AuthenticationFailed, InvalidRequest, NotFound
from proxy.gateway import Gateway
from proxy.keys import LIMIT_FIELDS, MAX_BALANCE_USD
from proxy.usage import BadTime, default_window, export, key_usage, parse_time
from proxy.validation import is_utf8, parse_json_object

# Limits stay far below 2**53, where the Lua scripts' numbers would stop being exact.
MAX_LIMIT = 10**12
# Admin payloads are small; bounding them keeps key records (read on every admission) small.
MAX_BODY_BYTES = 64 * 1024
MAX_NAME_CHARS = 200
MAX_METADATA_BYTES = 16 * 1024  # serialized as stored
MAX_MODELS = 1_000
MAX_MODEL_CHARS = 256


def _nonneg_int(field: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise InvalidRequest(
            f"{field} must be an integer from 0 to {MAX_LIMIT}, or null", param=field
        )
    return value


def _usd(field: str, value: object) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or abs(value) > MAX_BALANCE_USD
    ):
        raise InvalidRequest(
            f"{field} must be a number of USD from -{MAX_BALANCE_USD:,} to {MAX_BALANCE_USD:,}",
            param=field,
        )
    return usd_to_micros(value)


def _models(value: object) -> list[str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_MODELS
        or not all(
            isinstance(m, str) and 0 < len(m) <= MAX_MODEL_CHARS and "\n" not in m for m in value
        )
    ):
        raise InvalidRequest(
            f"allowed_models must be null or a list of at most {MAX_MODELS} model names of "
            f"1 to {MAX_MODEL_CHARS} characters on one line",
            param="allowed_models",
        )
    return value or None


def _metadata(value: object) -> dict[str, Any]:
    metadata = value or {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object", param="metadata")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise InvalidRequest(
            f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON", param="metadata"
        )
    return metadata


def parse_key_fields(payload: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """Check a create/update payload; returns Keyring keyword arguments."""
    known = {"name", "credits", "allowed_models", "metadata", *LIMIT_FIELDS}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    out: dict[str, Any] = {}
    name = payload.get("name")
    if creating or "name" in payload:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise InvalidRequest(
                f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters",
                param="name",
            )
        out["name"] = name
    limits = {f: _nonneg_int(f, payload.get(f)) for f in LIMIT_FIELDS if f in payload}
    if creating or limits:
        out["limits"] = limits
    if "allowed_models" in payload or creating:
        out["allowed_models"] = _models(payload.get("allowed_models"))
    if "metadata" in payload or creating:
        out["metadata"] = _metadata(payload.get("metadata"))
    if creating:
        credits = payload.get("credits")
        out["credits_micros"] = None if credits is None else _usd("credits", credits)
    elif "credits" in payload:
        raise InvalidRequest("change credits with POST /admin/keys/{id}/credits", param="credits")
    return out


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    token = gateway.settings.admin_token
    if not token:
        raise NotFound("Not found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise AuthenticationFailed("Invalid admin token")
    return gateway


def _found(record: dict[str, Any] | None, key_id: str) -> dict[str, Any]:
    if record is None:
        raise NotFound(f"No key with id {key_id!r}")
    return record


async def _payload(request: Request) -> dict[str, Any]:
    payload = parse_json_object(await read_body(request, MAX_BODY_BYTES))
    if not is_utf8(json.dumps(payload, ensure_ascii=False)):
        raise InvalidRequest("Request body holds text that is not valid Unicode (a lone surrogate)")
    return payload


async def create_key(request: Request) -> Response:
    gateway = _gateway(request)
    fields = parse_key_fields(await _payload(request), creating=True)
    return JSONResponse(await gateway.keyring.create(**fields), status_code=201)


async def list_keys(request: Request) -> Response:
    gateway = _gateway(request)
    return JSONResponse({"object": "list", "data": await gateway.keyring.all()})


async def show_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    return JSONResponse(_found(await gateway.keyring.get(key_id), key_id))


async def update_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    fields = parse_key_fields(await _payload(request), creating=False)
    return JSONResponse(_found(await gateway.keyring.update(key_id, **fields), key_id))


async def revoke_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    return JSONResponse(_found(await gateway.keyring.revoke(key_id), key_id))


async def rotate_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    return JSONResponse(_found(await gateway.keyring.rotate(key_id), key_id))


async def add_credits(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    payload = await _payload(request)
    amount = _usd("amount", payload.get("amount"))
    return JSONResponse(_found(await gateway.keyring.add_credits(key_id, amount), key_id))


def _window(request: Request) -> tuple[Any, Any]:
    since_default, until_default = default_window()
    try:
        since = parse_time(request.query_params.get("since"), default=since_default)
        until = parse_time(request.query_params.get("until"), default=until_default)
    except BadTime as exc:
        raise InvalidRequest(str(exc), param="since/until") from None
    if until <= since:
        raise InvalidRequest("until must be later than since", param="until")
    return since, until


async def usage_of_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    _found(await gateway.keyring.get(key_id), key_id)
    group_by = request.query_params.get("group_by", "day")
    if group_by not in ("day", "model"):
        raise InvalidRequest("group_by must be day or model", param="group_by")
    since, until = _window(request)
    answer = await key_usage(gateway.store, key_id, since=since, until=until, group_by=group_by)
    return JSONResponse(answer)


async def export_usage(request: Request) -> Response:
    gateway = _gateway(request)
    since, until = _window(request)
    key_ids = [record["id"] for record in await gateway.keyring.all()]
    lines = export(gateway.store, key_ids, since=since, until=until)
    return StreamingResponse(lines, media_type="application/x-ndjson")


routes = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/{id}", show_key, methods=["GET"]),
    Route("/admin/keys/{id}", update_key, methods=["PATCH"]),
    Route("/admin/keys/{id}", revoke_key, methods=["DELETE"]),
    Route("/admin/keys/{id}/rotate", rotate_key, methods=["POST"]),
    Route("/admin/keys/{id}/credits", add_credits, methods=["POST"]),
    Route("/admin/keys/{id}/usage", usage_of_key, methods=["GET"]),
    Route("/admin/usage/export", export_usage, methods=["GET"]),
]
