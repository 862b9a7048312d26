"""Every metric of the contract, registered on an injected CollectorRegistry."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker import __version__
from broker.model import AppState

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_PROXY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REFRESH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The broker's metrics. Labels only ever carry configured names and fixed vocabularies."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.refresh_total = Counter(
            "token_broker_refresh_total",
            "Token refreshes by outcome.",
            ["app", "outcome"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            "token_broker_refresh_duration_seconds",
            "Time spent getting a new token.",
            ["app"],
            buckets=_REFRESH_BUCKETS,
            registry=r,
        )
        self.token_expiry = Gauge(
            "token_broker_token_expiry_timestamp_seconds",
            "Unix time at which the app's current token expires.",
            ["app"],
            registry=r,
        )
        self.refresh_failures_consecutive = Gauge(
            "token_broker_refresh_failures_consecutive",
            "Refresh failures since the last success.",
            ["app"],
            registry=r,
        )
        self.token_endpoint_responses = Counter(
            "token_broker_token_endpoint_responses_total",
            "Token endpoint responses by HTTP status (or 'error' when none came).",
            ["app", "status"],
            registry=r,
        )
        self.requests_total = Counter(
            "token_broker_requests_total",
            "Local API requests.",
            ["route", "app", "client", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "token_broker_request_duration_seconds",
            "Local API request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_up = Gauge(
            "token_broker_store_up",
            "1 when the shared store answers, else 0.",
            registry=r,
        )
        self.store_errors = Counter(
            "token_broker_store_errors_total",
            "Failed store operations.",
            ["operation"],
            registry=r,
        )
        self.credential_reloads = Counter(
            "token_broker_credential_reloads_total",
            "Credential file reloads and fallbacks by outcome.",
            ["app", "outcome"],
            registry=r,
        )
        self.app_state = Gauge(
            "token_broker_app_state",
            "1 for the app's current state, else 0.",
            ["app", "state"],
            registry=r,
        )
        self.lease_total = Counter(
            "token_broker_lease_total",
            "Refresh lease attempts by outcome.",
            ["app", "outcome"],
            registry=r,
        )
        self.proxy_requests_total = Counter(
            "token_broker_proxy_requests_total",
            "Requests through the injecting proxy by the status answered to the caller.",
            ["app", "status"],
            registry=r,
        )
        self.proxy_duration = Histogram(
            "token_broker_proxy_duration_seconds",
            "Time from a proxied request's arrival to the end of its answer.",
            ["app"],
            buckets=_PROXY_BUCKETS,
            registry=r,
        )
        self.proxy_retries_total = Counter(
            "token_broker_proxy_retries_total",
            "Upstream 401s: retried after a refresh (unauthorized) or passed back, and why.",
            ["app", "reason"],
            registry=r,
        )
        self.sink_writes = Counter(
            "token_broker_sink_writes_total",
            "Token file writes by outcome (written, truncated, error), one per file.",
            ["app", "outcome"],
            registry=r,
        )
        self.refresh_blocked = Gauge(
            "token_broker_refresh_blocked",
            "1 while refreshing the app is blocked because the store cannot confirm a lease.",
            ["app"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "token_broker_refresh_budget_refusals_total",
            "Refreshes held back by the app's fleet-wide max_token_requests_per_minute.",
            ["app"],
            registry=r,
        )
        self.grant_outcome_unknown = Counter(
            "token_broker_grant_outcome_unknown_total",
            "Refresh-token spends whose outcome is unknown (the grant may be lost).",
            ["app"],
            registry=r,
        )
        self.build_info = Gauge(
            "token_broker_build_info",
            "Always 1; the version is in the label.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=__version__).set(1)

        # ---- the fleet's clock (broker/fleetclock.py) ----------------------------------------
        self.clock_offset = Gauge(
            "token_broker_clock_offset_seconds",
            "The shared store's clock minus this host's wall clock (0 for memory:// or before "
            "the first measurement).",
            registry=r,
        )
        self.clock_offset_age = Gauge(
            "token_broker_clock_offset_age_seconds",
            "Seconds since the clock offset was last measured (since start while it never was).",
            registry=r,
        )

    def set_app_state(self, app: str, state: AppState) -> None:
        """Set the app's state gauge: 1 for `state`, 0 for the others."""
        for candidate in AppState:
            self.app_state.labels(app=app, state=candidate.value).set(
                1 if candidate is state else 0
            )

    def track_clock(self, offset: Callable[[], float], age: Callable[[], float]) -> None:
        """Read the fleet clock's offset and its age at every scrape."""
        self.clock_offset.set_function(offset)
        self.clock_offset_age.set_function(age)

    def forget_apps(self, apps: Iterable[str]) -> None:
        """Drop the per-app series of removed apps."""
        for app in apps:
            for state in AppState:
                _remove(self.app_state, app, state.value)
            _remove(self.token_expiry, app)
            _remove(self.refresh_failures_consecutive, app)
            _remove(self.refresh_blocked, app)


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
