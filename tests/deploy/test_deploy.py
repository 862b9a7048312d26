"""Offline checks of the image, the manifests, the Helm chart, the alerts and the dashboard.

Run with `python -m pytest -m deploy tests/deploy` (needs the `deploy` extra and promtool).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"
CHART = ROOT / "helm" / "token-broker"
RULES = ROOT / "deploy" / "prometheus" / "token-broker-rules.yaml"
KUBERNETES_VERSION = "1.34.0"
# Custom resources of the Prometheus operator: not in kubernetes-validate's schemas, checked
# structurally below instead.
CRD_KINDS = {"PodMonitor", "PrometheusRule"}


def tool(name: str) -> str:
    """The path of a command-line tool; fails (never skips) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed: see README (deployment checks)"
    return found


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict on every built-in resource in `docs`."""
    plain = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert plain
    path = tmp_path / f"manifests-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump_all(plain))
    out = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def render_chart(values: dict[str, Any] | None = None) -> dict[str, str]:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    rendered: dict[str, str] = chart.render(values or {}, name="demo", namespace="shop")
    return rendered


def chart_docs(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's rendered manifests (NOTES.txt left out)."""
    rendered = render_chart(values)
    return [d for name, text in rendered.items() if name.endswith(".yaml") for d in documents(text)]


def drain_bound() -> float:
    """The longest the broker's shutdown on SIGTERM takes (broker/app.py `shutdown`).

    API requests and a refresh in flight drain side by side, then the loops stop, the metrics
    listener closes (1 s) and the store and the HTTP session close.
    """
    from broker.app import CLOSE_TIMEOUT, REFRESH_DRAIN, SHUTDOWN_GRACE

    return max(SHUTDOWN_GRACE, REFRESH_DRAIN) + CLOSE_TIMEOUT + 1.0 + 2 * CLOSE_TIMEOUT


def redis_command(docs: list[dict[str, Any]]) -> str:
    """The shell command of the Redis StatefulSet's container, checked to write to its PVC."""
    redis = next(d for d in docs if d["kind"] == "StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert data["name"] in claims
    assert "--dir /data" in container["command"][-1]
    return str(container["command"][-1])


def contract_metrics() -> set[str]:
    text = (ROOT / "docs" / "contract.md").read_text()
    return set(re.findall(r"\| `(token_broker_[a-z_]+)` \|", text))


class TestImage:
    def test_hadolint_is_clean(self) -> None:
        """The Dockerfile passes hadolint."""
        out = subprocess.run(
            [tool("hadolint"), str(ROOT / "Dockerfile")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def test_runs_as_a_fixed_non_root_user_with_serve_as_entrypoint(self) -> None:
        """USER is a fixed non-root UID; the entrypoint is token-broker serve."""
        text = (ROOT / "Dockerfile").read_text()
        assert "USER 65532:65532" in text
        assert 'ENTRYPOINT ["token-broker"]' in text
        assert 'CMD ["serve"' in text
        assert re.search(r"FROM python:\d+\.\d+\.\d+-slim", text)


class TestPlainManifests:
    def test_every_manifest_validates(self, tmp_path: Path) -> None:
        """Every file of the kustomize base validates against Kubernetes' schemas (strict)."""
        kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
        docs = [d for f in kustomization["resources"] for d in documents((BASE / f).read_text())]
        validate(docs, tmp_path)
        assert {d["kind"] for d in docs} >= {
            "Deployment",
            "ConfigMap",
            "Secret",
            "StatefulSet",
            "NetworkPolicy",
            "PodMonitor",
            "PrometheusRule",
        }

    def test_overlay_renders_and_validates(self, tmp_path: Path) -> None:
        """The example overlay, merged onto the base, validates; its config passes check-config.

        No kustomize binary is available offline, so the overlay's strategic-merge patches
        (plain maps here) are applied by `overlay_docs`.
        """
        docs = overlay_docs(ROOT / "deploy" / "overlays" / "example")
        validate(docs, tmp_path)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert deployment["spec"]["replicas"] == 3
        assert all(d["metadata"]["namespace"] == "shop" for d in docs)
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        secrets = [d for d in docs if d["kind"] == "Secret"]
        config = materialize(
            configmap["data"]["config.yaml"],
            secrets,
            pod_mounts(deployment["spec"]["template"]["spec"]),
            tmp_path / "root",
        )
        out = check_config(config)
        assert out.returncode == 0, out.stderr

    def test_sidecar_is_native_and_locked_down(self) -> None:
        """Init container with restartPolicy Always, startup probe on /readyz, security context."""
        deployment = documents((BASE / "deployment.yaml").read_text())[0]
        check_pod(deployment["spec"]["template"]["spec"])

    def test_termination_grace_covers_the_drain(self) -> None:
        """terminationGracePeriodSeconds outlasts the broker's longest drain on SIGTERM."""
        deployment = documents((BASE / "deployment.yaml").read_text())[0]
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= (
            drain_bound()
        )

    def test_redis_keeps_an_fsynced_append_only_file(self) -> None:
        """The bundled Redis writes an append-only file, fsynced every second, on its PVC."""
        command = redis_command(documents((BASE / "redis.yaml").read_text()))
        assert "--appendonly yes --appendfsync everysec" in command

    def test_prometheus_rule_equals_the_plain_rules_file(self) -> None:
        """The PrometheusRule carries exactly the groups of the plain rules file."""
        rule = documents((BASE / "prometheusrule.yaml").read_text())[0]
        assert rule["spec"] == yaml.safe_load(RULES.read_text())


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base.get(key), value)
        return merged
    return patch


def overlay_docs(overlay: Path) -> list[dict[str, Any]]:
    """The overlay's resources with its namespace, image tags and map patches applied."""
    k = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in k["resources"]:
        base_dir = (overlay / resource).resolve()
        base = yaml.safe_load((base_dir / "kustomization.yaml").read_text())
        docs += [d for f in base["resources"] for d in documents((base_dir / f).read_text())]
    for entry in k.get("patches", []):
        patch = yaml.safe_load((overlay / entry["path"]).read_text())
        for i, doc in enumerate(docs):
            if (doc["kind"], doc["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"]):
                docs[i] = _merge(doc, patch)
    for doc in docs:
        doc["metadata"]["namespace"] = k["namespace"]
    text = yaml.safe_dump_all(docs)
    for image in k.get("images", []):
        text = re.sub(
            rf"{re.escape(image['name'])}:[\w.-]+", f"{image['name']}:{image['newTag']}", text
        )
    return [d for d in yaml.safe_load_all(text) if d]


def check_pod(pod: dict[str, Any]) -> None:
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "token-broker")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["resources"]["limits"]["memory"]
    for container in [*pod["initContainers"], *pod["containers"]]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"


class TestChart:
    def test_lint_strict_is_clean(self) -> None:
        """helm lint --strict finds no warning or error."""
        import helm_python as helm

        report = helm.lint(str(CHART), strict=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []

    @pytest.mark.parametrize("values_file", [None, "ci/example-values.yaml"])
    def test_renders_and_validates(self, tmp_path: Path, values_file: str | None) -> None:
        """Default and example values render to manifests that validate (strict)."""
        values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
        rendered = render_chart(values)
        docs = [
            d for name, text in rendered.items() if name.endswith(".yaml") for d in documents(text)
        ]
        validate(docs, tmp_path)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        check_pod(deployment["spec"]["template"]["spec"])
        rule = next(d for d in docs if d["kind"] == "PrometheusRule")
        assert rule["spec"] == yaml.safe_load(RULES.read_text())
        assert "NOTES.txt" in " ".join(rendered)

    def test_schema_rejects_bad_values(self) -> None:
        """values.schema.json refuses an unknown top-level key."""
        import helm_python as helm

        with pytest.raises(helm.HelmError):
            render_chart({"nonsense": True})

    def test_termination_grace_covers_the_drain(self) -> None:
        """The workload's grace period outlasts the drain; the schema refuses a shorter one."""
        import helm_python as helm

        docs = chart_docs()
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= (
            drain_bound()
        )
        with pytest.raises(helm.HelmError):
            render_chart({"workload": {"terminationGracePeriodSeconds": 10}})

    @pytest.mark.parametrize("fsync", ["everysec", "always"])
    def test_redis_keeps_an_fsynced_append_only_file(self, fsync: str) -> None:
        """The chart's Redis writes an append-only file on its PVC, fsynced as the values say."""
        values = None if fsync == "everysec" else {"redis": {"appendfsync": fsync}}
        docs = chart_docs(values)
        assert f"--appendonly yes --appendfsync {fsync}" in redis_command(docs)

    def test_schema_refuses_an_appendfsync_that_loses_writes(self) -> None:
        """appendfsync `no` (the kernel decides when to write) is refused."""
        import helm_python as helm

        with pytest.raises(helm.HelmError):
            render_chart({"redis": {"appendfsync": "no"}})

    def test_chart_rules_copy_equals_the_plain_rules_file(self) -> None:
        """The chart's copy of the rules is the same file."""
        assert (CHART / "files" / "token-broker-rules.yaml").read_text() == RULES.read_text()


class TestAlerts:
    def test_promtool_check_rules(self) -> None:
        """promtool accepts the rules."""
        out = subprocess.run(
            [tool("promtool"), "check", "rules", str(RULES)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def test_promtool_unit_tests(self) -> None:
        """Every alert fires (and stays quiet) as its unit test says."""
        out = subprocess.run(
            [tool("promtool"), "test", "rules", "token-broker-rules.test.yaml"],
            capture_output=True,
            text=True,
            check=False,
            cwd=RULES.parent,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def test_every_alert_has_a_runbook(self) -> None:
        """Each alert links a runbook section that exists in docs/runbooks.md."""
        runbooks = (ROOT / "docs" / "runbooks.md").read_text().lower()
        for group in yaml.safe_load(RULES.read_text())["groups"]:
            for rule in group["rules"]:
                anchor = rule["annotations"]["runbook_url"].split("#")[1]
                assert f"## {anchor}" in runbooks.replace("`", ""), anchor


class TestDashboard:
    def test_queries_only_contract_metrics(self) -> None:
        """Every metric the dashboard queries is in the contract's list."""
        dashboard = json.loads(
            (ROOT / "deploy" / "grafana" / "token-broker-dashboard.json").read_text()
        )
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        used = {
            re.sub(r"_(bucket|sum|count)$", "", m)
            for e in exprs
            for m in re.findall(r"token_broker_[a-z_]+", e)
        }
        known = contract_metrics()
        assert len(known) == 18
        assert used <= known, used - known
        assert {
            "token_broker_token_expiry_timestamp_seconds",
            "token_broker_refresh_total",
            "token_broker_requests_total",
            "token_broker_request_duration_seconds",
            "token_broker_store_up",
        } <= used


def materialize(
    config_text: str, secrets: list[dict[str, Any]], mounts: dict[str, str], root: Path
) -> Path:
    """Write the config and the Secrets' files where the manifests mount them, under `root`."""
    by_name = {s["metadata"]["name"]: s for s in secrets}
    for secret_name, mount in mounts.items():
        target = root / mount.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for key, value in by_name[secret_name]["stringData"].items():
            (target / key).write_text(str(value))
    config = root / "config.yaml"
    config.write_text(config_text.replace("/etc/token-broker/", f"{root}/etc/token-broker/"))
    return config


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def pod_mounts(pod: dict[str, Any]) -> dict[str, str]:
    """Secret name → mount path of the sidecar's secret volumes."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "token-broker")
    return {
        volumes[m["name"]]["secret"]["secretName"]: m["mountPath"]
        for m in sidecar["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }


class TestExampleConfigPassesCheckConfig:
    def test_plain_manifests(self, tmp_path: Path) -> None:
        """The ConfigMap's config passes check-config with the example Secrets mounted."""
        configmap = documents((BASE / "configmap.yaml").read_text())[0]
        secrets = documents((BASE / "secrets.yaml").read_text())
        pod = documents((BASE / "deployment.yaml").read_text())[0]["spec"]["template"]["spec"]
        config = materialize(configmap["data"]["config.yaml"], secrets, pod_mounts(pod), tmp_path)
        out = check_config(config)
        assert out.returncode == 0, out.stderr
        for secret in secrets:
            for value in secret["stringData"].values():
                assert str(value) not in out.stdout

    def test_helm_chart(self, tmp_path: Path) -> None:
        """The chart's rendered config passes check-config with its Secrets mounted."""
        docs = [
            d
            for name, text in render_chart().items()
            if name.endswith(".yaml")
            for d in documents(text)
        ]
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        secrets = [d for d in docs if d["kind"] == "Secret"]
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        config = materialize(configmap["data"]["config.yaml"], secrets, pod_mounts(pod), tmp_path)
        out = check_config(config)
        assert out.returncode == 0, out.stderr
