"""The metrics a scrape renders: few series per app, and the contract's names and labels."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker import exposition as families
from broker.metrics import Metrics
from broker.model import AppState


def exposition(metrics: Metrics) -> str:
    """The text a scrape gets."""
    return metrics.render().decode()


def parsed(
    text: str,
) -> dict[str, tuple[str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]:
    """Each family of an exposition text: its type, help and sorted samples."""
    return {
        family.name: (
            family.type,
            family.documentation,
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples),
        )
        for family in text_string_to_metric_families(text)
    }


def busy_metrics() -> Metrics:
    """Metrics with a series in every family, some of them changed after a first render."""
    metrics = Metrics()
    for app in ("a", 'b\\q"uote'):
        metrics.refresh_total.labels(app=app, outcome="success").inc()
        metrics.token_expiry.labels(app=app).set(1_763_850_000.5)
        metrics.refresh_failures_consecutive.labels(app=app).set(2)
        metrics.token_endpoint_responses.labels(app=app, status="200").inc(3)
        metrics.credential_reloads.labels(app=app, outcome="reloaded").inc()
        metrics.set_app_state(app, AppState.FRESH)
        metrics.lease_total.labels(app=app, outcome="acquired").inc()
        metrics.proxy_requests_total.labels(app, "200").inc()
        metrics.proxy_duration.labels(app).observe(0.02)
        metrics.proxy_retries_total.labels(app, "unauthorized").inc()
        metrics.sink_writes.labels(app=app, outcome="written").inc()
        metrics.refresh_blocked.labels(app=app).set(0)
        metrics.budget_refusals.labels(app=app).inc()
        metrics.grant_outcome_unknown.labels(app=app).inc()
        metrics.next_refresh.labels(app).set(1_763_849_000.25)
        metrics.app_ready.labels(app).set(1)
        metrics.requests.observe("/v1/token/{app}", app, "svc", 200, 0.0004)
    metrics.store_errors.labels(operation="load").inc()
    metrics.refresh_duration.observe(0.3)
    metrics.render()
    metrics.token_expiry.labels(app="a").set(1_763_853_600.0)
    metrics.proxy_duration.labels("a").observe(7.0)
    metrics.requests.observe("/v1/token/{app}", "a", "svc", 200, 2.0)
    metrics.set_app_state("a", AppState.REFRESHING)
    return metrics


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


class TestSchedule:
    """token_broker_next_refresh_timestamp_seconds (set by the refresher) and
    token_broker_app_ready (read from the apps at each scrape)."""

    def test_readiness_is_read_at_each_scrape(self) -> None:
        """Each scrape asks the apps whether they are ready: 1 or 0, as they say now."""
        metrics = Metrics()
        readiness = [("a", True), ("b", False)]
        metrics.track_readiness(lambda: readiness)
        assert sorted(series(metrics, "token_broker_app_ready")) == [
            'token_broker_app_ready{app="a"} 1.0',
            'token_broker_app_ready{app="b"} 0.0',
        ]
        readiness[:] = [("a", False), ("b", True)]
        assert sorted(series(metrics, "token_broker_app_ready")) == [
            'token_broker_app_ready{app="a"} 0.0',
            'token_broker_app_ready{app="b"} 1.0',
        ]

    def test_next_refresh_to_the_millisecond_and_none_removes_it(self) -> None:
        """The next attempt's time is kept to the millisecond; None (nothing planned) is no
        series."""
        metrics = Metrics()
        metrics.set_next_refresh("a", 1_763_849_000.12345)
        assert series(metrics, "token_broker_next_refresh_timestamp_seconds") == [
            'token_broker_next_refresh_timestamp_seconds{app="a"} 1.763849000123e+09'
        ]
        metrics.set_next_refresh("a", None)
        assert series(metrics, "token_broker_next_refresh_timestamp_seconds") == []

    def test_forgotten_app_has_neither(self) -> None:
        """A removed app's ready and next-refresh series are gone, and stay gone."""
        metrics = Metrics()
        apps = [("a", True)]
        metrics.track_readiness(lambda: apps)
        metrics.set_next_refresh("a", 1.0)
        metrics.render()
        apps.clear()
        metrics.forget_apps(["a"])
        assert 'app="a"' not in exposition(metrics)
        apps.append(("a", False))  # added again: a new series, not the forgotten one
        assert series(metrics, "token_broker_app_ready") == ['token_broker_app_ready{app="a"} 0.0']


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


class TestOwnExposition:
    """Metrics.render writes the same families and samples prometheus-client would."""

    def test_same_as_prometheus_client(self) -> None:
        """Every family's type, help and samples equal generate_latest's, after changes too."""
        metrics = busy_metrics()
        ours = parsed(exposition(metrics))
        theirs = parsed(generate_latest(metrics.registry).decode())
        assert ours == theirs
        # next_refresh, app_ready (24), token_refused, egress_refused (22), the three DPoP (23)
        assert len(ours) == 30

    def test_sample_lines_are_written_as_prometheus_client_writes_them(self) -> None:
        """Label order, escaping and value formatting match line for line."""
        metrics = busy_metrics()
        ours = sorted(line for line in exposition(metrics).splitlines() if line)
        theirs = sorted(
            line for line in generate_latest(metrics.registry).decode().splitlines() if line
        )
        assert ours == theirs

    def test_a_changed_value_is_rendered_again(self) -> None:
        """A series' cached line follows every change of its value."""
        metrics = Metrics()
        counter = metrics.refresh_total.labels(app="a", outcome="success")
        for expected in ("1.0", "2.0", "3.0"):
            counter.inc()
            assert series(metrics, "token_broker_refresh_total") == [
                f'token_broker_refresh_total{{app="a",outcome="success"}} {expected}'
            ]

    def test_requests_counter_follows_its_count(self) -> None:
        """The request counter's cached line shows the newest count."""
        metrics = Metrics()
        for count in (1, 2):
            metrics.requests.observe("/v1/apps", "", "svc", 200, 0.001)
            assert series(metrics, "token_broker_requests_total") == [
                'token_broker_requests_total{app="",client="svc",route="/v1/apps",status="200"} '
                f"{count}.0"
            ]


class TestFamilies:
    """The families of broker/exposition.py refuse what prometheus-client refuses."""

    def test_wrong_label_names(self) -> None:
        """Labels by a name the family does not have, or too few values, are a ValueError."""
        counter = families.Counter("x_total", "X.", ["app"])
        with pytest.raises(ValueError, match="app"):
            counter.labels(application="a")
        with pytest.raises(ValueError, match="app"):
            counter.labels()

    def test_counter_only_goes_up(self) -> None:
        """A negative increment is a ValueError and changes nothing."""
        series_ = families.Counter("x", "X.", ["app"]).labels("a")
        with pytest.raises(ValueError, match="up"):
            series_.inc(-1)
        assert series_.get() == 0.0
