"""A TokenStore that notes the fleet protocol's steps as events of the current span.

Installed around the real store only when traces are on, so the fleet protocol and the
refresher stay as they are: the lease (acquired or busy, and for how long), the spend record's
states (announced, sent, aborted, unknown), the commit and the shared backoff show up in the
refresh span that is current when they happen. Events carry states and numbers, never a token,
a fingerprint or an owner's secret.
"""

from __future__ import annotations

from typing import Any

from broker import tracing
from broker.model import FailureRecord, TokenSet
from broker.store import Commit, Lease, Refusal, SpendEnd, SpendStart, TokenStore


class TracedStore:
    """Delegates every call to `inner`; the protocol's decisive calls also add span events."""

    def __init__(self, inner: TokenStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease:
        """The lease, noted as `lease.acquired` (with its fence) or `lease.busy` (and for how long)."""
        lease = await self.inner.acquire_lease(app, owner, ttl)
        if lease.held:
            tracing.event("lease.acquired", fence=lease.fence, ttl_s=round(ttl, 3))
        else:
            tracing.event("lease.busy", busy_for_s=round(lease.busy_for, 3))
        return lease

    async def refuse_token(self, app: str, access_fp: str, *, interval: float) -> Refusal:
        """The refusal of an access token, noted as `token.refused` with the store's answer."""
        answer = await self.inner.refuse_token(app, access_fp, interval=interval)
        tracing.event("token.refused", answer=answer.value)
        return answer

    async def begin_spend(self, app: str, **spend: Any) -> SpendStart:
        """Announce a spend (TokenStore.begin_spend's arguments, passed on as they are); noted
        as `spend.announced` with the store's answer."""
        start = await self.inner.begin_spend(app, **spend)
        token: TokenSet = spend["token"]
        tracing.event("spend.announced", answer=str(start), generation=token.generation)
        return start

    async def mark_sent(self, app: str, *, owner: str, fence: int) -> bool:
        """Mark the spend sent; noted as `spend.sent` (or `spend.lost_lease`)."""
        sent = await self.inner.mark_sent(app, owner=owner, fence=fence)
        tracing.event("spend.sent" if sent else "spend.lost_lease", fence=fence)
        return sent

    async def end_spend(
        self,
        app: str,
        *,
        owner: str,
        fence: int,
        outcome: SpendEnd,
        refresh_fp: str | None = None,
    ) -> None:
        """End a spend; noted as `spend.aborted` or `spend.unknown`."""
        await self.inner.end_spend(
            app, owner=owner, fence=fence, outcome=outcome, refresh_fp=refresh_fp
        )
        tracing.event(f"spend.{outcome}", fence=fence)

    async def commit(self, app: str, token: TokenSet, *, fence: int = 0) -> Commit:
        """Write a set; noted as `store.commit` (stored or not, and the rank)."""
        commit = await self.inner.commit(app, token, fence=fence)
        tracing.event(
            "store.commit",
            stored=commit.stored,
            lineage=token.lineage,
            generation=token.generation,
        )
        return commit

    async def record_failure(
        self, app: str, *, failures: int, not_before: float, error: str, permanent: bool
    ) -> None:
        """Share a failure; noted as `backoff.shared` (count, until when, permanent or not)."""
        await self.inner.record_failure(
            app, failures=failures, not_before=not_before, error=error, permanent=permanent
        )
        tracing.event(
            "backoff.shared",
            failures=failures,
            not_before=round(not_before, 3),
            permanent=permanent,
        )

    async def load_failure(self, app: str) -> FailureRecord | None:
        """The shared failure; noted as `backoff.found` when the fleet is backing off."""
        record = await self.inner.load_failure(app)
        if record is not None:
            tracing.event(
                "backoff.found",
                failures=record.failures,
                not_before=round(record.not_before, 3),
                permanent=record.permanent,
            )
        return record
