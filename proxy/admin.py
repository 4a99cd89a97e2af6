"""The admin API (/admin/*): keys, credits and usage for operators, behind its own token,
and the console at /admin/ that calls it (static files in `proxy/console/`).

With no TOLLGATE_ADMIN_TOKEN every /admin path answers 404, the console too; the token is
compared in constant time. Key fields are checked by `proxy/key_fields.py`, as for the CLI.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.endpoints import read_body
from proxy.errors import AuthenticationFailed, InvalidRequest, MethodNotAllowed, NotFound
from proxy.gateway import Gateway
from proxy.key_fields import grace_seconds, parse_key_fields, usd_amount
from proxy.usage import BadTime, default_window, export, key_usage, parse_time
from proxy.validation import is_utf8, parse_json_object

# Admin payloads are small; bounding them keeps key records (read on every admission) small.
MAX_BODY_BYTES = 64 * 1024


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


async def _payload(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object sent; with `optional`, no body at all reads as `{}`."""
    raw = await read_body(request, MAX_BODY_BYTES)
    if optional and not raw.strip():
        return {}
    payload = parse_json_object(raw)
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


async def restore_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    return JSONResponse(_found(await gateway.keyring.restore(key_id), key_id))


async def rotate_key(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    _found(await gateway.keyring.get(key_id), key_id)  # an unknown id is 404 whatever the body
    grace_s = grace_seconds(await _payload(request, optional=True))
    return JSONResponse(_found(await gateway.keyring.rotate(key_id, grace_s=grace_s), key_id))


async def add_credits(request: Request) -> Response:
    gateway = _gateway(request)
    key_id = request.path_params["id"]
    payload = await _payload(request)
    amount = usd_amount("amount", payload.get("amount"))
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


# The console is static: its own script and style only, never framed, never a referrer.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# Path -> (file in proxy/console/, media type).
CONSOLE_PATHS = {
    "/admin/": ("index.html", "text/html; charset=utf-8"),
    "/admin/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/admin/console.css": ("console.css", "text/css; charset=utf-8"),
}


_EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@functools.cache
def _console_file(name: str) -> bytes:
    return resources.files("proxy").joinpath("console", name).read_bytes()


def _console_enabled(request: Request) -> None:
    """The console exists only where the admin API does, and is only read."""
    gateway: Gateway = request.app.state.gateway
    if not gateway.settings.admin_token:
        raise NotFound("Not found")
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(f"Method {request.method} not allowed here")


def _console_page(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    """The handler of one console file: the page and its two assets load without the token,
    which the page asks for and sends to the admin API itself."""

    async def page(request: Request) -> Response:
        _console_enabled(request)
        headers = {
            "content-security-policy": CONSOLE_CSP,
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff",
            "cache-control": "no-cache",
        }
        return Response(_console_file(name), media_type=media_type, headers=headers)

    return page


async def console_redirect(request: Request) -> Response:
    _console_enabled(request)
    return RedirectResponse("/admin/", status_code=308)  # a path: never built from Host


routes = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/{id}", show_key, methods=["GET"]),
    Route("/admin/keys/{id}", update_key, methods=["PATCH"]),
    Route("/admin/keys/{id}", revoke_key, methods=["DELETE"]),
    Route("/admin/keys/{id}/rotate", rotate_key, methods=["POST"]),
    Route("/admin/keys/{id}/restore", restore_key, methods=["POST"]),
    Route("/admin/keys/{id}/credits", add_credits, methods=["POST"]),
    Route("/admin/keys/{id}/usage", usage_of_key, methods=["GET"]),
    Route("/admin/usage/export", export_usage, methods=["GET"]),
    # Every method reaches these, so that without a token they answer 404 like the API.
    Route("/admin", console_redirect, methods=_EVERY_METHOD),
    *(
        Route(path, _console_page(*file), methods=_EVERY_METHOD)
        for path, file in CONSOLE_PATHS.items()
    ),
]
