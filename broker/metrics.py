"""Every metric of the contract, registered on an injected CollectorRegistry.

Kept small per app, because a broker may serve a thousand apps: no `_created` series (nothing
reads them), and one app-state series per app (its current state) rather than one per possible
state, most of them always zero. The families with a series per app in steady state are
broker/exposition.py's, which keep each series' text and render only what changed, so a scrape
at a thousand apps takes a few milliseconds and runs on the event loop (`Metrics.render`). The
broker-wide families, and the per-app ones that get a series only on a rare event (budget
refusals, unknown grant outcomes), stay prometheus-client's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

from broker import __version__, exposition
from broker.exposition import format_value, label_text
from broker.model import AppState

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_PROXY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REFRESH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _OwnFamily(Protocol):
    """A family that writes its own exposition text."""

    def exposition(self) -> bytes:
        """The family's text."""
        ...


_Own = TypeVar("_Own", bound=_OwnFamily)
_Library = TypeVar("_Library", Counter, Gauge, Histogram)


class Metrics:
    """The broker's metrics. Labels only ever carry configured names and fixed vocabularies."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Process-wide in prometheus-client: a `_created` series per counter and histogram child
        # would double the counters' series, and Prometheus does not need them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        self._app_states: dict[str, AppState] = {}
        # The families Metrics.render writes itself, and prometheus-client's (rendered by it).
        self._own: list[_OwnFamily] = []
        self._library: list[Counter | Gauge | Histogram] = []
        self.refresh_total = self._counter(
            "token_broker_refresh_total", "Token refreshes by outcome.", ["app", "outcome"]
        )
        # One histogram for the broker: per app it was 12 of the 19 series an app cost a scrape.
        self.refresh_duration = self._add(
            Histogram(
                "token_broker_refresh_duration_seconds",
                "Time spent getting a new token (all apps).",
                buckets=_REFRESH_BUCKETS,
                registry=self.registry,
            )
        )
        self.token_expiry = self._gauge(
            "token_broker_token_expiry_timestamp_seconds",
            "Unix time at which the app's current token expires.",
            ["app"],
        )
        # cert-manager's certificate_renewal_timestamp_seconds and certificate_ready_status,
        # per app: the refresher sets the first when it plans or starts an attempt; readiness
        # changes with time alone (a token ages into its margin), so it is read at each scrape.
        self.next_refresh = self._gauge(
            "token_broker_next_refresh_timestamp_seconds",
            "Unix time of this replica's next refresh attempt for the app (of the attempt in "
            "flight: when it started; no series while none is planned: the app waits for "
            "token-broker authorize).",
            ["app"],
        )
        self.app_ready = self._gauge(
            "token_broker_app_ready",
            "1 while this replica has a servable token for the app (what /readyz/{app} "
            "answers), else 0.",
            ["app"],
        )
        self._readiness: Callable[[], Iterable[tuple[str, bool]]] | None = None
        self._ready_series: dict[str, exposition.GaugeSeries] = {}
        self.refresh_failures_consecutive = NonZeroGauge(
            self._gauge(
                "token_broker_refresh_failures_consecutive",
                "Refresh failures since the last success (no series while there are none).",
                ["app"],
            )
        )
        self.token_endpoint_responses = self._counter(
            "token_broker_token_endpoint_responses_total",
            "Token endpoint responses by HTTP status (or 'error' when none came).",
            ["app", "status"],
        )
        self.requests = RequestMetrics()
        self.registry.register(self.requests)
        self._own.append(self.requests)
        self.store_up = self._add(
            Gauge(
                "token_broker_store_up",
                "1 when the shared store answers, else 0.",
                registry=self.registry,
            )
        )
        self.store_errors = self._add(
            Counter(
                "token_broker_store_errors_total",
                "Failed store operations.",
                ["operation"],
                registry=self.registry,
            )
        )
        self.credential_reloads = self._counter(
            "token_broker_credential_reloads_total",
            "Credential file reloads and fallbacks by outcome.",
            ["app", "outcome"],
        )
        self.app_state = self._gauge(
            "token_broker_app_state",
            "1, labelled with the app's current state (the only series of the app).",
            ["app", "state"],
        )
        self.lease_total = self._counter(
            "token_broker_lease_total", "Refresh lease attempts by outcome.", ["app", "outcome"]
        )
        self.proxy_requests_total = self._counter(
            "token_broker_proxy_requests_total",
            "Requests through the injecting proxy by the status answered to the caller.",
            ["app", "status"],
        )
        self.proxy_duration = self._own_family(
            exposition.Histogram(
                "token_broker_proxy_duration_seconds",
                "Time from a proxied request's arrival to the end of its answer.",
                ["app"],
                buckets=_PROXY_BUCKETS,
            )
        )
        self.proxy_retries_total = self._counter(
            "token_broker_proxy_retries_total",
            "Upstream 401s: retried after a refresh (unauthorized) or passed back, and why.",
            ["app", "reason"],
        )
        self.proxy_egress_refused_total = self._counter(
            "token_broker_proxy_egress_refused_total",
            "Proxied requests refused because the upstream's address is loopback, link-local, "
            "private or reserved and not in allowed_networks.",
            ["app", "reason"],
        )
        self.token_refused_total = self._counter(
            "token_broker_token_refused_total",
            "Access tokens an upstream refused (refresh_on_status), by the store's answer: "
            "recorded (a fleet-wide purge), already, stale, limited; unrecorded: store down.",
            ["app", "outcome"],
        )
        # DPoP (broker/dpop.py): a series per app and use once the app proves anything.
        self.dpop_proofs = self._counter(
            "token_broker_dpop_proofs_total",
            "DPoP proofs signed, by use: token_request, proxy, proof_api.",
            ["app", "use"],
        )
        self.sink_writes = self._counter(
            "token_broker_sink_writes_total",
            "Token file writes by outcome (written, truncated, error), one per file.",
            ["app", "outcome"],
        )
        self.refresh_blocked = self._gauge(
            "token_broker_refresh_blocked",
            "1 while refreshing the app is blocked because the store cannot confirm a lease.",
            ["app"],
        )
        # Per app, but a series only after a rare event: prometheus-client's are cheap enough.
        self.budget_refusals = self._add(
            Counter(
                "token_broker_refresh_budget_refusals_total",
                "Refreshes held back by the app's fleet-wide max_token_requests_per_minute.",
                ["app"],
                registry=self.registry,
            )
        )
        self.grant_outcome_unknown = self._add(
            Counter(
                "token_broker_grant_outcome_unknown_total",
                "Refresh-token spends whose outcome is unknown (the grant may be lost).",
                ["app"],
                registry=self.registry,
            )
        )
        self.dpop_nonce_retries = self._add(
            Counter(
                "token_broker_dpop_nonce_retries_total",
                "Requests sent again with the nonce a server's use_dpop_nonce challenge gave, "
                "by server: authorization_server, resource_server.",
                ["app", "server"],
                registry=self.registry,
            )
        )
        self.dpop_unbound_tokens = self._add(
            Counter(
                "token_broker_dpop_unbound_tokens_total",
                "Token answers of type Bearer to a DPoP request: the server did not bind them.",
                ["app"],
                registry=self.registry,
            )
        )
        self.build_info = self._add(
            Gauge(
                "token_broker_build_info",
                "Always 1; the version is in the label.",
                ["version"],
                registry=self.registry,
            )
        )
        self.build_info.labels(version=__version__).set(1)

        # ---- the fleet's clock (broker/fleetclock.py) ----------------------------------------
        self.clock_offset = self._add(
            Gauge(
                "token_broker_clock_offset_seconds",
                "The shared store's clock minus this host's wall clock (0 for memory:// or "
                "before the first measurement).",
                registry=self.registry,
            )
        )
        self.clock_offset_measured = self._add(
            Gauge(
                "token_broker_clock_offset_measured",
                "1 once the offset to the shared store's clock has been measured (always for "
                "memory://); 0 while this pod keeps time on its own clock alone.",
                registry=self.registry,
            )
        )
        self.clock_offset_age = self._add(
            Gauge(
                "token_broker_clock_offset_age_seconds",
                "Seconds since the clock offset was last measured (since start while it never "
                "was).",
                registry=self.registry,
            )
        )

    def _add(self, metric: _Library) -> _Library:
        """Remember a prometheus-client metric (already registered) for Metrics.render."""
        self._library.append(metric)
        return metric

    def _own_family(self, family: _Own) -> _Own:
        """Register one of our own families."""
        self.registry.register(family)  # type: ignore[arg-type]
        self._own.append(family)
        return family

    def _counter(self, name: str, documentation: str, labels: list[str]) -> exposition.Counter:
        return self._own_family(exposition.Counter(name, documentation, labels))

    def _gauge(self, name: str, documentation: str, labels: list[str]) -> exposition.Gauge:
        return self._own_family(exposition.Gauge(name, documentation, labels))

    def render(self) -> bytes:
        """The exposition text of every family, for /metrics (run it on the event loop)."""
        self._read_apps()
        parts = [generate_latest(_Collectors(self._library))]
        parts.extend(family.exposition() for family in self._own)
        return b"".join(parts)

    def set_app_state(self, app: str, state: AppState) -> None:
        """The app's state series: `state` at 1; the series of its previous state is removed."""
        previous = self._app_states.get(app)
        if previous is state:
            return
        if previous is not None:
            _remove(self.app_state, app, previous.value)
        self.app_state.labels(app, state.value).set(1)
        self._app_states[app] = state

    def track_clock(
        self, offset: Callable[[], float], age: Callable[[], float], measured: Callable[[], bool]
    ) -> None:
        """Read the fleet clock's offset, its age and whether it was measured at every scrape."""
        self.clock_offset.set_function(offset)
        self.clock_offset_age.set_function(age)
        self.clock_offset_measured.set_function(lambda: 1.0 if measured() else 0.0)

    def track_readiness(self, readiness: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        """Read `(app, ready)` of every app at every scrape (token_broker_app_ready)."""
        self._readiness = readiness

    def _read_apps(self) -> None:
        if self._readiness is None:
            return
        series = self._ready_series
        for app, ready in self._readiness():
            gauge = series.get(app)
            if gauge is None:
                gauge = series[app] = self.app_ready.labels(app)
            gauge.set(1.0 if ready else 0.0)

    def set_next_refresh(self, app: str, at: float | None) -> None:
        """The app's next refresh attempt (wall time), or no series while none is planned."""
        if at is None:
            _remove(self.next_refresh, app)
        else:
            # To the millisecond: the store's clocks resolve no finer.
            self.next_refresh.labels(app).set(round(at, 3))

    def forget_apps(self, apps: Iterable[str]) -> None:
        """Drop the per-app series of removed apps."""
        for app in apps:
            previous = self._app_states.pop(app, None)
            if previous is not None:
                _remove(self.app_state, app, previous.value)
            _remove(self.token_expiry, app)
            _remove(self.next_refresh, app)
            _remove(self.app_ready, app)
            self._ready_series.pop(app, None)
            self.refresh_failures_consecutive.labels(app=app).set(0)
            _remove(self.refresh_blocked, app)


class _Collectors:
    """Several collectors seen as one, for prometheus-client's generate_latest."""

    def __init__(self, collectors: list[Counter | Gauge | Histogram]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        """Every collector's families, in order."""
        for collector in self._collectors:
            yield from collector.collect()


class NonZeroGauge:
    """A labelled gauge whose series exists only while its value is not zero.

    `token_broker_refresh_failures_consecutive` is 0 for every healthy app; a thousand
    always-zero series told a scrape nothing that their absence does not (`max by (app) (...)
    >= 3` alerts the same).
    """

    def __init__(self, gauge: exposition.Gauge) -> None:
        self._gauge = gauge

    def labels(self, **labels: str) -> _NonZeroChild:
        """The series for `labels` (created on its first non-zero value)."""
        return _NonZeroChild(self._gauge, tuple(labels[name] for name in self._gauge.labelnames))


class _NonZeroChild:
    """One series of a NonZeroGauge."""

    def __init__(self, gauge: exposition.Gauge, values: tuple[str, ...]) -> None:
        self._gauge = gauge
        self._values = values

    def set(self, value: float) -> None:
        """Set the series, or remove it for 0."""
        if value:
            self._gauge.labels(*self._values).set(value)
        else:
            _remove(self._gauge, *self._values)


def _remove(metric: exposition.Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class RequestMetrics:
    """`token_broker_requests_total` and `token_broker_request_duration_seconds`, without locks.

    Every API request is counted, and prometheus-client's children take a lock per increment
    and per histogram observation (about 0.7 µs a request, a tenth of the whole handler). Here
    a request costs two dict lookups and a few additions, all on the event loop's thread, which
    also renders them; a series' line is formatted again only after its count changed.
    """

    _COUNTER = "token_broker_requests"
    _COUNTER_HELP = "Local API requests."

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str, int], int] = {}
        # Per counted series: its line prefix, then the count its cached line shows.
        self._prefixes: dict[tuple[str, str, str, int], bytes] = {}
        self._lines: dict[tuple[str, str, str, int], tuple[int, bytes]] = {}
        self._header = (
            f"# HELP {self._COUNTER}_total {self._COUNTER_HELP}\n"
            f"# TYPE {self._COUNTER}_total counter\n"
        ).encode()
        self.duration = exposition.Histogram(
            "token_broker_request_duration_seconds",
            "Local API request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
        )
        self._routes: dict[str, exposition.HistogramSeries] = {}

    def observe(self, route: str, app: str, client: str, status: int, seconds: float) -> None:
        """Count one request, labelled with configured names only, and its duration."""
        key = (route, app, client, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        series = self._routes.get(route)
        if series is None:
            series = self.route_series(route)
        series.observe(seconds)

    def route_series(self, route: str) -> exposition.HistogramSeries:
        """The duration series of `route`."""
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = self.duration.labels(route)
        return series

    def _line(self, key: tuple[str, str, str, int], count: int) -> bytes:
        cached = self._lines.get(key)
        if cached is not None and cached[0] == count:
            return cached[1]
        prefix = self._prefixes.get(key)
        if prefix is None:
            route, app, client, status = key
            labels = [("route", route), ("app", app), ("client", client), ("status", str(status))]
            prefix = self._prefixes[key] = f"{self._COUNTER}_total{label_text(labels)} ".encode()
        line = prefix + format_value(count) + b"\n"
        self._lines[key] = (count, line)
        return line

    def exposition(self) -> bytes:
        """Both families' text."""
        lines = [self._line(key, count) for key, count in self._counts.items()]
        return self._header + b"".join(lines) + self.duration.exposition()

    def collect(self) -> Iterator[Metric]:
        """The two families, as prometheus-client's Counter and Histogram would expose them."""
        requests = CounterMetricFamily(
            self._COUNTER, self._COUNTER_HELP, labels=["route", "app", "client", "status"]
        )
        for (route, app, client, status), count in self._counts.items():
            requests.add_metric([route, app, client, str(status)], count)
        yield requests
        yield from self.duration.collect()


class ProxyTally:
    """A proxied request's four series, counted in one call, for one app, client and status.

    `token_broker_requests_total` and `token_broker_request_duration_seconds` of the proxy
    route, `token_broker_proxy_requests_total` and `token_broker_proxy_duration_seconds` of
    the app: the proxy listener's fast path keeps one tally per label set, so that a request
    costs no label lookups (the series are found once, here), and each family shows what
    counting the request one family at a time would have shown.
    """

    __slots__ = ("_count", "_counts", "_duration", "_key", "_route")

    def __init__(self, metrics: Metrics, route: str, app: str, client: str, status: int) -> None:
        requests = metrics.requests
        self._counts = requests._counts
        self._key = (route, app, client, status)
        self._route = requests.route_series(route)
        self._duration = metrics.proxy_duration.labels(app)
        self._count = metrics.proxy_requests_total.labels(app, str(status))

    def add(self, seconds: float) -> None:
        """Count one request that took `seconds`."""
        counts, key = self._counts, self._key
        counts[key] = counts.get(key, 0) + 1
        self._route.observe(seconds)
        self._duration.observe(seconds)
        self._count.inc()
