"""The Redis store: encrypted token sets, the lease, fence and spend record per app, notices.

Keys carry the app's store name (`<app>@<client binding>`, broker/store `bound_name`) as a hash
tag, so Redis Cluster keeps one app's keys on one slot: `{prefix}:{<name>}:token` (a hash:
`version`, `lineage`, `gen`, `fp`, `pv`, `blob`; `expires_by` and `expires_by_version` once a
replica lowered its expiry, `_LOWER_EXPIRY`), `...:lease` (`<owner>|<fence>|<protocol
version>`, with a TTL), `...:fence` (a counter) and `...:spend` (a hash: `fence`, `owner`,
`rfp`, `lineage`, `gen`, `state`, `retries`). Every write is one Lua script that also publishes
a JSON notice (with `pv`) on `{prefix}:updates`; the rules are those of broker/store/__init__.py.
A set stored under the bare app name by a release before the binding moves to the first store
name that reads it (`_MOVE_LEGACY`).

For the fleet: `{prefix}:{<app>}:failure` (the shared outcome of a failed refresh, encrypted,
expiring on the server's clock) and `{prefix}:{<app>}:budget` (a sorted set of request times,
the sliding window of the fleet-wide request budget). The fleet's clock is the server's `TIME`,
read with a plain `TIME`; on a Cluster through a script routed by the key `{prefix}:{_clock}`, so
every replica asks the same node (no app name starts with `_`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from broker.clock import Clock
from broker.errors import NotDurable, StoreUnavailable, UnreadableTokenSet
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.model import PROTOCOL_VERSION, FailureRecord, TokenSet
from broker.policy import fleet_jitter_sample
from broker.store import (
    ABORTS_KEPT,
    BUDGET_WINDOW,
    FAILURE_RETENTION,
    HEARTBEAT,
    Commit,
    Lease,
    Notice,
    Refusal,
    SpendEnd,
    SpendRecord,
    SpendStart,
)
from broker.store.crypto import Keyring, UndecryptableToken
from broker.store.facts import StoredFacts, StoredLease, StoredSet, StoredSpend
from broker.store.redis_pool import (
    MAX_COMMAND_CONNECTIONS,
    POOL_WAIT_TIMEOUT,
    BoundedCluster,
    WaitingPool,
    WaitingSentinelPool,
    bounded_cluster,
    default_client_name,
    keepalive_options,
)

log = get_logger(__name__)

T = TypeVar("T")

# The only maxmemory-policy under which Redis never drops the fleet's keys.
NO_EVICTION = "noeviction"

# Ranks compare as (lineage, generation).
_RANK = """
local function outranks(l1, g1, l2, g2)
  return l1 > l2 or (l1 == l2 and g1 > g2)
end
"""
# KEYS: token, spend. ARGV: lineage, gen, access fp, blob, fence, channel, app, blob in base64
# (the notice carries the set: replicas adopt it without reading)
_COMMIT = (
    _RANK
    + """
local cur = redis.call('HMGET', KEYS[1], 'version', 'lineage', 'gen', 'fp', 'expires_by')
local version = tonumber(cur[1] or '0')
local nl, ng = tonumber(ARGV[1]), tonumber(ARGV[2])
if cur[1] then
  local cl, cg = tonumber(cur[2] or '0'), tonumber(cur[3] or '0')
  if cl == nl and cg == ng and cur[4] == ARGV[3] then
    -- a repeat: write the version again, so that a WAIT after it counts the replicas holding it
    redis.call('HSET', KEYS[1], 'version', version)
    return {1, version, cl, cg}
  end
  if not outranks(nl, ng, cl, cg) then return {0, version, cl, cg} end
end
version = version + 1
redis.call('HSET', KEYS[1], 'version', version, 'lineage', nl, 'gen', ng, 'fp', ARGV[3],
  'fence', ARGV[5], 'blob', ARGV[4], 'pv', __PV__)
if cur[5] then
  -- a lowered expiry belongs to the set it lowered (written together with its version)
  redis.call('HDEL', KEYS[1], 'expires_by', 'expires_by_version')
end
local sp = redis.call('HMGET', KEYS[2], 'lineage', 'gen')
if sp[1] and outranks(nl, ng, tonumber(sp[1]), tonumber(sp[2])) then
  redis.call('DEL', KEYS[2])
end
redis.call('PUBLISH', ARGV[6], cjson.encode({app=ARGV[7], kind='token', version=version,
  lineage=nl, gen=ng, blob=ARGV[8], pv=__PV__}))
return {1, version, nl, ng}
"""
)
# KEYS: lease, fence counter. ARGV: owner, ttl ms, channel, app. The value is
# `owner|fence|protocol`; a busy answer carries the holder's protocol version (a value without
# one: 1). A grant is announced (a `lease` notice with its ttl): replicas that hear it wait for
# the holder's notice instead of racing for the lease at the same due time.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '|' then
  local pv = string.match(held, '^[^|]*|[^|]*|(%d+)$')
  return {0, redis.call('PTTL', KEYS[1]), tonumber(pv or '1')}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. fence .. '|__PV__', 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({app=ARGV[4], kind='lease', owner=ARGV[1],
  ttl=tonumber(ARGV[2]), pv=__PV__}))
return {fence, 0, __PV__}
"""
# KEYS: lease. ARGV: owner|fence, channel, app, owner. A release is announced (`release`):
# replicas waiting on the lease look again now rather than at its end.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], cjson.encode({app=ARGV[3], kind='release', owner=ARGV[4],
    pv=__PV__}))
  return 1
end
return 0
"""
# KEYS: lease, token, spend. ARGV: owner|fence, fence, owner, lineage, gen, rfp, retry_within ms,
# resolved fence, channel, app
_BEGIN_SPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'lost' end
local cur = redis.call('HMGET', KEYS[2], 'lineage', 'gen')
if not cur[1] or tonumber(cur[1]) ~= tonumber(ARGV[4]) or tonumber(cur[2]) ~= tonumber(ARGV[5])
then return 'stale' end
local sp = redis.call('HMGET', KEYS[3], 'fence', 'owner', 'rfp', 'retries', 'state', 'sent_at',
  'orig_sent_at')
local answer, retries = 'ok', 0
-- a spend is its owner and fence: fences repeat once the counter is lost (an eviction)
if sp[1] and sp[3] == ARGV[6] and (sp[1] ~= ARGV[2] or sp[2] ~= ARGV[3]) then
  if sp[5] == 'vetoed' or sp[7] then return 'unknown' end
  -- fence 0 names no spend: a restored grace retry is nobody's to resolve, its retrier's too
  if sp[5] ~= 'announced' and not (ARGV[8] ~= '0' and sp[1] == ARGV[8] and sp[2] == ARGV[3])
  then
    local t = redis.call('TIME')
    local age = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(sp[6] or '0')
    -- A negative age is a clock that stepped back: not inside any window.
    if tonumber(sp[4] or '0') > 0 or age < 0 or age >= tonumber(ARGV[7]) then
      return 'unknown'
    end
    answer, retries = 'retry', 1
  end
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'fence', ARGV[2], 'owner', ARGV[3], 'rfp', ARGV[6],
  'lineage', ARGV[4], 'gen', ARGV[5], 'state', 'announced', 'retries', retries)
if answer == 'retry' then
  redis.call('HSET', KEYS[3], 'orig_sent_at', sp[6] or '0', 'orig_owner', sp[2],
    'orig_fence', sp[1])
end
redis.call('PUBLISH', ARGV[9], cjson.encode({app=ARGV[10], kind='spend',
  lineage=tonumber(ARGV[4]), gen=tonumber(ARGV[5]), rfp=ARGV[6], owner=ARGV[3],
  retry=(answer == 'retry') and 1 or 0, pv=__PV__}))
return answer
"""
# KEYS: lease, spend. ARGV: owner|fence, fence, channel, app, owner
_MARK_SENT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local sp = redis.call('HMGET', KEYS[2], 'fence', 'owner', 'rfp', 'lineage', 'gen')
if sp[1] ~= ARGV[2] or sp[2] ~= ARGV[5] then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[2], 'state', 'sent',
  'sent_at', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('PUBLISH', ARGV[3], cjson.encode({app=ARGV[4], kind='sent',
  lineage=tonumber(sp[4]), gen=tonumber(sp[5]), rfp=sp[3], owner=sp[2],
  fence=tonumber(ARGV[2]), pv=__PV__}))
return 1
"""
# The marks of aborted spends, each "owner|fence|rfp" for a day: the last one (`aborted_key`,
# which a release before reads too) and the latest ABORTS_KEPT, the newest first (`aborts_key`).
_ABORT_MARKS = """
local function remember_abort(last_key, key, mark)
  redis.call('SET', last_key, mark, 'EX', 86400)
  redis.call('LPUSH', key, mark)
  redis.call('LTRIM', key, 0, __ABORTS_KEPT__ - 1)
  redis.call('PEXPIRE', key, 86400000)
end
local function aborted_recently(last_key, key, mark, prefix)
  local held = redis.call('LRANGE', key, 0, -1)
  table.insert(held, redis.call('GET', last_key) or '')
  for _, kept in ipairs(held) do
    if kept == mark or (prefix and string.sub(kept, 1, string.len(mark)) == mark) then
      return true
    end
  end
  return false
end
"""
# KEYS: spend, lease, aborted, aborts. ARGV: rfp, protected owner ('' for none), protected fence
_VETO_SPEND = (
    _ABORT_MARKS
    + """
local sp = redis.call('HMGET', KEYS[1], 'rfp', 'state', 'owner', 'fence', 'orig_sent_at')
if sp[1] ~= ARGV[1] or sp[2] ~= 'announced' then return 0 end
if redis.call('GET', KEYS[2]) ~= sp[3] .. '|' .. sp[4] .. '|__PV__' then return 0 end
-- the one spend the veto stands for ended without effect (its abort notice was missed)
if ARGV[2] ~= '' and ARGV[3] ~= '0' and aborted_recently(KEYS[3], KEYS[4],
  ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[1], false) then return 0 end
-- the spender of the spend it stands for spends again: it knows that spend had no effect
if ARGV[2] ~= '' and sp[3] == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'fence', 0, 'state', 'vetoed', 'retries', 1)
if sp[5] then
  redis.call('HSET', KEYS[1], 'sent_at', sp[5])
  redis.call('HDEL', KEYS[1], 'orig_sent_at')
elseif ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'orig_owner', ARGV[2], 'orig_fence', ARGV[3])
end
return 1
"""
)
# KEYS: spend, aborted, aborts. ARGV: fence, outcome, channel, app, owner (fences repeat after
# a rollback), rfp of an ordinary spend ('' for none)
_END_SPEND = (
    _ABORT_MARKS
    + """
local sp = redis.call('HMGET', KEYS[1], 'fence', 'owner', 'rfp', 'lineage', 'gen',
  'orig_sent_at', 'orig_owner', 'orig_fence', 'state')
if not sp[1] then
  -- our abort applied already (a mark names this spend): touch the marks, so that a WAIT
  -- after this call counts the replicas that hold the abort
  local mark = ARGV[5] .. '|' .. ARGV[1] .. '|'
  if ARGV[2] == 'aborted' and aborted_recently(KEYS[2], KEYS[3], mark, true) then
    redis.call('PEXPIRE', KEYS[2], 86400000)
    redis.call('PEXPIRE', KEYS[3], 86400000)
    return 2
  end
  -- the store forgot the record: keep the abort anyway, and announce it
  if ARGV[2] == 'aborted' and ARGV[6] ~= '' and ARGV[1] ~= '0' then
    remember_abort(KEYS[2], KEYS[3], ARGV[5] .. '|' .. ARGV[1] .. '|' .. ARGV[6])
    redis.call('PUBLISH', ARGV[3], cjson.encode({app=ARGV[4], kind='abort', lineage=0, gen=0,
      rfp=ARGV[6], owner=ARGV[5], fence=tonumber(ARGV[1]), ra=0, pv=__PV__}))
    return 1
  end
  return 0
end
if sp[1] ~= ARGV[1] or sp[2] ~= ARGV[5] then
  -- The spend a grace retry retries (or the record that retry's abort restored) ended
  -- without effect, says its own spender: the retry is a first spend after all.
  if ARGV[2] ~= 'aborted' or ARGV[1] == '0' then return 0 end
  if sp[7] ~= ARGV[5] then
    -- Not a record standing for ours: the store forgot ours (an eviction, a restart) and
    -- another spend began since. Keep the abort as when no record is left, so that a veto
    -- standing for our spend alone is refused; no notice, the record is another spend's.
    local mark = ARGV[5] .. '|' .. ARGV[1] .. '|' .. ARGV[6]
    if ARGV[6] ~= '' and not aborted_recently(KEYS[2], KEYS[3], mark, false) then
      remember_abort(KEYS[2], KEYS[3], mark)
    end
    return 0
  end
  -- a veto that names fence 0 stands for every spend of that owner's (known from a notice)
  if sp[8] ~= ARGV[1] and not (sp[9] == 'vetoed' and sp[8] == '0') then return 0 end
  local notify = false
  if sp[6] and (sp[9] == 'announced' or sp[9] == 'sent') then
    redis.call('HDEL', KEYS[1], 'orig_sent_at', 'orig_owner', 'orig_fence')
    redis.call('HSET', KEYS[1], 'retries', 0)
    notify = sp[9] == 'announced'
  elseif not sp[6] and (sp[9] == 'unknown' or sp[9] == 'vetoed') and sp[1] == '0' then
    redis.call('DEL', KEYS[1])
    notify = true
  end
  if notify then
    redis.call('PUBLISH', ARGV[3], cjson.encode({app=ARGV[4], kind='abort',
      lineage=tonumber(sp[4]), gen=tonumber(sp[5]), rfp=sp[3], owner=ARGV[5], ra=0,
      pv=__PV__}))
  end
  return 0
end
if ARGV[2] == 'aborted' then
  if sp[6] then
    -- an aborted grace retry: the spend it retried is still unknown, restore its record
    redis.call('HSET', KEYS[1], 'fence', 0, 'state', 'unknown', 'retries', 1, 'sent_at', sp[6])
    redis.call('HDEL', KEYS[1], 'orig_sent_at')
  else
    redis.call('DEL', KEYS[1])
    remember_abort(KEYS[2], KEYS[3], sp[2] .. '|' .. sp[1] .. '|' .. sp[3])
  end
  -- an aborted retry names the spend it retried (its record restored): `ro`, `rf`
  redis.call('PUBLISH', ARGV[3], cjson.encode({app=ARGV[4], kind='abort',
    lineage=tonumber(sp[4]), gen=tonumber(sp[5]), rfp=sp[3], owner=sp[2],
    ra=sp[6] and 1 or 0, ro=sp[6] and sp[7] or nil,
    rf=sp[6] and tonumber(sp[8] or '0') or nil, pv=__PV__}))
else
  redis.call('HSET', KEYS[1], 'state', 'unknown')
end
return 1
"""
)
# Moves the set a release before the client binding stored under the app's bare name to the
# bound name, once (issue 20, M6). Only while no replica of that release holds the bare name's
# lease or has a spend of it on the wire (the move would lose that spend's commit). The bare
# name keeps a tombstone one generation up that no key opens (`moved`): the older release
# reads it as a newer set it cannot read, and so never spends the moved refresh token again.
# KEYS: bare token, bare lease, bare spend, bound token. ARGV: bare version as read, lineage,
# gen, access fp, blob (bound AAD), channel, bound name, blob in base64
_MOVE_LEGACY = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 'exists' end
local cur = redis.call('HMGET', KEYS[1], 'version', 'moved')
if cur[1] ~= ARGV[1] or cur[2] then return 'changed' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'busy' end
local state = redis.call('HGET', KEYS[3], 'state')
if state and state ~= 'announced' then return 'busy' end
redis.call('HSET', KEYS[4], 'version', 1, 'lineage', ARGV[2], 'gen', ARGV[3], 'fp', ARGV[4],
  'fence', 0, 'blob', ARGV[5], 'pv', __PV__)
redis.call('HSET', KEYS[1], 'version', tonumber(ARGV[1]) + 1, 'gen', tonumber(ARGV[3]) + 1,
  'fp', '', 'blob', 'moved', 'moved', ARGV[7])
redis.call('PUBLISH', ARGV[6], cjson.encode({app=ARGV[7], kind='token', version=1,
  lineage=tonumber(ARGV[2]), gen=tonumber(ARGV[3]), blob=ARGV[8], pv=__PV__}))
return 'moved'
"""

# KEYS: token. ARGV: lineage, gen, access fp, expiry in ms (fleet time = this server's clock),
# channel, app, owner. Lowers the stored set's expiry without touching its blob
# (`lower_expiry`): only while the stored set is that rank and access token, and only below a
# bound already kept; a bound kept is published (a LOWERED notice naming the set and its
# owner), so the set's holders take it at once. The bound names the version it was written
# for: a commit by a release before the field leaves it in the hash, where it must not cut the
# life of the newer set (a read applies it only to that version).
_LOWER_EXPIRY = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'lineage', 'gen', 'fp', 'expires_by',
  'expires_by_version')
if not cur[1] or tonumber(cur[2] or '0') ~= tonumber(ARGV[1])
  or tonumber(cur[3] or '0') ~= tonumber(ARGV[2]) or cur[4] ~= ARGV[3] then
  return 0
end
if cur[5] and cur[6] == cur[1] and tonumber(cur[5]) <= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], 'expires_by', ARGV[4], 'expires_by_version', cur[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({app=ARGV[6], kind='lowered',
  lineage=tonumber(ARGV[1]), gen=tonumber(ARGV[2]), afp=ARGV[3], owner=ARGV[7], pv=__PV__}))
return 1
"""

# KEYS: token, refused. ARGV: access fp, interval ms, channel, app. A compare-and-set on the
# stored set's `fp`: a refusal of an access token that is no longer stored purges nothing. The
# refused key (the fingerprint, lapsing after the interval) limits purges to one per interval.
_REFUSE = """
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then return 'stale' end
local held = redis.call('GET', KEYS[2])
if held then
  if held == ARGV[1] then return 'already' end
  return 'limited'
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({app=ARGV[4], kind='refused', afp=ARGV[1],
  pv=__PV__}))
return 'recorded'
"""


def _bounded(token: TokenSet, fields: dict[bytes, bytes]) -> TokenSet:
    """`token` with the bound a replica kept beside it (`lower_expiry`) applied: the earlier
    expiry wins. A bound written for another version of the hash (left by a commit of a
    release before the field) is not this set's and is ignored."""
    bound = fields.get(b"expires_by")
    if bound is None or fields.get(b"expires_by_version") != fields.get(b"version"):
        return token
    try:
        expires_at = int(bound) / 1000
    except ValueError:
        return token  # (damaged: the set's own expiry, as before the bound existed)
    if expires_at >= token.expires_at:
        return token
    return token.expiring_at(expires_at)


def _versioned(script: str) -> str:
    """A script with this release's protocol version in what it writes and publishes."""
    return script.replace("__PV__", str(PROTOCOL_VERSION)).replace(
        "__ABORTS_KEPT__", str(ABORTS_KEPT)
    )


def _lease_value(owner: str, fence: int) -> str:
    """The lease's value while `owner` holds it under `fence` (with our protocol version)."""
    return f"{owner}|{fence}|{PROTOCOL_VERSION}"


# ---- the fleet's clock, backoff and budget ---------------------------------------------------
# KEYS[1] routes the call (Cluster); the server's clock as {seconds, microseconds}
_TIME = """
local t = redis.call('TIME')
return {t[1], t[2]}
"""
# KEYS[1] failure key; ARGV: blob, not_before in ms (fleet time = this server's clock),
# retention in ms. The key lapses `retention` after not_before, measured on the server's clock.
_RECORD_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = tonumber(ARGV[2]) - now
if wait < 0 then wait = 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', math.floor(wait + tonumber(ARGV[3])))
return 1
"""
# KEYS[1] budget sorted set; ARGV: now in ms, window in ms, limit, a unique member.
# Returns {1, 0} when counted, {0, ms until the oldest counted request leaves the window}.
_TAKE_BUDGET = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return {0, wait}
"""


class RedisStore:
    """Implements TokenStore on Redis (standalone, TLS, Sentinel or Cluster clients alike)."""

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str,
        keyring: Keyring,
        metrics: Metrics,
        clock: Clock,
        pubsub_client: Any | None = None,
        require_replica_ack: bool = False,
        replica_ack_timeout: float = 0.5,
    ) -> None:
        self._client = client
        self._require_ack = require_replica_ack
        self._ack_timeout_ms = max(1, int(replica_ack_timeout * 1000))
        self._pubsub_client = pubsub_client if pubsub_client is not None else client
        self._prefix = key_prefix
        self._keyring = keyring
        self._metrics = metrics
        self._clock = clock
        self._commit = client.register_script(_versioned(_COMMIT))
        self._acquire = client.register_script(_versioned(_ACQUIRE))
        self._release = client.register_script(_versioned(_RELEASE))
        self._begin_spend = client.register_script(_versioned(_BEGIN_SPEND))
        self._mark_sent = client.register_script(_versioned(_MARK_SENT))
        self._veto_spend = client.register_script(_versioned(_VETO_SPEND))
        self._end_spend = client.register_script(_versioned(_END_SPEND))
        self._time = client.register_script(_TIME)
        self._record_failure = client.register_script(_RECORD_FAILURE)
        self._take_budget = client.register_script(_TAKE_BUDGET)
        self._move_legacy = client.register_script(_versioned(_MOVE_LEGACY))
        self._refuse = client.register_script(_versioned(_REFUSE))
        self._lower_expiry = client.register_script(_versioned(_LOWER_EXPIRY))
        self.channel = f"{key_prefix}:updates"

    def token_key(self, app: str) -> str:
        """The Redis key of an app's token set."""
        return f"{self._prefix}:{{{app}}}:token"

    def lease_key(self, app: str) -> str:
        """The Redis key of an app's refresh lease."""
        return f"{self._prefix}:{{{app}}}:lease"

    def fence_key(self, app: str) -> str:
        """The Redis key of an app's fence counter."""
        return f"{self._prefix}:{{{app}}}:fence"

    def spend_key(self, app: str) -> str:
        """The Redis key of an app's spend record."""
        return f"{self._prefix}:{{{app}}}:spend"

    def aborted_key(self, app: str) -> str:
        """The Redis key of an app's last spend its spender ended as aborted ("owner|fence|rfp",
        a day): a veto standing for that spend alone is refused (its abort notice was missed)."""
        return f"{self._prefix}:{{{app}}}:aborted"

    def aborts_key(self, app: str) -> str:
        """The Redis key of an app's recent aborted spends (a list of "owner|fence|rfp", the
        newest first, at most ABORTS_KEPT, for a day). `aborted_key` holds the last one only,
        which later aborts overwrite: a replica cut off when an earlier one was announced
        (the old primary of a split brain) vetoed for it after the heal, for good (issue 20,
        swarm seed 30624). Both are written: a replica of the release before reads the last."""
        return f"{self._prefix}:{{{app}}}:aborts"

    def refused_key(self, app: str) -> str:
        """The Redis key of an app's last refused access token (lapsing after the interval)."""
        return f"{self._prefix}:{{{app}}}:refused"

    def failure_key(self, app: str) -> str:
        """The Redis key of an app's shared failure record."""
        return f"{self._prefix}:{{{app}}}:failure"

    def budget_key(self, app: str) -> str:
        """The Redis key of an app's request budget window."""
        return f"{self._prefix}:{{{app}}}:budget"

    @property
    def clock_key(self) -> str:
        """The key that routes the fleet's clock reading (never written)."""
        return f"{self._prefix}:{{_clock}}"

    def _aad(self, app: str) -> bytes:
        return f"{self._prefix}:{app}".encode()

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can turn a cancellation into a timeout error; the cancellation wins,
                # or a cancelled loop would carry on as if the store were merely down.
                raise asyncio.CancelledError from exc
            self._metrics.store_errors.labels(operation=operation).inc()
            self._metrics.store_up.set(0)
            # redis-py's message names host:port and the reason; a Sentinel error appends a
            # client repr, cut off here. redis-py never puts the password in these messages.
            reason = str(exc).split(" : <", 1)[0][:200]
            raise StoreUnavailable(
                f"redis {operation} failed: {type(exc).__name__}: {reason}"
            ) from None
        self._metrics.store_up.set(1)
        return result

    async def load(self, app: str) -> TokenSet | None:
        """The stored token set, or None; UnreadableTokenSet when no configured key opens it.

        Nothing under a bound name (`app@binding`) but a set under the bare app name, stored
        by a release before the client binding: that set is moved here (`_move_legacy_set`).
        """
        fields = await self._call("load", lambda: self._client.hgetall(self.token_key(app)))
        if not fields and "@" in app:
            return await self._move_legacy_set(app)
        return self._decode(app, fields)

    async def _move_legacy_set(self, app: str) -> TokenSet | None:
        """Move the set stored under the bare app name to the bound name `app`, once.

        A set under the bare name carries no binding: it is the app's set as the release before
        the binding used it, and moving it is what lets an upgrade keep an authorization-code
        grant. Raises UnreadableTokenSet (so the app waits, and asks no one to authorize) while
        a replica of the older release holds the bare name's lease or has its spend on the
        wire; the next look tries again.
        """
        bare = app.partition("@")[0]
        fields = await self._call("load", lambda: self._client.hgetall(self.token_key(bare)))
        if not fields or b"moved" in fields:
            return None
        try:
            token = self._decode(bare, fields)
        except UnreadableTokenSet:
            return None  # not readable here, so not ours to move: the binding starts afresh
        if token is None:
            return None
        blob = self._keyring.encrypt(_plaintext(token), self._aad(app))
        answer = await self._call(
            "save",
            lambda: self._move_legacy(
                keys=[
                    self.token_key(bare),
                    self.lease_key(bare),
                    self.spend_key(bare),
                    self.token_key(app),
                ],
                args=[
                    fields[b"version"],
                    token.lineage,
                    token.generation,
                    token.fingerprint,
                    blob,
                    self.channel,
                    app,
                    base64.b64encode(blob).decode(),
                ],
            ),
        )
        outcome = answer.decode() if isinstance(answer, bytes) else str(answer)
        if outcome == "moved":
            log.info("store.moved_unbound_set", app=bare, generation=token.generation)
            return replace(token, version=1, protocol=PROTOCOL_VERSION)
        if outcome == "exists":
            fields = await self._call("load", lambda: self._client.hgetall(self.token_key(app)))
            return self._decode(app, fields)
        raise UnreadableTokenSet(
            f"the set of {bare} stored by a release before the client binding is being spent "
            "by a replica of that release; it moves to this binding once that spend ends",
            rank=token.rank,
            version=0,
        )

    async def load_many(self, apps: Sequence[str]) -> dict[str, TokenSet]:
        """HGETALL of every app in one pipeline (redis-py splits it per node on a Cluster)."""

        async def fetch_all() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for app in apps:
                pipe.hgetall(self.token_key(app))
            return list(await pipe.execute())

        replies = await self._call("load", fetch_all) if apps else []
        found: dict[str, TokenSet] = {}
        for app, fields in zip(apps, replies, strict=True):
            try:
                token = self._decode(app, fields)
            except UnreadableTokenSet:
                continue
            if token is not None:
                found[app] = token
        return found

    def _open_set(
        self, app: str, blob: bytes, version: int, rank: tuple[int, int], protocol: int
    ) -> TokenSet:
        """Decrypt and parse a stored set (UndecryptableToken, KeyError, ValueError, TypeError).

        The AAD is the prefix and the name the set is stored under, which for a bound name
        includes the client binding: a set moved to another app or binding does not open.
        """
        data = json.loads(self._keyring.decrypt(blob, self._aad(app)))
        return TokenSet(
            access_token=data["access_token"],
            token_type=data["token_type"],
            issued_at=float(data["issued_at"]),
            expires_at=float(data["expires_at"]),
            scope=data.get("scope"),
            refresh_token=data.get("refresh_token"),
            version=version,
            lineage=int(data.get("lineage", rank[0])),
            generation=int(data.get("generation", rank[1])),
            protocol=protocol,
            dpop_jkt=data.get("jkt"),
        )

    def _decode(self, app: str, fields: dict[bytes, bytes]) -> TokenSet | None:
        """A token set from its hash, or None for an empty one; UnreadableTokenSet otherwise."""
        if not fields:
            return None
        try:
            version = int(fields[b"version"])
            rank = (int(fields.get(b"lineage", 0)), int(fields.get(b"gen", 0)))
            # A hash without a protocol version was stored by a release that spoke version 1.
            protocol = int(fields.get(b"pv", 1))
        except (KeyError, ValueError):
            log.warning("store.unreadable", app=app)
            raise UnreadableTokenSet(
                f"stored set of {app} is damaged", rank=(0, 0), version=0
            ) from None
        try:
            return _bounded(self._open_set(app, fields[b"blob"], version, rank, protocol), fields)
        except UndecryptableToken as exc:
            log.warning("store.undecryptable", app=app, reason=str(exc))
            raise UnreadableTokenSet(
                f"stored set of {app} is unreadable here: {exc}", rank=rank, version=version
            ) from None
        except (KeyError, ValueError, TypeError):
            log.warning("store.unreadable", app=app)
            raise UnreadableTokenSet(
                f"stored set of {app} is damaged", rank=rank, version=version
            ) from None

    async def commit(self, app: str, token: TokenSet, *, fence: int = 0) -> Commit:
        """Store `token` if it outranks the stored set (Lua), then publish a notice."""
        blob = self._keyring.encrypt(_plaintext(token), self._aad(app))
        keys = [self.token_key(app), self.spend_key(app)]
        args: list[Any] = [
            token.lineage,
            token.generation,
            token.fingerprint,
            blob,
            fence,
            self.channel,
            app,
            base64.b64encode(blob).decode(),
        ]
        if not self._require_ack:
            result = await self._call("save", lambda: self._commit(keys=keys, args=args))
            stored, version, lineage, generation = (int(x) for x in result)
            return Commit(bool(stored), version, (lineage, generation))
        # With require_replica_ack, WAIT after it as after mark_sent: a commit only the primary
        # holds is lost by a failover, and its writer may have exited (issue 20, seed 21255).
        result, acks = await self._call(
            "save", lambda: self._script_then_wait(_versioned(_COMMIT), keys, args)
        )
        stored, version, lineage, generation = (int(x) for x in result)
        return Commit(bool(stored), version, (lineage, generation), durable=acks >= 1)

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease:
        """Take the lease (and the next fence) unless another owner holds it; announce a grant."""
        ms = max(1, int(ttl * 1000))
        fence, pttl, protocol = await self._call(
            "lease",
            lambda: self._acquire(
                keys=[self.lease_key(app), self.fence_key(app)],
                args=[owner, ms, self.channel, app],
            ),
        )
        return Lease(int(fence), busy_for=max(0.0, int(pttl) / 1000), protocol=int(protocol))

    async def release_lease(self, app: str, owner: str, fence: int) -> None:
        """Delete the lease only if `owner` still holds it under `fence` (and announce that)."""
        await self._call(
            "lease",
            lambda: self._release(
                keys=[self.lease_key(app)],
                args=[_lease_value(owner, fence), self.channel, app, owner],
            ),
        )

    async def begin_spend(
        self,
        app: str,
        *,
        owner: str,
        fence: int,
        token: TokenSet,
        retry_within: float = 0.0,
        resolved_fence: int = 0,
    ) -> SpendStart:
        """Announce the spend (Lua) if the lease and the stored set allow it."""
        answer = await self._call(
            "spend",
            lambda: self._begin_spend(
                keys=[self.lease_key(app), self.token_key(app), self.spend_key(app)],
                args=[
                    _lease_value(owner, fence),
                    fence,
                    owner,
                    token.lineage,
                    token.generation,
                    token.refresh_fingerprint or "",
                    int(retry_within * 1000),
                    resolved_fence,
                    self.channel,
                    app,
                ],
            ),
        )
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        return SpendStart(text)

    async def mark_sent(self, app: str, *, owner: str, fence: int) -> bool:
        """Mark our announced spend sent (Lua), if the lease and the record are still ours.

        With `require_replica_ack`, WAIT for one replica after it, on the same connection;
        NotDurable when none acknowledged within the timeout (the caller does not send).
        """
        keys = [self.lease_key(app), self.spend_key(app)]
        args: list[Any] = [_lease_value(owner, fence), fence, self.channel, app, owner]
        if not self._require_ack:
            result = await self._call("spend", lambda: self._mark_sent(keys=keys, args=args))
            return bool(result)
        marked, acks = await self._call(
            "spend", lambda: self._script_then_wait(_versioned(_MARK_SENT), keys, args)
        )
        if not marked:
            return False
        if acks < 1:
            raise NotDurable(
                f"no replica acknowledged the spend record within {self._ack_timeout_ms} ms "
                "(WAIT answered 0)"
            )
        return True

    async def _script_then_wait(
        self, source: str, keys: list[str], args: list[Any]
    ) -> tuple[Any, int]:
        """A script (mark_sent, commit, end_spend), then `WAIT 1 <timeout>`, pipelined on one
        connection: the script's answer and the number of replicas that acknowledged.

        WAIT counts the replicas that acknowledged the writes of the connection it runs on, so
        it must follow the write on that connection: a pipeline on the primary, or on a Cluster
        the connection of the node that owns the app's slot (the cluster client would send a
        keyless WAIT to every primary, each on a connection of its own). The script goes as
        EVAL, not EVALSHA: a node that never loaded it needs no second round trip. The wait is
        bounded by WAIT's timeout on the server and by the socket timeout on the client.
        """
        if isinstance(self._client, RedisCluster):
            cluster = self._client
            await cluster.initialize()
            node = cluster.get_node_from_key(keys[0])
            if node is None:
                raise RedisError(f"no cluster node serves the slot of {keys[0]}")
            commands = [
                PipelineCommand(0, "EVAL", source, len(keys), *keys, *args),
                PipelineCommand(1, "WAIT", 1, self._ack_timeout_ms),
            ]
            slot = (
                cluster.slot() if isinstance(cluster, BoundedCluster) else contextlib.nullcontext()
            )
            async with slot:
                await node.execute_pipeline(commands)
            results: list[Any] = []
            for command in commands:
                if isinstance(command.result, Exception):
                    raise command.result
                results.append(command.result)
        else:
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command("EVAL", source, len(keys), *keys, *args)
            pipe.execute_command("WAIT", 1, self._ack_timeout_ms)
            results = list(await pipe.execute())
        return results[0], int(results[1])

    async def load_spend(self, app: str) -> SpendRecord | None:
        """The spend record (one HMGET), or None."""
        owner, rfp, state, orig_sent_at, fence, orig_owner, orig_fence = await self._call(
            "spend",
            lambda: self._client.hmget(
                self.spend_key(app),
                "owner",
                "rfp",
                "state",
                "orig_sent_at",
                "fence",
                "orig_owner",
                "orig_fence",
            ),
        )
        if owner is None or rfp is None or state is None:
            return None
        return SpendRecord(
            _text(owner),
            _text(rfp),
            _text(state),
            orig_sent_at is not None,
            int(fence) if fence is not None else 0,
            orig_owner=_text(orig_owner) if orig_owner is not None else None,
            orig_fence=int(orig_fence) if orig_fence is not None else 0,
        )

    async def veto_spend(
        self, app: str, *, refresh_fp: str, protects: tuple[str, int] | None = None
    ) -> bool:
        """Turn an announced spend of `refresh_fp` into an unknown one while its spender holds
        the lease, naming the spend it `protects` (Lua)."""
        owner, fence = protects if protects is not None else ("", 0)
        result = await self._call(
            "spend",
            lambda: self._veto_spend(
                keys=[
                    self.spend_key(app),
                    self.lease_key(app),
                    self.aborted_key(app),
                    self.aborts_key(app),
                ],
                args=[refresh_fp, owner, fence],
            ),
        )
        return bool(result)

    async def end_spend(
        self,
        app: str,
        *,
        owner: str,
        fence: int,
        outcome: SpendEnd,
        refresh_fp: str | None = None,
    ) -> None:
        """Remove (aborted) or mark (unknown) our spend record (Lua; see SpendLedger).

        An abort that finds no record (the store forgot it) is still kept in `:aborted` and
        announced when `refresh_fp` names the token (issue 20, swarm seeds 12554, 27015).
        With `require_replica_ack`, an abort is followed by WAIT, as `mark_sent` is: an abort
        only the primary holds is lost by a failover, which brings the `sent` record back for
        good once its spender exited (issue 20, swarm seed 23291). NotDurable when no replica
        acknowledged, whatever the script found: an abort it applied (1), found applied by
        this spend (2), or nothing of this spend's (0: another spend's record). That answer is
        only as good as the node giving it: a split brain's old primary, where another spend
        began after our abort, says so too, and its heal discards both (swarm seed 25279).
        """
        keys = [self.spend_key(app), self.aborted_key(app), self.aborts_key(app)]
        args: list[Any] = [fence, outcome.value, self.channel, app, owner, refresh_fp or ""]
        if not self._require_ack or outcome is not SpendEnd.ABORTED:
            await self._call("spend", lambda: self._end_spend(keys=keys, args=args))
            return
        _, acks = await self._call(
            "spend", lambda: self._script_then_wait(_versioned(_END_SPEND), keys, args)
        )
        if acks < 1:
            raise NotDurable(
                f"no replica acknowledged the abort within {self._ack_timeout_ms} ms "
                "(WAIT answered 0)"
            )

    async def refuse_token(self, app: str, access_fp: str, *, interval: float) -> Refusal:
        """Record a refusal of the stored set's access token, in one script (the CAS)."""
        answer = await self._call(
            "refuse",
            lambda: self._refuse(
                keys=[self.token_key(app), self.refused_key(app)],
                args=[access_fp, max(1, int(interval * 1000)), self.channel, app],
            ),
        )
        return Refusal(_text(answer))

    async def lower_expiry(
        self, app: str, token: TokenSet, expires_at: float, *, owner: str | None = None
    ) -> bool:
        """Keep `expires_at` beside the stored set as the bound of its expiry, in one script
        (conditional on its rank and access token; never above a bound already kept)."""
        if expires_at >= token.expires_at:
            return False  # (the stored set is `token`'s or the script changes nothing)
        answer = await self._call(
            "save",
            lambda: self._lower_expiry(
                keys=[self.token_key(app)],
                args=[
                    token.lineage,
                    token.generation,
                    token.fingerprint,
                    math.floor(expires_at * 1000),
                    self.channel,
                    app,
                    owner or "",
                ],
            ),
        )
        return bool(int(answer))

    async def updates(self) -> AsyncIterator[Notice]:
        """Notices published by any replica's writes; raises StoreUnavailable on disconnect."""
        pubsub = self._pubsub_client.pubsub()
        try:
            await self._call("subscribe", lambda: pubsub.subscribe(self.channel))
            while True:
                message = await self._call(
                    "subscribe",
                    lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0),
                )
                if message is None or message.get("type") != "message":
                    continue
                data = message.get("data")
                text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
                notice = Notice.decode(text)
                if notice is not None:
                    yield self._open_notice(notice)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def heartbeat(self) -> None:
        """PUBLISH a heartbeat notice on the channel (a Cluster carries it to every node)."""
        payload = Notice(app="", kind=HEARTBEAT).encode()
        await self._call("heartbeat", lambda: self._client.publish(self.channel, payload))

    def _open_notice(self, notice: Notice) -> Notice:
        """A "token" notice with the set it carries opened (`token`), when this replica can.

        Quietly None otherwise (a key this replica lacks, a damaged blob, a rank that is not
        the notice's): the replica then reads the store, which logs what it finds.
        """
        if notice.kind != "token" or notice.blob is None:
            return notice
        token: TokenSet | None
        try:
            blob = base64.b64decode(notice.blob, validate=True)
            token = self._open_set(notice.app, blob, notice.version, notice.rank, notice.protocol)
        except (UndecryptableToken, KeyError, ValueError, TypeError, binascii.Error):
            token = None
        if token is not None and token.rank != notice.rank:
            token = None
        return replace(notice, blob=None, token=token)

    # ---- one clock, one backoff and one budget for the fleet ------------------------------

    async def server_time(self) -> float:
        """The server's `TIME`, in seconds."""
        if not isinstance(self._client, RedisCluster):
            # One server answers every command: a plain TIME is one command, the script two
            # (EVALSHA and its TIME), and the fleet clock sends 4 per replica every 30 s.
            return await self.read_time()
        seconds, micros = await self._call(
            "time", lambda: self._time(keys=[self.clock_key], args=[])
        )
        return int(seconds) + int(micros) / 1_000_000

    async def record_failure(
        self, app: str, *, failures: int, not_before: float, error: str, permanent: bool
    ) -> None:
        """SET the encrypted record, lapsing FAILURE_RETENTION after `not_before`."""
        if not math.isfinite(not_before):
            raise ValueError("not_before must be a finite time")
        plain = json.dumps(
            {
                "failures": failures,
                "not_before": not_before,
                "error": error,
                "permanent": permanent,
            }
        ).encode()
        blob = self._keyring.encrypt(plain, self._failure_aad(app))
        args = [blob, int(not_before * 1000), int(FAILURE_RETENTION * 1000)]
        await self._call(
            "failure", lambda: self._record_failure(keys=[self.failure_key(app)], args=args)
        )

    async def load_failure(self, app: str) -> FailureRecord | None:
        """The record, or None (none, lapsed, or written under an unknown key)."""
        blob = await self._call("failure", lambda: self._client.get(self.failure_key(app)))
        if blob is None:
            return None
        try:
            data = json.loads(self._keyring.decrypt(blob, self._failure_aad(app)))
            return FailureRecord(
                failures=int(data["failures"]),
                not_before=float(data["not_before"]),
                error=str(data["error"]),
                permanent=bool(data["permanent"]),
            )
        except UndecryptableToken as exc:
            log.warning("store.undecryptable", app=app, record="failure", reason=str(exc))
            return None
        except (KeyError, ValueError, TypeError):
            log.warning("store.unreadable", app=app, record="failure")
            return None

    async def clear_failure(self, app: str) -> None:
        """DEL the record."""
        await self._call("failure", lambda: self._client.delete(self.failure_key(app)))

    async def take_budget(self, app: str, limit_per_minute: int, now: float) -> tuple[bool, float]:
        """A sliding window in a sorted set of request times (milliseconds of fleet time)."""
        if limit_per_minute < 1:
            raise ValueError("limit_per_minute must be at least 1")
        now_ms = int(now * 1000)
        args = [
            now_ms,
            int(BUDGET_WINDOW * 1000),
            limit_per_minute,
            f"{now_ms}-{secrets.token_hex(6)}",
        ]
        allowed, wait_ms = await self._call(
            "budget", lambda: self._take_budget(keys=[self.budget_key(app)], args=args)
        )
        return bool(int(allowed)), int(wait_ms) / 1000

    def _failure_aad(self, app: str) -> bytes:
        return f"{self._prefix}:{app}:failure".encode()

    # ---- status: read commands only (a read-only replica, an ACL user with +@read) ---------

    async def read_time(self) -> float:
        """The server's clock from `TIME` (a read command; on a Cluster `server_time` runs a script)."""
        seconds, micros = await self._call("time", self._client.time)
        return int(seconds) + int(micros) / 1_000_000

    async def inspect(self, name: str, now: float) -> StoredFacts:
        """Every key of the store name `name` in one pipeline of read commands.

        HGETALL, GET, PTTL and ZCOUNT only: it runs against a replica. The set is decrypted
        for its times alone, and the failure record for its fields; neither token leaves here.
        """

        async def read_all() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(self.token_key(name))
            pipe.get(self.lease_key(name))
            pipe.pttl(self.lease_key(name))
            pipe.get(self.fence_key(name))
            pipe.hgetall(self.spend_key(name))
            pipe.get(self.failure_key(name))
            window_start = int((now - BUDGET_WINDOW) * 1000)
            pipe.zcount(self.budget_key(name), f"({window_start}", "+inf")
            return list(await pipe.execute())

        token, lease, pttl, fence, spend, failure, budget = await self._call("inspect", read_all)
        record, failure_unreadable = self._inspect_failure(name, failure)
        return StoredFacts(
            name=name,
            now=now,
            token=self._inspect_set(name, token),
            lease=_inspect_lease(lease, int(pttl)),
            fence=_int(fence),
            spend=_inspect_spend(spend),
            failure=record,
            failure_unreadable=failure_unreadable,
            budget_used=int(budget),
        )

    def _inspect_set(self, name: str, fields: dict[bytes, bytes]) -> StoredSet | None:
        """A stored set's rank and times (None for none); its tokens are dropped here."""
        if not fields:
            return None
        version = _int(fields.get(b"version"))
        rank = (_int(fields.get(b"lineage")), _int(fields.get(b"gen")))
        protocol = _int(fields.get(b"pv"), 1)
        moved = fields.get(b"moved")
        if moved is not None:
            return StoredSet(version, rank, protocol, None, None, moved_to=moved.decode())
        try:
            token = _bounded(self._open_set(name, fields[b"blob"], version, rank, protocol), fields)
        except (UndecryptableToken, KeyError, ValueError, TypeError):
            return StoredSet(version, rank, protocol, None, None)
        return StoredSet(
            version,
            rank,
            protocol,
            token.expires_at,
            token.issued_at,
            jitter=fleet_jitter_sample(token),
        )

    def _inspect_failure(self, name: str, blob: bytes | None) -> tuple[FailureRecord | None, bool]:
        """The shared failure record, and whether one is stored that no key here opens."""
        if blob is None:
            return None, False
        try:
            data = json.loads(self._keyring.decrypt(blob, self._failure_aad(name)))
            record = FailureRecord(
                failures=int(data["failures"]),
                not_before=float(data["not_before"]),
                error=str(data["error"]),
                permanent=bool(data["permanent"]),
            )
        except (UndecryptableToken, KeyError, ValueError, TypeError):
            return None, True
        return record, False

    async def check_eviction_policy(self) -> str | None:
        """Warn (`store.eviction_policy`) unless Redis says `maxmemory-policy noeviction`.

        Any other policy lets Redis drop the fleet's keys under memory pressure: an evicted
        spend record or lease lets a refresh token be presented twice, an evicted set is a store
        that forgot (docs/operations.md). A Redis that refuses `CONFIG` (managed services
        disable or rename it, an ACL may deny it) is logged as not checked. Returns the policy,
        or None when it could not be read.
        """
        try:
            answer = await self._client.config_get("maxmemory-policy")
        except (RedisError, OSError) as exc:
            log.info(
                "store.eviction_policy_unchecked",
                reason=f"{type(exc).__name__}: {str(exc).split(' : <', 1)[0][:200]}",
                expected=NO_EVICTION,
            )
            return None
        policy = _config_value(answer, "maxmemory-policy")
        if policy is None:
            log.info("store.eviction_policy_unchecked", reason="no answer", expected=NO_EVICTION)
        elif policy != NO_EVICTION:
            log.warning(
                "store.eviction_policy",
                policy=policy,
                expected=NO_EVICTION,
                reason="Redis may evict the fleet's keys under memory pressure (a spend record, "
                "a lease, a token set); set maxmemory-policy noeviction",
            )
        return policy

    async def ping(self) -> None:
        """PING, or StoreUnavailable."""
        await self._call("ping", self._client.ping)

    async def close(self) -> None:
        """Close the connection pools."""
        for client in {
            id(self._client): self._client,
            id(self._pubsub_client): self._pubsub_client,
        }.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


def _plaintext(token: TokenSet) -> bytes:
    """What the encrypted blob of a stored set holds."""
    return json.dumps(
        {
            "access_token": token.access_token,
            "token_type": token.token_type,
            "issued_at": token.issued_at,
            "expires_at": token.expires_at,
            "scope": token.scope,
            "refresh_token": token.refresh_token,
            "lineage": token.lineage,
            "generation": token.generation,
            # A DPoP-bound set's key thumbprint; a release before DPoP ignores it.
            **({"jkt": token.dpop_jkt} if token.dpop_jkt is not None else {}),
        }
    ).encode()


def _int(value: bytes | str | None, default: int = 0) -> int:
    """A stored integer field, `default` when absent or damaged (status shows what it can)."""
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _inspect_lease(value: bytes | None, pttl_ms: int) -> StoredLease | None:
    """The lease's `owner|fence|protocol` value, with its time to live (None: no TTL)."""
    if value is None:
        return None
    owner, _, rest = value.decode(errors="replace").partition("|")
    fence, _, protocol = rest.partition("|")
    return StoredLease(
        owner=owner,
        fence=_int(fence),
        protocol=_int(protocol or None, 1),
        expires_in=pttl_ms / 1000 if pttl_ms >= 0 else None,
    )


def _inspect_spend(fields: dict[bytes, bytes]) -> StoredSpend | None:
    """The spend record without its refresh-token fingerprint (`rfp` is not read)."""
    if not fields:
        return None
    sent_at = fields.get(b"sent_at")
    return StoredSpend(
        state=fields.get(b"state", b"").decode(errors="replace"),
        owner=fields.get(b"owner", b"").decode(errors="replace"),
        fence=_int(fields.get(b"fence")),
        rank=(_int(fields.get(b"lineage")), _int(fields.get(b"gen"))),
        retries=_int(fields.get(b"retries")),
        sent_at=_int(sent_at) / 1000 if sent_at is not None else None,
    )


def _text(value: bytes | str) -> str:
    """A reply field as text (the client may or may not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value


def _config_value(answer: object, name: str) -> str | None:
    """One setting from a `CONFIG GET` answer (a mapping, keys and values as bytes or str)."""
    if not isinstance(answer, dict):
        return None
    for key, value in answer.items():
        text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        if text == name:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def redis_client(
    url: str,
    *,
    socket_timeout: float = 1.0,
    password: str | None = None,
    client_name: str | None = None,
) -> Any:
    """A redis-py asyncio client for redis://, rediss://, redis+sentinel:// or redis+cluster://.

    However many apps the broker serves, it opens at most MAX_COMMAND_CONNECTIONS connections
    for commands plus one for pub/sub (per node on a Cluster); a command that finds them all busy
    waits for one (up to POOL_WAIT_TIMEOUT) instead of failing as if the store were down. Every
    connection, a Sentinel's included, has TCP keepalive (`keepalive_options`, redis_pool.py).
    """
    scheme = url.partition("://")[0]
    name = client_name if client_name is not None else default_client_name()
    keepalive: dict[str, Any] = {
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
    }
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": 15,
        "client_name": name,
        **keepalive,
    }
    if password is not None:
        common["password"] = password
    if scheme in ("redis", "rediss"):
        pool = WaitingPool.from_url(
            url,
            max_connections=MAX_COMMAND_CONNECTIONS + 1,  # + the pub/sub subscription
            timeout=POOL_WAIT_TIMEOUT,
            retry_on_timeout=False,
            **common,
        )
        return aioredis.Redis.from_pool(pool)
    if scheme == "redis+cluster":
        parsed = _multi_host_url(url)
        return bounded_cluster(
            parsed.hosts,
            username=parsed.username,
            password=password or parsed.password,
            ssl=parsed.tls,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            client_name=name,
            **keepalive,
        )
    if scheme == "redis+sentinel":
        parsed = _multi_host_url(url)
        sentinel = Sentinel(
            parsed.hosts,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            username=parsed.username,
            password=password or parsed.password,
            ssl=parsed.tls,
            db=parsed.db,
            **keepalive,  # the master's connections, and (socket_* options) the sentinels'
        )
        if not parsed.service:
            raise ValueError("redis+sentinel:// needs the master's service name as the path")
        return sentinel.master_for(
            parsed.service,
            connection_pool_class=WaitingSentinelPool,
            max_connections=MAX_COMMAND_CONNECTIONS + 1,
            timeout=POOL_WAIT_TIMEOUT,
            client_name=name,
        )
    raise ValueError(f"unsupported store scheme {scheme}")


class _MultiHostURL:
    def __init__(self) -> None:
        self.hosts: list[tuple[str, int]] = []
        self.username: str | None = None
        self.password: str | None = None
        self.service = ""
        self.db = 0
        self.tls = False


def _multi_host_url(url: str) -> _MultiHostURL:
    """Parse `scheme://[user:pass@]h1:p1,h2:p2[/service[/db]][?tls=true]`."""
    from urllib.parse import parse_qs, unquote

    parsed = _MultiHostURL()
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    parsed.tls = parse_qs(query).get("tls", ["false"])[0].lower() in ("1", "true", "yes")
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        parsed.username = unquote(user) or None
        parsed.password = unquote(password) or None
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":")
        parsed.hosts.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
    segments = [s for s in path.split("/") if s]
    if segments:
        parsed.service = segments[0]
    if len(segments) > 1:
        parsed.db = int(segments[1])
    return parsed
