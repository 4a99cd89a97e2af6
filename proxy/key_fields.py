"""The fields of a key record as operators send them, checked alike for the admin API and
the CLI: limits, balance, allowed models, metadata and name, each bounded (400 naming it).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from proxy.credits import usd_to_micros
from proxy.errors import InvalidRequest
from proxy.keys import LIMIT_FIELDS, MAX_BALANCE_USD
from proxy.periods import PERIODS
from proxy.validation import MAX_MODEL_CHARS

# Limits stay far below 2**53, where the Lua scripts' numbers would stop being exact.
MAX_LIMIT = 10**12
MAX_NAME_CHARS = 200
MAX_METADATA_BYTES = 16 * 1024  # serialized as stored
MAX_MODELS = 1_000
MAX_GLOBS = 64  # allowed-model patterns with wildcards, each matched on every admission
MAX_GRACE_S = 30 * 86_400


def _nonneg_int(field: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
        raise InvalidRequest(
            f"{field} must be an integer from 0 to {MAX_LIMIT}, or null", param=field
        )
    return value


def usd_amount(field: str, value: object) -> int:
    """A USD number within the balance bound, in micro-dollars."""
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
    if sum(1 for m in value if "*" in m or "?" in m) > MAX_GLOBS:
        raise InvalidRequest(
            f"allowed_models may hold at most {MAX_GLOBS} patterns with * or ?",
            param="allowed_models",
        )
    return value or None


def expires_ms(value: object) -> int | None:
    """An ISO 8601 time (no offset = UTC) as ms since the epoch, or None."""
    if value is None:
        return None
    when = None
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            when = None
    if when is None:
        raise InvalidRequest(
            "expires_at must be an ISO 8601 date or time (e.g. 2030-01-31T00:00:00Z), or null",
            param="expires_at",
        )
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ms = math.floor(when.timestamp() * 1000)
    if not 0 <= ms < 253_402_300_800_000:  # years 1970 to 9999
        raise InvalidRequest("expires_at must be after 1970", param="expires_at")
    return ms


def budget(value: object) -> tuple[int, str] | None:
    """`{amount, period}` as (micro-dollars, period), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(
            'budget must be an object {"amount": USD, "period": "day"|"week"|"month"} or null',
            param="budget",
        )
    unknown = sorted(set(value) - {"amount", "period"})
    if unknown:
        raise InvalidRequest(f"unknown budget field {unknown[0]!r}", param="budget")
    amount = value.get("amount")
    if (
        isinstance(amount, bool)
        or not isinstance(amount, int | float)
        or not math.isfinite(amount)
        or not 0 < amount <= MAX_BALANCE_USD
    ):
        raise InvalidRequest(
            f"budget.amount must be a number of USD above 0 and at most {MAX_BALANCE_USD:,}",
            param="budget.amount",
        )
    period = value.get("period")
    if period not in PERIODS:
        raise InvalidRequest("budget.period must be day, week or month", param="budget.period")
    micros = usd_to_micros(amount)
    if micros <= 0:
        raise InvalidRequest("budget.amount must be at least 0.000001 USD", param="budget.amount")
    return micros, str(period)


MAX_MODEL_LIMITS = 64
MAX_PATTERN_CHARS = 256


def model_limits(value: object) -> list[tuple[str, int | None, int | None]] | None:
    """`{"<glob>": {rpm?, tpm?}}` in the order given, or None."""
    if value is None:
        return None
    message = (
        f"model_limits must be null or an object of at most {MAX_MODEL_LIMITS} model patterns "
        f"(1 to {MAX_PATTERN_CHARS} characters, no tabs or line breaks) to "
        f'{{"rpm": integer|null, "tpm": integer|null}}'
    )
    if not isinstance(value, dict) or len(value) > MAX_MODEL_LIMITS:
        raise InvalidRequest(message, param="model_limits")
    out: list[tuple[str, int | None, int | None]] = []
    for pattern, limits in value.items():
        if (
            not 0 < len(pattern) <= MAX_PATTERN_CHARS
            or any(c in pattern for c in "\t\n\r")
            or not isinstance(limits, dict)
            or set(limits) - {"rpm", "tpm"}
        ):
            raise InvalidRequest(message, param="model_limits")
        rpm, tpm = limits.get("rpm"), limits.get("tpm")
        for limit in (rpm, tpm):
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT
            ):
                raise InvalidRequest(message, param="model_limits")
        out.append((pattern, rpm, tpm))
    return out or None


def grace_seconds(payload: dict[str, Any]) -> int:
    """A rotation's `grace_seconds`: 0 to 30 days, default 0."""
    unknown = sorted(set(payload) - {"grace_seconds"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    value = payload.get("grace_seconds", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GRACE_S:
        raise InvalidRequest(
            f"grace_seconds must be an integer from 0 to {MAX_GRACE_S}", param="grace_seconds"
        )
    return value


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
    known = {
        "name", "credits", "allowed_models", "metadata", "expires_at", "budget", "model_limits",
        *LIMIT_FIELDS,
    }  # fmt: skip
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
    if "expires_at" in payload:
        out["expires_ms"] = expires_ms(payload["expires_at"])
    if "budget" in payload:
        out["budget"] = budget(payload["budget"])
    if "model_limits" in payload:
        out["model_limits"] = model_limits(payload["model_limits"])
    if creating:
        credits = payload.get("credits")
        out["credits_micros"] = None if credits is None else usd_amount("credits", credits)
    elif "credits" in payload:
        if payload["credits"] is not None:
            raise InvalidRequest(
                "change credits with POST /admin/keys/{id}/credits (or null for unlimited)",
                param="credits",
            )
        out["unlimited_credits"] = True
    return out
