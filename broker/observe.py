"""The one place the core's events become metrics and audit lines (broker/events.py)."""

from __future__ import annotations

from typing import assert_never

from broker import events
from broker.logs import audit, get_logger
from broker.metrics import Metrics

# The refresher's logger: its audit lines keep the logger name they always had.
log = get_logger("broker.refresher")


class Observer:
    """An `EventHook` that counts each event on `metrics` and writes its audit line."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, event: events.Event) -> None:
        """Record `event`."""
        m = self.metrics
        match event:
            case events.Refreshed(app=app, token=token, duration=duration):
                self._attempt(app, "success", duration, failures=0)
                audit(
                    log,
                    "token.refreshed",
                    app=app,
                    token_fingerprint=token.fingerprint,
                    generation=token.generation,
                    expires_at=round(token.expires_at, 3),
                    lifetime=round(token.lifetime, 3),
                )
            case events.RefreshFailed():
                outcome = "permanent_error" if event.permanent else "transient_error"
                self._attempt(event.app, outcome, event.duration, failures=event.failures)
                audit(
                    log,
                    "token.refresh_failed",
                    level="error" if event.permanent else "warning",
                    app=event.app,
                    error=event.error,
                    permanent=event.permanent,
                    status=event.status,
                    consecutive_failures=event.failures,
                    retry_in=round(event.retry_in, 3),
                )
            case events.AnswerLost(app=app, failures=failures, duration=duration):
                self._attempt(app, "transient_error", duration, failures=failures)
            case events.GrantAtRisk(app=app, reason=reason, grace=grace):
                m.grant_outcome_unknown.labels(app=app).inc()
                audit(
                    log, "grant.outcome_unknown", level="error", app=app, reason=reason, grace=grace
                )
            case events.GrantReused(app=app, reason=reason, failures=failures, duration=duration):
                self._attempt(app, "permanent_error", duration, failures=failures)
                audit(log, "grant.reuse_detected", level="error", app=app, reason=reason)
            case events.AuthorizationNeeded(app=app, reason=reason):
                audit(log, "app.needs_authorization", level="error", app=app, reason=reason)
            case events.Blocked(app=app):
                m.refresh_blocked.labels(app=app).set(1)
            case events.Unblocked(app=app):
                m.refresh_blocked.labels(app=app).set(0)
            case events.OverBudget(app=app):
                m.budget_refusals.labels(app=app).inc()
            case events.TokenAdopted(app=app, expires_at=expires_at):
                m.token_expiry.labels(app=app).set(expires_at)
            case events.TokenRefused(app=app, outcome=outcome, fingerprint=fingerprint):
                m.token_refused_total.labels(app=app, outcome=outcome).inc()
                if outcome == "recorded":
                    audit(
                        log,
                        "token.refused",
                        level="warning",
                        app=app,
                        token_fingerprint=fingerprint,
                    )
            case events.ExpiryLowered(app=app, by=by):
                log.info("token.expiry_lowered", app=app, by=round(by, 3))
            case events.LeaseAsked(app=app, outcome=outcome):
                m.lease_total.labels(app=app, outcome=outcome).inc()
            case events.StateChanged(app=app, state=state):
                m.set_app_state(app, state)
            case events.ScheduleChanged(app=app, at=at):
                m.set_next_refresh(app, at)
            case events.StoreReachable(up=up):
                m.store_up.set(1 if up else 0)
            case events.SubscriptionStale():
                m.store_errors.labels(operation="subscribe").inc()
            case events.AppRemoved(app=app):
                m.forget_apps([app])
            case _:
                assert_never(event)

    def _attempt(self, app: str, outcome: str, duration: float, *, failures: int) -> None:
        """One refresh attempt of ours ended: its count, its duration, the failures in a row."""
        m = self.metrics
        m.refresh_total.labels(app=app, outcome=outcome).inc()
        m.refresh_duration.observe(duration)
        m.refresh_failures_consecutive.labels(app=app).set(failures)
