"""The fleet protocol: how the replicas of a fleet share one app's token set through the store.

Its promises (docs/architecture.md lists them as invariants, and tests/simulation checks them
under faults):

- A refresh token is presented only by the replica holding the app's lease, after recording
  the spend in the store under its fence, and only while its lease outlasts the request. With
  the store unreachable or its set unreadable, a refresh-token grant is not spent at all.
- A spend whose outcome is unknown (the reply was lost after sending) is never repeated,
  except once inside a server's declared reuse grace window.
- "Newer" is the set's rank (lineage, generation), never its expiry; a replica only ever
  presents the refresh token of the newest set it knows, and writes that set back when the
  store holds an older one (an empty restart, a failover that lost writes, a restore).

Client-credentials apps spend nothing: they use the lease to avoid duplicate requests, and
refresh alone when the store is down.

The package knows the store's role protocols, not redis-py: `outcomes` holds what one refresh
attempt ends with, `memory` what a replica remembers of spends (SpendMemory), `protocol` the
sequence (FleetProtocol).
"""

from broker.fleet.memory import MAX_REMEMBERED_ABORTS, SpendMemory
from broker.fleet.outcomes import (
    Adopted,
    Blocked,
    Busy,
    Deferred,
    Fetched,
    NoGrant,
    Outcome,
    OutcomeUnknown,
    OverBudget,
    ReuseDetected,
)
from broker.fleet.protocol import Fetch, FleetProtocol, FleetStore, KnownSet, Timing, _RecordGone

__all__ = [
    "MAX_REMEMBERED_ABORTS",
    "Adopted",
    "Blocked",
    "Busy",
    "Deferred",
    "Fetch",
    "Fetched",
    "FleetProtocol",
    "FleetStore",
    "KnownSet",
    "NoGrant",
    "Outcome",
    "OutcomeUnknown",
    "OverBudget",
    "ReuseDetected",
    "SpendMemory",
    "Timing",
    "_RecordGone",
]
