"""The metrics a scrape renders: few series per app, and the contract's names and labels."""

from __future__ import annotations

from prometheus_client import generate_latest

from broker.metrics import Metrics
from broker.model import AppState


def exposition(metrics: Metrics) -> str:
    """The text a scrape would get."""
    return generate_latest(metrics.registry).decode()


def series(metrics: Metrics, name: str) -> list[str]:
    """The sample lines of `name` (with labels) in the exposition."""
    return [
        line
        for line in exposition(metrics).splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]


class TestAppState:
    """token_broker_app_state: one series per app, for its current state."""

    def test_only_the_current_state(self) -> None:
        """A state change replaces the app's series; other apps keep theirs."""
        metrics = Metrics()
        metrics.set_app_state("a", AppState.REFRESHING)
        metrics.set_app_state("b", AppState.FRESH)
        metrics.set_app_state("a", AppState.FAILING)
        assert sorted(series(metrics, "token_broker_app_state")) == [
            'token_broker_app_state{app="a",state="failing"} 1.0',
            'token_broker_app_state{app="b",state="fresh"} 1.0',
        ]

    def test_forgotten_app_has_no_series(self) -> None:
        """A removed app's state and failure series are gone."""
        metrics = Metrics()
        metrics.set_app_state("a", AppState.FAILING)
        metrics.refresh_failures_consecutive.labels(app="a").set(2)
        metrics.forget_apps(["a"])
        text = exposition(metrics)
        assert 'app="a"' not in text


class TestFailuresGauge:
    """token_broker_refresh_failures_consecutive exists only while an app is failing."""

    def test_series_only_while_non_zero(self) -> None:
        """0 is no series; a failure count is; success removes it again."""
        metrics = Metrics()
        gauge = metrics.refresh_failures_consecutive
        gauge.labels(app="a").set(0)
        assert series(metrics, "token_broker_refresh_failures_consecutive") == []
        gauge.labels(app="a").set(3)
        assert series(metrics, "token_broker_refresh_failures_consecutive") == [
            'token_broker_refresh_failures_consecutive{app="a"} 3.0'
        ]
        gauge.labels(app="a").set(0)
        assert series(metrics, "token_broker_refresh_failures_consecutive") == []


class TestRefreshDuration:
    """token_broker_refresh_duration_seconds is one histogram for the broker."""

    def test_observations_of_every_app_share_one_histogram(self) -> None:
        """Two refreshes' durations land in one histogram series, with no app label."""
        metrics = Metrics()
        metrics.refresh_duration.observe(0.2)
        metrics.refresh_duration.observe(0.3)
        assert series(metrics, "token_broker_refresh_duration_seconds_count") == [
            "token_broker_refresh_duration_seconds_count 2.0"
        ]


class TestRequestMetrics:
    """Requests are counted without locks, exposed as the contract's counter and histogram."""

    def test_counter_and_histogram(self) -> None:
        """Counts per route, app, client, status; cumulative buckets whose +Inf is the count."""
        metrics = Metrics()
        for seconds in (0.0004, 0.002, 0.002, 5.0):
            metrics.requests.observe("/v1/token/{app}", "a", "svc", 200, seconds)
        metrics.requests.observe("other", "", "", 404, 0.0001)
        registry = metrics.registry
        labels = {"route": "/v1/token/{app}", "app": "a", "client": "svc", "status": "200"}
        assert registry.get_sample_value("token_broker_requests_total", labels) == 4.0
        bucket = "token_broker_request_duration_seconds_bucket"
        route = {"route": "/v1/token/{app}"}
        assert registry.get_sample_value(bucket, {**route, "le": "0.0005"}) == 1.0
        assert registry.get_sample_value(bucket, {**route, "le": "0.0025"}) == 3.0
        assert registry.get_sample_value(bucket, {**route, "le": "1.0"}) == 3.0
        assert registry.get_sample_value(bucket, {**route, "le": "+Inf"}) == 4.0
        count = registry.get_sample_value("token_broker_request_duration_seconds_count", route)
        assert count == 4.0

    def test_no_created_series(self) -> None:
        """No metric exposes a `_created` series."""
        metrics = Metrics()
        metrics.refresh_total.labels(app="a", outcome="success").inc()
        metrics.requests.observe("/v1/apps", "", "svc", 200, 0.001)
        assert "_created" not in exposition(metrics)
