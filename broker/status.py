"""The fleet at a glance: one row per app from what the store holds and what this replica knows.

`token-broker status` and `GET /v1/status` (on the metrics listener, when
`server.status_endpoint` is true) show the same JSON document, described by `STATUS_SCHEMA`
(and in docs/contract.md). Both read the store with read commands only (`StoreInspector`).

What is shown, and why it is safe: ranks (lineage, generation, write version), times (expiry,
due time, lease TTL, spend age, backoff), counters (fence, failures, budget used), lease and
spend owners (replica ids: host name, pid and a random suffix), the store name (`app@binding`,
already part of every key name) and the secret-free error text of the shared failure (what
`/v1/apps` shows as `last_error`). Never shown: an access or refresh token, the fingerprints
the store keeps of them (`fp`, `rfp`: a fingerprint confirms a guessed or stolen token), a
client secret or key, the store's encryption key or its id, the Redis password.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker import policy
from broker.model import AppSpec, RefreshPolicy, TokenSet
from broker.store.facts import StoredFacts, StoreInspector

STATUS_VERSION = 1
# What the store says about an app, worst first (`store_state`).
STORE_STATES = (
    "outcome_unknown",
    "moved",
    "unreadable",
    "backoff",
    "refreshing",
    "no_token",
    "expired",
    "fresh",
)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What this replica knows of an app that the store does not say."""

    state: str
    ready: bool
    next_refresh_at: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class AppTarget:
    """An app to describe: its spec and the name the store knows it by."""

    spec: AppSpec
    store_name: str


async def collect(
    inspector: StoreInspector,
    targets: Sequence[AppTarget],
    replica: Mapping[str, ReplicaView] | None = None,
    *,
    source: str,
) -> dict[str, Any]:
    """The status document: the store read at one instant of its clock, one row per app."""
    now = await inspector.read_time()
    facts = await asyncio.gather(*(inspector.inspect(t.store_name, now) for t in targets))
    views = replica or {}
    return {
        "version": STATUS_VERSION,
        "source": source,
        "now": _time(now),
        "apps": [
            app_row(target.spec, fact, views.get(target.spec.name))
            for target, fact in zip(targets, facts, strict=True)
        ],
    }


def store_state(facts: StoredFacts) -> str:
    """One word for what the store says about the app, the most urgent first (STORE_STATES)."""
    spend = facts.spend
    token = facts.token
    if spend is not None and spend.state in ("unknown", "vetoed"):
        return "outcome_unknown"
    if token is not None and token.moved_to is not None:
        return "moved"
    if token is not None and token.expires_at is None:
        return "unreadable"
    if facts.failure is not None and facts.failure.not_before > facts.now:
        return "backoff"
    if facts.lease is not None or spend is not None:
        return "refreshing"
    if token is None:
        return "no_token"
    assert token.expires_at is not None
    if token.expires_at <= facts.now:
        return "expired"
    return "fresh"


def fleet_due(issued_at: float, expires_at: float, jitter: float, refresh: RefreshPolicy) -> float:
    """The fleet's due time of a stored set (each replica adds a stagger of at most 2 s)."""
    shape = TokenSet(access_token="", token_type="", issued_at=issued_at, expires_at=expires_at)
    return policy.refresh_due(shape, refresh, jitter)


def app_row(spec: AppSpec, facts: StoredFacts, replica: ReplicaView | None) -> dict[str, Any]:
    """One app's row of the status document."""
    now = facts.now
    token = facts.token
    stored: dict[str, Any] | None = None
    if token is not None:
        due = None
        if token.expires_at is not None and token.issued_at is not None:
            due = fleet_due(token.issued_at, token.expires_at, token.jitter, spec.refresh)
        stored = {
            "lineage": token.rank[0],
            "generation": token.rank[1],
            "version": token.version,
            "protocol": token.protocol,
            "readable": token.readable,
            "moved_to": token.moved_to,
            "issued_at": _time(token.issued_at),
            "expires_at": _time(token.expires_at),
            "expires_in": _time(None if token.expires_at is None else token.expires_at - now),
            # Whole seconds: the due time is drawn from the access token's fingerprint.
            "refresh_due_at": None if due is None else float(math.floor(due)),
        }
    lease = facts.lease
    spend = facts.spend
    failure = facts.failure
    limit = spec.max_token_requests_per_minute
    return {
        "app": spec.name,
        "store_name": facts.name,
        "grant": spec.grant_type.value,
        "state": store_state(facts),
        "token": stored,
        "lease": None
        if lease is None
        else {
            "holder": lease.owner,
            "fence": lease.fence,
            "protocol": lease.protocol,
            "expires_in": _time(lease.expires_in),
        },
        "fence": facts.fence,
        "spend": None
        if spend is None
        else {
            "state": spend.state,
            "owner": spend.owner,
            "fence": spend.fence,
            "lineage": spend.rank[0],
            "generation": spend.rank[1],
            "retries": spend.retries,
            "age": _time(None if spend.sent_at is None else max(0.0, now - spend.sent_at)),
        },
        "failure": None
        if failure is None
        else {
            "not_before": _time(failure.not_before),
            "retry_in": _time(max(0.0, failure.not_before - now)),
            "error": failure.error,
            "failures": failure.failures,
            "permanent": failure.permanent,
        },
        "failure_unreadable": facts.failure_unreadable,
        "budget": None
        if limit is None
        else {
            "limit_per_minute": limit,
            "used": facts.budget_used,
            "left": max(0, limit - facts.budget_used),
        },
        "replica": None
        if replica is None
        else {
            "state": replica.state,
            "ready": replica.ready,
            "next_refresh_at": _time(replica.next_refresh_at),
            "last_error": replica.last_error,
        },
    }


def _time(value: float | None) -> float | None:
    """Seconds to the millisecond (what the store's clocks resolve)."""
    return None if value is None else round(value, 3)


# ---- rendering ---------------------------------------------------------------------------------

COLUMNS = ("APP", "STATE", "RANK", "EXPIRES", "NEXT REFRESH", "LEASE", "SPEND", "FAILURE", "BUDGET")


def render_table(document: Mapping[str, Any]) -> str:
    """The document as a table, one row per app (times relative to the store's clock)."""
    now = float(document["now"])
    rows = [COLUMNS] + [_cells(row, now) for row in document["apps"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _cells(row: Mapping[str, Any], now: float) -> tuple[str, ...]:
    token = row["token"]
    replica = row["replica"]
    state = row["state"]
    if replica is not None and replica["state"] != state:
        state = f"{state} (here: {replica['state']})"
    rank = expires = due = "-"
    if token is not None:
        rank = f"{token['lineage']}/{token['generation']}"
        if token["expires_at"] is not None:
            expires = _relative(token["expires_at"] - now)
        if token["refresh_due_at"] is not None:
            due = _relative(token["refresh_due_at"] - now)
    if replica is not None and replica["next_refresh_at"] is not None:
        due = _relative(replica["next_refresh_at"] - now)
    lease = row["lease"]
    spend = row["spend"]
    failure = row["failure"]
    budget = row["budget"]
    return (
        row["app"],
        state,
        rank,
        expires,
        due,
        "-" if lease is None else f"{lease['holder']} #{lease['fence']}",
        "-" if spend is None else _spend_cell(spend),
        "-" if failure is None else _failure_cell(failure),
        "-" if budget is None else f"{budget['left']}/{budget['limit_per_minute']} left",
    )


def _spend_cell(spend: Mapping[str, Any]) -> str:
    age = "" if spend["age"] is None else f" {_duration(spend['age'])} ago"
    return f"{spend['state']} by {spend['owner']}{age}"


def _failure_cell(failure: Mapping[str, Any]) -> str:
    error = str(failure["error"])
    short = error if len(error) <= 40 else error[:39] + "…"
    return f"x{failure['failures']} retry {_relative(failure['retry_in'])}: {short}"


def render_detail(row: Mapping[str, Any], now: float) -> str:
    """One app in full: every field of its row, times also told relative to now."""
    lines = [f"app:        {row['app']}", f"store name: {row['store_name']}"]
    lines.append(f"grant:      {row['grant']}")
    lines.append(f"state:      {row['state']}")
    replica = row["replica"]
    if replica is not None:
        lines.append(f"this replica: {replica['state']}, ready: {_yes(replica['ready'])}")
        if replica["next_refresh_at"] is not None:
            lines.append(f"  next refresh: {_when(replica['next_refresh_at'], now)}")
        if replica["last_error"]:
            lines.append(f"  last error:   {replica['last_error']}")
    token = row["token"]
    if token is None:
        lines.append("token set:  none stored")
    else:
        lines.append(
            f"token set:  lineage {token['lineage']}, generation {token['generation']}, "
            f"version {token['version']}, protocol {token['protocol']}"
        )
        if token["moved_to"] is not None:
            lines.append(f"  moved to:     {token['moved_to']} (an upgrade's tombstone)")
        elif not token["readable"]:
            lines.append("  unreadable here: no configured encryption key opens it")
        else:
            lines.append(f"  issued:       {_when(token['issued_at'], now)}")
            lines.append(f"  expires:      {_when(token['expires_at'], now)}")
            lines.append(f"  refresh due:  {_when(token['refresh_due_at'], now)} (fleet)")
    lease = row["lease"]
    lines.append(f"fence:      {row['fence']}")
    if lease is None:
        lines.append("lease:      free")
    else:
        ttl = "no TTL" if lease["expires_in"] is None else f"{_duration(lease['expires_in'])} left"
        lines.append(
            f"lease:      held by {lease['holder']}, fence {lease['fence']}, "
            f"protocol {lease['protocol']}, {ttl}"
        )
    spend = row["spend"]
    if spend is None:
        lines.append("spend:      none")
    else:
        age = "not sent yet" if spend["age"] is None else f"sent {_duration(spend['age'])} ago"
        lines.append(
            f"spend:      {spend['state']} by {spend['owner']} (fence {spend['fence']}) of "
            f"{spend['lineage']}/{spend['generation']}, {age}, retries {spend['retries']}"
        )
    failure = row["failure"]
    if failure is None:
        unreadable = " (one is stored that no key here opens)" if row["failure_unreadable"] else ""
        lines.append(f"failure:    none{unreadable}")
    else:
        kind = "permanent" if failure["permanent"] else "transient"
        lines.append(
            f"failure:    {failure['failures']} in a row ({kind}), no attempt before "
            f"{_when(failure['not_before'], now)}"
        )
        lines.append(f"  error:        {failure['error']}")
    budget = row["budget"]
    if budget is None:
        lines.append("budget:     none configured")
    else:
        lines.append(
            f"budget:     {budget['left']} of {budget['limit_per_minute']} requests left "
            f"this minute ({budget['used']} used)"
        )
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    return f"{at:.3f} ({_relative(at - now)})"


def _relative(seconds: float) -> str:
    if seconds >= 0:
        return f"in {_duration(seconds)}"
    return f"{_duration(-seconds)} ago"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


# ---- the document's JSON Schema (also in docs/contract.md) -------------------------------------

_SECONDS = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_OWNER = {"type": "string"}


def _object(properties: dict[str, Any], *, nullable: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": ["object", "null"] if nullable else "object",
        "additionalProperties": False,
        "required": sorted(properties),
        "properties": properties,
    }
    return schema


STATUS_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "token-broker status",
    **_object(
        {
            "version": {"const": STATUS_VERSION},
            "source": {"enum": ["store", "replica"]},
            "now": {"type": "number"},
            "apps": {
                "type": "array",
                "items": _object(
                    {
                        "app": {"type": "string"},
                        "store_name": {"type": "string"},
                        "grant": {"enum": ["client_credentials", "authorization_code"]},
                        "state": {"enum": list(STORE_STATES)},
                        "token": _object(
                            {
                                "lineage": _COUNT,
                                "generation": _COUNT,
                                "version": _COUNT,
                                "protocol": _COUNT,
                                "readable": {"type": "boolean"},
                                "moved_to": {"type": ["string", "null"]},
                                "issued_at": _SECONDS,
                                "expires_at": _SECONDS,
                                "expires_in": _SECONDS,
                                "refresh_due_at": _SECONDS,
                            }
                        ),
                        "lease": _object(
                            {
                                "holder": _OWNER,
                                "fence": _COUNT,
                                "protocol": _COUNT,
                                "expires_in": _SECONDS,
                            }
                        ),
                        "fence": _COUNT,
                        "spend": _object(
                            {
                                "state": {"enum": ["announced", "sent", "unknown", "vetoed"]},
                                "owner": _OWNER,
                                "fence": _COUNT,
                                "lineage": _COUNT,
                                "generation": _COUNT,
                                "retries": _COUNT,
                                "age": _SECONDS,
                            }
                        ),
                        "failure": _object(
                            {
                                "not_before": {"type": "number"},
                                "retry_in": {"type": "number", "minimum": 0},
                                "error": {"type": "string"},
                                "failures": _COUNT,
                                "permanent": {"type": "boolean"},
                            }
                        ),
                        "failure_unreadable": {"type": "boolean"},
                        "budget": _object(
                            {
                                "limit_per_minute": {"type": "integer", "minimum": 1},
                                "used": _COUNT,
                                "left": _COUNT,
                            }
                        ),
                        "replica": _object(
                            {
                                "state": {
                                    "enum": [
                                        "fresh",
                                        "refreshing",
                                        "failing",
                                        "needs_authorization",
                                    ]
                                },
                                "ready": {"type": "boolean"},
                                "next_refresh_at": _SECONDS,
                                "last_error": {"type": ["string", "null"]},
                            }
                        ),
                    },
                    nullable=False,
                ),
            },
        },
        nullable=False,
    ),
}
