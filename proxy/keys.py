"""API keys: generation, hashing, parsing, and the key records operators manage.

A key is `sk-tg-<id>_<secret>`: the id in clear lets one script on one cluster slot find the
record, and only the SHA-256 of the whole key is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from proxy import store
from proxy.credits import MICROS_PER_USD, micros_to_usd
from proxy.errors import InvalidRequest
from proxy.periods import period_bounds
from proxy.store import Store

KEY_PREFIX = "sk-tg-"
_KEY_RE = re.compile(r"^sk-tg-([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})$")
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency")
# A balance stays within ±1e9 USD: far below 2**53 micro-dollars, where the Lua scripts'
# numbers stop being exact, and far below the 2**63 where Redis' HINCRBY overflows.
MAX_BALANCE_USD = 10**9
MAX_BALANCE_MICROS = MAX_BALANCE_USD * MICROS_PER_USD


def _balance_out_of_bounds(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"A key's balance must stay between -{MAX_BALANCE_USD:,} and {MAX_BALANCE_USD:,} USD",
        param=param,
    )


@dataclass(frozen=True, slots=True)
class PresentedKey:
    """What a client's bearer key tells before the store is asked: its id and its hash."""

    key_id: str
    key_hash: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(key: str) -> PresentedKey | None:
    match = _KEY_RE.match(key)
    if match is None:
        return None
    return PresentedKey(key_id=match.group(1), key_hash=hash_key(key))


def valid_key_id(key_id: str) -> bool:
    return _ID_RE.match(key_id) is not None


def new_key(key_id: str) -> str:
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def _models_field(models: list[str] | None) -> str:
    """Allowed models as "\\nm1\\nm2\\n", so the admission script finds one with plain find."""
    return "" if not models else "\n" + "\n".join(models) + "\n"


def iso_ms(ms: str | int | None) -> str | None:
    """ms since the epoch as ISO 8601 UTC (`…Z`), or None."""
    if ms is None or ms == "":
        return None
    when = datetime.fromtimestamp(int(ms) / 1000, UTC)
    return when.isoformat(timespec="milliseconds" if int(ms) % 1000 else "seconds").replace(
        "+00:00", "Z"
    )


def _segment(part: str) -> re.Pattern[str]:
    return re.compile("".join("." if c == "?" else re.escape(c) for c in part), re.DOTALL)


def glob_matches(pattern: str, model: str) -> bool:
    """The admission script's glob: `*` any run of characters, `?` any one, nothing else.

    As in the script, without backtracking: the parts between stars have fixed lengths, so
    taking each at its leftmost place is exact."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return _segment(pattern).fullmatch(model) is not None
    first, last = parts[0], parts[-1]
    stop = len(model) - len(last)
    if stop < len(first):
        return False
    if not _segment(first).fullmatch(model[: len(first)]):
        return False
    if not _segment(last).fullmatch(model[stop:]):
        return False
    pos = len(first)
    for part in parts[1:-1]:
        found = _segment(part).search(model, pos, stop)
        if found is None:
            return False
        pos = found.end()
    return True


def model_allowed(patterns: list[str] | None, model: str) -> bool:
    return patterns is None or any(glob_matches(p, model) for p in patterns)


@dataclass(frozen=True, slots=True)
class Access:
    """What key authentication outside the hot path found: `ok`, `unknown` or `expired`,
    and the key's allowed model patterns (None = all)."""

    verdict: str
    models: list[str] | None = None


BUDGET_FIELDS = (
    "budget_micros",
    "budget_period",
    "budget_spent",
    "budget_reserved",
    "budget_start",
)


def _budget_json(fields: dict[str, str]) -> dict[str, Any]:
    """The budget, what the current period has spent (0 once a new period began) and when
    it resets."""
    if "budget_micros" not in fields:
        return {"budget": None, "budget_spent": 0.0, "budget_resets_at": None}
    period = fields.get("budget_period", "month")
    start, end = period_bounds(period, datetime.now(UTC))
    current = fields.get("budget_start") == str(int(start.timestamp() * 1000))
    return {
        "budget": {"amount": micros_to_usd(int(fields["budget_micros"])), "period": period},
        "budget_spent": micros_to_usd(int(fields.get("budget_spent", "0"))) if current else 0.0,
        "budget_resets_at": end.isoformat().replace("+00:00", "Z"),
    }


ModelLimits = list[tuple[str, int | None, int | None]]


def _model_limits_field(limits: ModelLimits | None) -> str:
    """Model limits as "<glob>\\t<rpm>\\t<tpm>\\n" lines, in order, for the admission script."""
    return "".join(
        f"{glob}\t{'' if rpm is None else rpm}\t{'' if tpm is None else tpm}\n"
        for glob, rpm, tpm in limits or []
    )


def _model_limits_json(field: str) -> dict[str, dict[str, int | None]] | None:
    limits: dict[str, dict[str, int | None]] = {}
    for line in field.split("\n"):
        if line:
            glob, rpm, tpm = line.rsplit("\t", 2)
            limits[glob] = {"rpm": int(rpm) if rpm else None, "tpm": int(tpm) if tpm else None}
    return limits or None


def record_json(fields: dict[str, str]) -> dict[str, Any]:
    """The admin API's view of a stored record (never the hash)."""
    models = [m for m in fields.get("models", "").split("\n") if m]
    credits = fields.get("credits")
    return {
        "id": fields["id"],
        "name": fields.get("name", ""),
        "rpm": int(fields["rpm"]) if "rpm" in fields else None,
        "tpm": int(fields["tpm"]) if "tpm" in fields else None,
        "max_concurrency": (
            int(fields["max_concurrency"]) if "max_concurrency" in fields else None
        ),
        "credits": micros_to_usd(int(credits)) if credits is not None else None,
        "reserved_credits": micros_to_usd(int(fields.get("reserved", "0"))),
        "allowed_models": models or None,
        "metadata": json.loads(fields.get("metadata", "{}")),
        "created_at": fields.get("created_at", ""),
        "revoked": fields.get("revoked") == "1",
        **_budget_json(fields),
        "expires_at": iso_ms(fields.get("expires_ms")),
        "model_limits": _model_limits_json(fields.get("model_limits", "")),
        "previous_secret_valid_until": iso_ms(fields.get("prev_until_ms")),
    }


class Keyring:
    """Create, read, change, revoke and rotate key records in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        source = resources.files("proxy").joinpath("lua", "keys_add_credits.lua")
        self.add_credits_script: AsyncScript = store.client.register_script(
            source.read_text(encoding="utf-8")
        )

    async def create(
        self,
        *,
        name: str,
        limits: dict[str, int | None],
        credits_micros: int | None,
        allowed_models: list[str] | None,
        metadata: dict[str, Any],
        expires_ms: int | None = None,
        budget: tuple[int, str] | None = None,
        model_limits: ModelLimits | None = None,
    ) -> dict[str, Any]:
        """A new key; the answer is the only place its secret `key` ever appears."""
        if credits_micros is not None and abs(credits_micros) > MAX_BALANCE_MICROS:
            raise _balance_out_of_bounds("credits")
        key_id = secrets.token_hex(8)
        key = new_key(key_id)
        fields = {
            "id": key_id,
            "hash": hash_key(key),
            "name": name,
            "models": _models_field(allowed_models),
            "metadata": json.dumps(metadata),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "revoked": "0",
            "reserved": "0",
        }
        fields.update({k: str(v) for k, v in limits.items() if v is not None})
        if credits_micros is not None:
            fields["credits"] = str(credits_micros)
        if expires_ms is not None:
            fields["expires_ms"] = str(expires_ms)
        if budget is not None:
            fields["budget_micros"], fields["budget_period"] = str(budget[0]), budget[1]
        if model_limits:
            fields["model_limits"] = _model_limits_field(model_limits)
        client = self.store.client
        await self.store.call(lambda: client.hset(store.record_key(key_id), mapping=fields))
        await self.store.call(lambda: client.sadd(store.KEY_INDEX, key_id))
        return {**record_json(fields), "key": key}

    async def _fields(self, key_id: str) -> dict[str, str] | None:
        if not valid_key_id(key_id):
            return None
        client = self.store.client
        fields: dict[str, str] = await self.store.call(
            lambda: client.hgetall(store.record_key(key_id))
        )
        return fields or None

    async def now_ms(self) -> int:
        """The store's clock, as the scripts read it."""
        client = self.store.client
        seconds, micros = await self.store.call(lambda: client.time())
        return int(seconds) * 1000 + int(micros) // 1000

    async def authenticate(self, presented: PresentedKey) -> Access:
        """Check a key outside the hot path (the current secret, or the previous one within
        its grace), as the admission script does."""
        client = self.store.client
        rkey = store.record_key(presented.key_id)
        stored, revoked, models, expires, prev_hash, prev_until = await self.store.call(
            lambda: client.hmget(
                rkey, ["hash", "revoked", "models", "expires_ms", "prev_hash", "prev_until_ms"]
            )
        )
        if stored is None or revoked == "1":
            return Access("unknown")
        now = await self.now_ms() if expires or prev_hash else 0
        current = hmac.compare_digest(stored, presented.key_hash)
        previous = (
            prev_hash is not None
            and hmac.compare_digest(prev_hash, presented.key_hash)
            and now < int(prev_until or 0)
        )
        if not (current or previous):
            return Access("unknown")
        if expires and now >= int(expires):
            return Access("expired")
        return Access("ok", [m for m in (models or "").split("\n") if m] or None)

    async def get(self, key_id: str) -> dict[str, Any] | None:
        fields = await self._fields(key_id)
        return record_json(fields) if fields else None

    async def all(self) -> list[dict[str, Any]]:
        client = self.store.client
        ids: set[str] = await self.store.call(lambda: client.smembers(store.KEY_INDEX))
        records = [await self.get(key_id) for key_id in sorted(ids)]
        return sorted(
            (r for r in records if r is not None), key=lambda r: (r["created_at"], r["id"])
        )

    async def update(
        self,
        key_id: str,
        *,
        name: str | None = None,
        limits: dict[str, int | None] | None = None,
        allowed_models: list[str] | bool | None = False,
        metadata: dict[str, Any] | None = None,
        expires_ms: int | bool | None = False,
        unlimited_credits: bool = False,
        budget: tuple[int, str] | bool | None = False,
        model_limits: ModelLimits | bool | None = False,
    ) -> dict[str, Any] | None:
        """Change what is given; a limit of None means unlimited; allowed_models and
        expires_ms False = keep, None = none; unlimited_credits drops the balance."""
        current = await self._fields(key_id)
        if current is None:
            return None
        changes: dict[str, str] = {}
        removals: list[str] = []
        if name is not None:
            changes["name"] = name
        for field, value in (limits or {}).items():
            if value is None:
                removals.append(field)
            else:
                changes[field] = str(value)
        if allowed_models is not False:
            models = allowed_models if isinstance(allowed_models, list) else None
            changes["models"] = _models_field(models)
        if metadata is not None:
            changes["metadata"] = json.dumps(metadata)
        if expires_ms is None:
            removals.append("expires_ms")
        elif expires_ms is not False:
            changes["expires_ms"] = str(int(expires_ms))
        if unlimited_credits:
            # Open reservations stay counted in "reserved" and are released as they settle.
            removals.append("credits")
        if model_limits is not False:
            limits_field = _model_limits_field(
                model_limits if isinstance(model_limits, list) else None
            )
            changes["model_limits"] = limits_field
        if budget is None:
            removals.extend(BUDGET_FIELDS)
        elif isinstance(budget, tuple):
            changes["budget_micros"], changes["budget_period"] = str(budget[0]), budget[1]
            if current.get("budget_period") != budget[1]:
                # A new kind of period starts afresh; open reservations settle harmlessly.
                removals.append("budget_start")
        client = self.store.client
        rkey = store.record_key(key_id)
        if changes:
            await self.store.call(lambda: client.hset(rkey, mapping=changes))
        if removals:
            await self.store.call(lambda: client.hdel(rkey, *removals))
        return await self.get(key_id)

    async def revoke(self, key_id: str) -> dict[str, Any] | None:
        if await self._fields(key_id) is None:
            return None
        client = self.store.client
        await self.store.call(lambda: client.hset(store.record_key(key_id), "revoked", "1"))
        return await self.get(key_id)

    async def restore(self, key_id: str) -> dict[str, Any] | None:
        """Undo a revoke: the key works again from its next request."""
        if await self._fields(key_id) is None:
            return None
        client = self.store.client
        await self.store.call(lambda: client.hset(store.record_key(key_id), "revoked", "0"))
        return await self.get(key_id)

    async def rotate(self, key_id: str, *, grace_s: int = 0) -> dict[str, Any] | None:
        """A new secret for the same id. The old one stops working on its next request, or,
        with a grace, once the grace has passed (the admission script checks the time)."""
        fields = await self._fields(key_id)
        if fields is None:
            return None
        key = new_key(key_id)
        client = self.store.client
        rkey = store.record_key(key_id)
        changes = {"hash": hash_key(key)}
        if grace_s > 0:
            until = await self.now_ms() + grace_s * 1000
            changes.update(prev_hash=fields["hash"], prev_until_ms=str(until))
            await self.store.call(lambda: client.hset(rkey, mapping=changes))
        else:
            await self.store.call(lambda: client.hset(rkey, mapping=changes))
            await self.store.call(lambda: client.hdel(rkey, "prev_hash", "prev_until_ms"))
            fields.pop("prev_until_ms", None)
        return {**record_json({**fields, **changes}), "key": key}

    async def add_credits(self, key_id: str, amount_micros: int) -> dict[str, Any] | None:
        """Add (or remove, when negative) credits; a key without a balance starts from 0.

        The check against the bound and the change are one script, so racing top-ups cannot
        together carry a balance past it.
        """
        if not valid_key_id(key_id):
            return None
        added = await self.store.run(
            self.add_credits_script,
            [store.record_key(key_id)],
            [amount_micros, MAX_BALANCE_MICROS],
        )
        if added == 0:
            return None
        if added < 0:
            raise _balance_out_of_bounds("amount")
        return await self.get(key_id)
