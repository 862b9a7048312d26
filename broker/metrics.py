"""Every metric of the contract, registered on an injected CollectorRegistry.

Kept small per app, because a broker may serve a thousand apps and a scrape renders every series
on the event loop's process: no `_created` series (nothing reads them), and one app-state series
per app (its current state) rather than one per possible state, most of them always zero.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from broker import __version__
from broker.model import AppState

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_PROXY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The `le` labels of the latency buckets, formatted as prometheus-client formats them.
_LATENCY_LE = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*_LATENCY_BUCKETS, float("inf"))
)
_REFRESH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The broker's metrics. Labels only ever carry configured names and fixed vocabularies."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Process-wide in prometheus-client: a `_created` series per counter and histogram child
        # would double the counters' series, and Prometheus does not need them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        self._app_states: dict[str, AppState] = {}
        r = self.registry
        self.refresh_total = Counter(
            "token_broker_refresh_total",
            "Token refreshes by outcome.",
            ["app", "outcome"],
            registry=r,
        )
        # One histogram for the broker: per app it was 12 of the 19 series an app cost a scrape.
        self.refresh_duration = Histogram(
            "token_broker_refresh_duration_seconds",
            "Time spent getting a new token (all apps).",
            buckets=_REFRESH_BUCKETS,
            registry=r,
        )
        self.token_expiry = Gauge(
            "token_broker_token_expiry_timestamp_seconds",
            "Unix time at which the app's current token expires.",
            ["app"],
            registry=r,
        )
        self.refresh_failures_consecutive = NonZeroGauge(
            Gauge(
                "token_broker_refresh_failures_consecutive",
                "Refresh failures since the last success (no series while there are none).",
                ["app"],
                registry=r,
            )
        )
        self.token_endpoint_responses = Counter(
            "token_broker_token_endpoint_responses_total",
            "Token endpoint responses by HTTP status (or 'error' when none came).",
            ["app", "status"],
            registry=r,
        )
        self.requests = RequestMetrics()
        r.register(self.requests)
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
            "1, labelled with the app's current state (the only series of the app).",
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
        """The app's state series: `state` at 1; the series of its previous state is removed."""
        previous = self._app_states.get(app)
        if previous is state:
            return
        if previous is not None:
            _remove(self.app_state, app, previous.value)
        self.app_state.labels(app=app, state=state.value).set(1)
        self._app_states[app] = state

    def track_clock(self, offset: Callable[[], float], age: Callable[[], float]) -> None:
        """Read the fleet clock's offset and its age at every scrape."""
        self.clock_offset.set_function(offset)
        self.clock_offset_age.set_function(age)

    def forget_apps(self, apps: Iterable[str]) -> None:
        """Drop the per-app series of removed apps."""
        for app in apps:
            previous = self._app_states.pop(app, None)
            if previous is not None:
                _remove(self.app_state, app, previous.value)
            _remove(self.token_expiry, app)
            self.refresh_failures_consecutive.labels(app=app).set(0)
            _remove(self.refresh_blocked, app)


class NonZeroGauge:
    """A labelled gauge whose series exists only while its value is not zero.

    `token_broker_refresh_failures_consecutive` is 0 for every healthy app; a thousand
    always-zero series told a scrape nothing that their absence does not (`max by (app) (...)
    >= 3` alerts the same).
    """

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge

    def labels(self, **labels: str) -> _NonZeroChild:
        """The series for `labels` (created on its first non-zero value)."""
        return _NonZeroChild(self._gauge, tuple(labels[name] for name in self._gauge._labelnames))


class _NonZeroChild:
    """One series of a NonZeroGauge."""

    def __init__(self, gauge: Gauge, values: tuple[str, ...]) -> None:
        self._gauge = gauge
        self._values = values

    def set(self, value: float) -> None:
        """Set the series, or remove it for 0."""
        if value:
            self._gauge.labels(*self._values).set(value)
        else:
            _remove(self._gauge, *self._values)


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class RequestMetrics:
    """`token_broker_requests_total` and `token_broker_request_duration_seconds`, without locks.

    Every API request is counted, and prometheus-client's children take a lock per increment
    and per histogram observation (about 0.7 µs a request, a tenth of the whole handler). Here
    a request costs two dict lookups and a few integer additions on the event loop's thread;
    a scrape (in the render thread) copies the tables first, which CPython does atomically.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str, int], int] = {}
        # Per route: one count per bucket (non-cumulative, the last one +Inf), then the sum.
        self._durations: dict[str, list[float]] = {}

    def observe(self, route: str, app: str, client: str, status: int, seconds: float) -> None:
        """Count one request, labelled with configured names only, and its duration."""
        key = (route, app, client, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        slots = self._durations.get(route)
        if slots is None:
            slots = self._durations[route] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        slots[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        slots[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        """The two families, as prometheus-client's Counter and Histogram would expose them."""
        counts = dict(self._counts)
        durations = {route: list(slots) for route, slots in dict(self._durations).items()}
        requests = CounterMetricFamily(
            "token_broker_requests",
            "Local API requests.",
            labels=["route", "app", "client", "status"],
        )
        for (route, app, client, status), count in sorted(counts.items()):
            requests.add_metric([route, app, client, str(status)], count)
        yield requests
        duration = HistogramMetricFamily(
            "token_broker_request_duration_seconds",
            "Local API request latency.",
            labels=["route"],
        )
        for route, slots in sorted(durations.items()):
            cumulative, buckets = 0.0, []
            for le, in_bucket in zip(_LATENCY_LE, slots[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((le, cumulative))
            duration.add_metric([route], buckets, sum_value=slots[-1])
        yield duration
