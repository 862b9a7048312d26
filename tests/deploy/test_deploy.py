"""Offline checks of the image, the manifests, the Helm chart, the alerts and the dashboard.

Run with `python -m pytest -m deploy tests/deploy` (needs the `deploy` extra and promtool).
"""

from __future__ import annotations

import base64
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


# The example workload is off by default and the Prometheus operator's resources render only
# where their CRDs are known (never in an offline render) unless forced: the tests that check
# the workload's pod or the PrometheusRule turn both on.
WITH_EXAMPLE: dict[str, Any] = {
    "workload": {"enabled": True},
    "podMonitor": {"force": True},
    "prometheusRule": {"force": True},
}


def with_example(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """`values` with the example workload and the monitoring resources turned on."""
    merged: dict[str, Any] = _merge(WITH_EXAMPLE, values or {})
    return merged


def chart_docs(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's rendered manifests (NOTES.txt left out)."""
    rendered = render_chart(values)
    return [d for name, text in rendered.items() if name.endswith(".yaml") for d in documents(text)]


def chart_docs_on_cluster(values: dict[str, Any], api_versions: list[str]) -> list[dict[str, Any]]:
    """chart_docs() as `helm install` renders them on a cluster serving `api_versions` besides
    the built-in ones (`.Capabilities.APIVersions`, like `helm template --api-versions`).

    helm-python-sdk's Chart.render (0.2) does not take API versions, but its native
    helm_render reads them from the same options object (`api_versions`, Helm's
    chartutil.DefaultVersionSet plus these): the test calls it with Chart.render's own
    arguments and that one option added.
    """
    import json

    import helm_python as helm
    from helm_python import _native

    chart = helm.Chart.load(str(CHART))
    options = {"name": "demo", "namespace": "shop", "api_versions": api_versions}
    rendered: dict[str, str] = json.loads(
        _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
    )
    return [d for name, text in rendered.items() if name.endswith(".yaml") for d in documents(text)]


def drain_bound() -> float:
    """The longest the broker's shutdown on SIGTERM takes (broker/app.py `shutdown`).

    API requests and a refresh in flight drain side by side (a sent refresh token is awaited to
    the default read timeout, after the longest lease), then the loops stop, the metrics
    listener closes (1 s) and the store and the HTTP session close.
    """
    from broker.app import CLOSE_TIMEOUT, SHUTDOWN_GRACE
    from broker.fleet import Timing
    from broker.model import RefreshPolicy
    from broker.refresher import drain_bound as refresh_drain

    timing = Timing(read_timeout=RefreshPolicy().read_timeout)
    refresh = refresh_drain(timing, spends=True)
    return max(SHUTDOWN_GRACE, refresh) + CLOSE_TIMEOUT + 1.0 + 2 * CLOSE_TIMEOUT


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

    def test_base_image_is_pinned_by_digest(self) -> None:
        """Every stage starts from one base, an exact slim tag pinned by its sha256 digest."""
        text = (ROOT / "Dockerfile").read_text()
        base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE)
        assert base, "the base image is one ARG every FROM uses"
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base.group(1))
        froms = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
        assert froms and all(f == "${PYTHON_IMAGE}" for f in froms), froms

    def test_installs_only_from_the_hashed_runtime_lock(self) -> None:
        """Every pip install in the image reads a lock with --require-hashes (the runtime lock,
        with uvloop, the `fast` extra), or installs the broker's own wheel without dependencies;
        nothing is built from source or resolved on the day."""
        text = (ROOT / "Dockerfile").read_text()
        commands = re.findall(r"^RUN (.*?)(?<!\\)$", text, flags=re.MULTILINE | re.DOTALL)
        installs = [
            part.replace("\\\n", " ")
            for command in commands
            for part in command.split("&&")
            if "pip" in part and " install " in part
        ]
        assert len(installs) == 3, installs
        for install in installs:
            assert "--no-deps" in install, install
            if "-r requirements/" in install:
                assert "--require-hashes" in install, install
            else:
                assert re.search(r"/wheels/token_broker-\*\.whl", install), install
        assert any(
            "-r requirements/runtime.txt" in i and "--only-binary :all:" in i for i in installs
        )
        assert any("-r requirements/build.txt" in i for i in installs)
        assert "uvloop==" in (ROOT / "requirements" / "runtime.txt").read_text()
        assert "'.[" not in text, "the image installs the lock, not the project's ranges"

    def test_build_is_reproducible(self) -> None:
        """SOURCE_DATE_EPOCH reaches the build, pip keeps no cache layer, and bytecode is
        compiled with hash-based invalidation (no file times in the .pyc files)."""
        text = (ROOT / "Dockerfile").read_text()
        assert re.search(r"^ARG SOURCE_DATE_EPOCH", text, flags=re.MULTILINE)
        assert "SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}" in text
        assert "PIP_NO_CACHE_DIR=1" in text
        assert "--invalidation-mode unchecked-hash" in text
        assert "apt-get" not in text

    def test_the_locks_the_image_reads_are_in_the_build_context(self) -> None:
        """.dockerignore keeps requirements/ in the build context."""
        ignored = (ROOT / ".dockerignore").read_text().split()
        assert not any(p.strip("/*") in {"requirements", "requirements/*.txt"} for p in ignored)


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

    @pytest.mark.parametrize("where", ["base", "overlay"])
    def test_callers_use_the_socket_as_their_own_mapped_uid(self, where: str) -> None:
        """The API is a unix socket in an emptyDir; each caller runs as a uid a client maps."""
        docs = (
            overlay_docs(ROOT / "deploy" / "overlays" / "example")
            if where == "overlay"
            else [
                d
                for f in ("configmap.yaml", "deployment.yaml")
                for d in documents((BASE / f).read_text())
            ]
        )
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        check_socket_mode(pod, configmap["data"]["config.yaml"])

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


def _uid(pod: dict[str, Any], container: dict[str, Any]) -> int:
    uid: int = container.get("securityContext", {}).get(
        "runAsUser", pod["securityContext"].get("runAsUser")
    )
    return uid


def check_socket_mode(pod: dict[str, Any], config_text: str) -> None:
    """The recommended mode: socket in an emptyDir, callers with their own uids, all mapped."""
    config = yaml.safe_load(config_text)
    listen = config["server"]["listen"]
    assert listen.startswith("unix:/")
    socket_dir = str(Path(listen.removeprefix("unix:")).parent)
    volumes = {v["name"]: v for v in pod["volumes"]}
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "token-broker")

    def socket_volume(container: dict[str, Any]) -> str | None:
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == socket_dir]
        return mounts[0]["name"] if mounts else None

    volume = socket_volume(sidecar)
    assert volume is not None and "emptyDir" in volumes[volume]
    mapped = {uid for client in config["clients"].values() for uid in client.get("uids", [])}
    callers = [c for c in pod["containers"] if socket_volume(c) == volume]
    assert callers, "no container mounts the socket"
    uids = [_uid(pod, c) for c in [sidecar, *pod["containers"]]]
    assert len(set(uids)) == len(uids), "containers share a uid"
    for caller in callers:
        assert _uid(pod, caller) in mapped
        env = {e["name"]: e.get("value") for e in caller.get("env", [])}
        assert env["TOKEN_BROKER_URL"] == listen
        assert "TOKEN_BROKER_KEY_FILE" not in env
    assert _uid(pod, sidecar) not in mapped


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

    @pytest.mark.parametrize("values_file", [None, "ci/example-values.yaml", "ci/tcp-values.yaml"])
    def test_renders_and_validates(self, tmp_path: Path, values_file: str | None) -> None:
        """Default, example and TCP-mode values render to manifests that validate (strict)."""
        values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
        rendered = render_chart(with_example(values))
        docs = [
            d for name, text in rendered.items() if name.endswith(".yaml") for d in documents(text)
        ]
        validate(docs, tmp_path)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        check_pod(deployment["spec"]["template"]["spec"])
        rule = next(d for d in docs if d["kind"] == "PrometheusRule")
        assert rule["spec"] == yaml.safe_load(RULES.read_text())
        assert "NOTES.txt" in " ".join(rendered)

    @pytest.mark.parametrize("values_file", [None, "ci/example-values.yaml"])
    def test_recommended_mode_is_the_socket_with_mapped_uids(self, values_file: str | None) -> None:
        """Default and example values: the socket in an emptyDir, the workload a mapped uid."""
        values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
        docs = chart_docs(with_example(values))
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        check_socket_mode(pod, configmap["data"]["config.yaml"])
        assert not any(d["metadata"]["name"].endswith("-client-keys") for d in docs)

    def test_a_socket_outside_the_shared_directory_is_refused(self) -> None:
        """The chart refuses a socket path its callers could not reach."""
        import helm_python as helm

        values = {"config": {"server": {"listen": "unix:/tmp/api.sock"}}}
        with pytest.raises(helm.HelmError, match="/run/token-broker"):
            render_chart(values)

    def test_schema_rejects_bad_values(self) -> None:
        """values.schema.json refuses an unknown top-level key."""
        import helm_python as helm

        with pytest.raises(helm.HelmError):
            render_chart({"nonsense": True})

    def test_schema_rejects_a_proxy_upstream_with_a_path(self) -> None:
        """values.schema.json refuses a proxy upstream that is more than scheme and host."""
        import helm_python as helm

        values = yaml.safe_load((CHART / "values.yaml").read_text())
        values["config"]["apps"]["twilio"]["proxy"]["upstream"] = "https://api.twilio.com/v1"
        with pytest.raises(helm.HelmError):
            render_chart(values)

    def test_termination_grace_covers_the_drain(self) -> None:
        """The workload's grace period outlasts the drain; the schema refuses a shorter one."""
        import helm_python as helm

        docs = chart_docs(with_example())
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


PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: shop
  template:
    metadata:
      labels:
        app.kubernetes.io/name: shop
        token-broker.io/sidecar: "true"
    spec:
      automountServiceAccountToken: false
      securityContext:
        {{- include "token-broker.podSecurityContext" (dict "chartValues" .Values.tokenBroker "context" $) | nindent 8 }}
      initContainers:
        {{- include "token-broker.sidecar" (dict "chartValues" .Values.tokenBroker "context" $) | nindent 8 }}
      containers:
        - name: shop
          image: ghcr.io/example/shop:1.0.0
          env:
            - name: TOKEN_BROKER_URL
              value: {{ .Values.tokenBroker.config.server.listen }}
          securityContext:
            runAsNonRoot: true
            runAsUser: 10001
            runAsGroup: 10001
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities:
              drop: ["ALL"]
            seccompProfile:
              type: RuntimeDefault
          volumeMounts:
            {{- include "token-broker.callerMount" (dict "chartValues" .Values.tokenBroker "context" $) | nindent 12 }}
      volumes:
        {{- include "token-broker.volumes" (dict "chartValues" .Values.tokenBroker "context" $) | nindent 8 }}
"""

# The parent's values: what Helm passes to any dependency (global) and some of this chart's.
PARENT_VALUES: dict[str, Any] = {
    "global": {"imageRegistry": "registry.example.com", "storageClass": "fast"},
    "tokenBroker": {"image": {"tag": "0.1.0-parent"}, "podMonitor": {"force": True}},
}


def parent_chart(root: Path, deployment: str | None = None) -> Path:
    """A parent chart in `root` with this chart as its dependency `tokenBroker` (an alias) in
    charts/, and, when given, a Deployment template of its own."""
    parent = root / "shop"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "token-broker")
    chart = {
        "apiVersion": "v2",
        "name": "shop",
        "version": "1.0.0",
        "description": "A parent chart with token-broker as a dependency.",
        "icon": "https://example.com/icon.png",
        "dependencies": [
            {
                "name": "token-broker",
                "version": "0.1.0",
                "repository": "file://charts/token-broker",
                "alias": "tokenBroker",
            }
        ],
    }
    (parent / "Chart.yaml").write_text(yaml.safe_dump(chart))
    (parent / "values.yaml").write_text(yaml.safe_dump(PARENT_VALUES))
    if deployment is not None:
        (parent / "templates" / "deployment.yaml").write_text(deployment)
    return parent


def render_parent(
    parent: Path, values: dict[str, Any] | None = None, *, release: str = "demo"
) -> list[dict[str, Any]]:
    import helm_python as helm

    chart = helm.Chart.load(str(parent))
    rendered: dict[str, str] = chart.render(values or {}, name=release, namespace="shop")
    return [d for name, text in rendered.items() if name.endswith(".yaml") for d in documents(text)]


class TestChartAsDependency:
    def test_renders_and_lints_as_a_dependency_with_global_values(self, tmp_path: Path) -> None:
        """A parent chart passes `global` to this chart: its schema admits it, the parent
        renders (and lints strict, subcharts included) to manifests that validate."""
        import helm_python as helm

        parent = parent_chart(tmp_path)
        docs = render_parent(parent)
        validate(docs, tmp_path)
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("ConfigMap", "demo-token-broker-config") in names
        assert ("PodMonitor", "demo-token-broker") in names
        report = helm.lint(str(parent), strict=True, with_subcharts=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []

    def test_schema_admits_global_but_only_an_object(self) -> None:
        """`global` is admitted at the top of the values (an object), nothing else new is."""
        import helm_python as helm

        render_chart({"global": {"imageRegistry": "registry.example.com"}})
        with pytest.raises(helm.HelmError):
            render_chart({"global": "registry.example.com"})

    def test_a_parent_deployment_includes_the_sidecar(self, tmp_path: Path) -> None:
        """The parent's own Deployment includes the helpers with the Bitnami idiom
        (dict "chartValues" .Values.tokenBroker "context" $): it renders, validates, and its
        sidecar, socket and volumes are this chart's (the parent's values say the image)."""
        docs = render_parent(parent_chart(tmp_path, PARENT_DEPLOYMENT))
        validate(docs, tmp_path)
        deployment = next(d for d in docs if d["metadata"]["name"] == "demo-shop")
        pod = deployment["spec"]["template"]["spec"]
        check_pod(pod)
        configmap = next(d for d in docs if d["metadata"]["name"] == "demo-token-broker-config")
        check_socket_mode(pod, configmap["data"]["config.yaml"])
        sidecar = next(c for c in pod["initContainers"] if c["name"] == "token-broker")
        assert sidecar["image"] == "ghcr.io/example/token-broker:0.1.0-parent"
        secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
        assert set(pod_mounts(pod)) <= secrets
        assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {
            "demo-token-broker-config"
        }

    def test_the_parent_context_is_refused_with_a_hint(self, tmp_path: Path) -> None:
        """Passing the parent's own `.` fails with the idiom to use, not a nil pointer."""
        import helm_python as helm

        parent = parent_chart(
            tmp_path,
            PARENT_DEPLOYMENT.replace('(dict "chartValues" .Values.tokenBroker "context" $)', "."),
        )
        with pytest.raises(helm.HelmError, match="chartValues"):
            render_parent(parent)


WORKED_EXAMPLE = ROOT / "examples" / "helm-parent"


def worked_example(root: Path) -> Path:
    """examples/helm-parent copied to `root`, with this chart in its charts/ (what `helm
    dependency update` does)."""
    parent = root / "shop"
    shutil.copytree(WORKED_EXAMPLE, parent)
    shutil.copytree(CHART, parent / "charts" / "token-broker")
    return parent


class TestWorkedExample:
    """docs/deploy-kubernetes.md's worked example: examples/helm-parent, as a reader pastes it."""

    def test_renders_lints_and_validates(self, tmp_path: Path) -> None:
        """The parent chart renders to manifests that validate (strict) and lints clean; its
        own Deployment carries the sidecar with both callers on the socket by uid."""
        import helm_python as helm

        parent = worked_example(tmp_path)
        docs = render_parent(parent, release="shop")
        validate(docs, tmp_path)
        report = helm.lint(str(parent), strict=True, with_subcharts=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == []
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("Deployment", "shop-shop") in kinds
        assert ("PodDisruptionBudget", "shop-shop") in kinds
        assert not any(d["kind"] == "Secret" for d in docs)  # secrets.create: false
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        check_pod(pod)
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        check_socket_mode(pod, configmap["data"]["config.yaml"])
        assert "--appendfsync always" in redis_command(docs)
        config = yaml.safe_load(configmap["data"]["config.yaml"])
        assert config["apps"]["twilio-scim"]["grant_type"] == "authorization_code"
        assert config["store"]["url"] == "redis://shop-token-broker-redis:6379/0"

    def test_its_broker_config_passes_check_config(self, tmp_path: Path) -> None:
        """With the Secrets the docs say to create, the rendered config passes check-config."""
        parent = worked_example(tmp_path)
        secrets = {
            "create": True,
            "apps": {
                "twilio": {"client_id": "AC123", "client_secret": "twilio-secret-value"},
                "twilio-scim": {"client_id": "scim-id", "client_secret": "scim-secret-value"},
            },
            "storeKey": "k1 " + base64.b64encode(bytes(range(32))).decode(),
            "redisPassword": "redis-password-value",
        }
        docs = render_parent(parent, {"tokenBroker": {"secrets": secrets}}, release="shop")
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        config = materialize(
            configmap["data"]["config.yaml"],
            [d for d in docs if d["kind"] == "Secret"],
            pod_mounts(pod),
            tmp_path / "mounted",
        )
        out = check_config(config)
        assert out.returncode == 0, out.stderr
        assert "twilio-scim: authorization_code" in out.stdout

    def test_a_typo_in_the_parents_broker_config_fails_lint(self, tmp_path: Path) -> None:
        """The dependency's schema checks the parent's tokenBroker.config too."""
        import helm_python as helm

        parent = worked_example(tmp_path)
        values = yaml.safe_load((parent / "values.yaml").read_text())
        values["tokenBroker"]["config"]["apps"]["twilio-scim"]["refesh"] = {"jitter": 0.1}
        report = helm.lint(str(parent), values, strict=True, with_subcharts=True)
        assert report["errors"], report
        assert "refesh" in json.dumps(report["errors"])


class TestChartOptions:
    def test_no_example_workload_by_default(self) -> None:
        """The example workload is off by default; when on it is named <release>-<name>."""
        assert not any(d["kind"] == "Deployment" for d in chart_docs())
        docs = chart_docs({"workload": {"enabled": True}})
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert deployment["metadata"]["name"] == "demo-billing"

    def test_monitoring_needs_its_crds_or_force(self, tmp_path: Path) -> None:
        """PodMonitor and PrometheusRule render only when monitoring.coreos.com/v1 is known
        (an offline render knows only built-in APIs) or when forced; enabled: false wins."""
        kinds = {d["kind"] for d in chart_docs()}
        assert not kinds & CRD_KINDS
        forced = {"podMonitor": {"force": True}, "prometheusRule": {"force": True}}
        assert {d["kind"] for d in chart_docs(forced)} >= CRD_KINDS
        off = _merge(
            forced, {"podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}}
        )
        assert not {d["kind"] for d in chart_docs(off)} & CRD_KINDS
        template = (CHART / "templates" / "monitoring.yaml").read_text()
        assert '.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"' in template

    def test_monitoring_renders_where_the_cluster_knows_its_crds(self) -> None:
        """With monitoring.coreos.com/v1 among the cluster's API versions (what helm install
        reads from the API server), PodMonitor and PrometheusRule render without force, exactly
        as a forced render gives them; enabled: false still wins, and another API is no match."""
        known = ["monitoring.coreos.com/v1"]
        kinds = {d["kind"] for d in chart_docs_on_cluster({}, known)}
        assert kinds >= CRD_KINDS
        forced = {"podMonitor": {"force": True}, "prometheusRule": {"force": True}}
        present = [d for d in chart_docs_on_cluster({}, known) if d["kind"] in CRD_KINDS]
        assert present == [d for d in chart_docs(forced) if d["kind"] in CRD_KINDS]
        off = {"podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}}
        assert not {d["kind"] for d in chart_docs_on_cluster(off, known)} & CRD_KINDS
        other = chart_docs_on_cluster({}, ["monitoring.coreos.com/v1alpha1", "example.com/v1"])
        assert not {d["kind"] for d in other} & CRD_KINDS

    @pytest.mark.parametrize(
        "values",
        [
            {"podMonitor": {"intervall": "30s"}},
            {"prometheusRule": {"label": {"release": "prometheus"}}},
            {"workload": {"replica": 3}},
            {"redis": {"storag": "1Gi"}},
            {"networkPolicy": {"enable": True}},
            {"secrets": {"storekey": "x"}},
            {"resources": {"limit": {"memory": "1Gi"}}},
            {"probes": {"startup": {"failureTreshold": 60}}},
            {"workload": {"podDisruptionBudget": {"minAvailable": 1}}},
        ],
    )
    def test_nested_objects_refuse_unknown_keys(self, values: dict[str, Any]) -> None:
        """A misspelt key inside a values object fails lint (and rendering)."""
        import helm_python as helm

        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"], report
        with pytest.raises(helm.HelmError):
            render_chart(values)

    def test_network_policy_is_off_by_default_and_admits_the_workload_ports(
        self, tmp_path: Path
    ) -> None:
        """The policy on the sidecar pods (which cuts off every port it does not admit) is off
        by default; on, it admits Prometheus to 9411 and each rule of networkPolicy.ingress.
        The Redis policy stays on by default."""
        names = {d["metadata"]["name"] for d in chart_docs() if d["kind"] == "NetworkPolicy"}
        assert names == {"demo-token-broker-redis"}
        rule = {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "web"}}}],
            "ports": [{"protocol": "TCP", "port": 8080}],
        }
        docs = chart_docs(with_example({"networkPolicy": {"enabled": True, "ingress": [rule]}}))
        validate(docs, tmp_path)
        policy = next(d for d in docs if d["metadata"]["name"] == "demo-token-broker-sidecar")
        assert policy["spec"]["podSelector"]["matchLabels"] == {"token-broker.io/sidecar": "true"}
        ingress = policy["spec"]["ingress"]
        assert ingress[0]["ports"] == [{"protocol": "TCP", "port": 9411}]
        assert ingress[1:] == [rule]
        off = chart_docs({"redis": {"networkPolicy": {"enabled": False}}})
        assert not any(d["kind"] == "NetworkPolicy" for d in off)

    def test_pod_scheduling_and_pull_secret_values(self, tmp_path: Path) -> None:
        """imagePullSecrets, tolerations and topologySpreadConstraints reach every pod the chart
        renders; a spread constraint gets the pod's own labelSelector when it has none."""
        toleration = {
            "key": "dedicated",
            "operator": "Equal",
            "value": "shop",
            "effect": "NoSchedule",
        }
        spread = {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
        values = with_example(
            {
                "imagePullSecrets": [{"name": "regcred"}],
                "workload": {"tolerations": [toleration], "topologySpreadConstraints": [spread]},
                "redis": {"tolerations": [toleration], "topologySpreadConstraints": [spread]},
            }
        )
        docs = chart_docs(values)
        validate(docs, tmp_path)
        for kind in ("Deployment", "StatefulSet"):
            workload = next(d for d in docs if d["kind"] == kind)
            pod = workload["spec"]["template"]
            assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
            assert pod["spec"]["tolerations"] == [toleration]
            [constraint] = pod["spec"]["topologySpreadConstraints"]
            assert constraint == {**spread, "labelSelector": constraint["labelSelector"]}
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= pod["metadata"]["labels"].items()
            assert selector == workload["spec"]["selector"]["matchLabels"]
        plain = chart_docs(with_example())
        for d in plain:
            if d["kind"] in ("Deployment", "StatefulSet"):
                spec = d["spec"]["template"]["spec"]
                assert not {"imagePullSecrets", "tolerations", "topologySpreadConstraints"} & set(
                    spec
                )


# A typo in each object of the broker config the chart's schema closes (broker/schema.py,
# embedded by scripts/chart-schema): the dotted place in values.yaml's config, then the typo.
CONFIG_TYPOS = [
    ("", "clientz"),
    ("server", "listn"),
    ("store", "keyprefix"),
    ("apps.twilio", "refesh"),
    ("apps.twilio.refresh", "jiter"),
    ("apps.twilio.proxy", "upstreem"),
    ("apps.twilio.sinks.0", "pth"),
    ("clients.billing", "uid"),
]


class TestConfigSchemaInTheChart:
    @pytest.mark.parametrize(("place", "typo"), CONFIG_TYPOS)
    def test_a_typo_anywhere_in_config_fails_lint(self, place: str, typo: str) -> None:
        """helm lint (and install) refuse an unknown key in any object of `config:`, before a
        pod could crash on it."""
        import helm_python as helm

        values = yaml.safe_load((CHART / "values.yaml").read_text())
        config = values["config"]
        config["apps"]["twilio"]["refresh"] = {"jitter": 0.1}
        config["apps"]["twilio"]["sinks"] = [{"path": "/run/token-broker/twilio"}]
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], report
        node = config
        for part in filter(None, place.split(".")):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[typo] = True
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"], report
        assert typo in json.dumps(report["errors"])
        with pytest.raises(helm.HelmError, match=typo):
            render_chart(values)

    def test_the_typo_places_cover_every_closed_object(self) -> None:
        """CONFIG_TYPOS has a place in every object of the config schema that is closed."""
        from broker.schema import config_schema

        def closed(schema: dict[str, Any], path: str) -> set[str]:
            found = {path} if schema.get("additionalProperties") is False else set()
            for name, child in schema.get("properties", {}).items():
                found |= closed(child, f"{path}.{name}".lstrip("."))
            if isinstance(schema.get("additionalProperties"), dict):
                found |= closed(schema["additionalProperties"], f"{path}.*")
            if isinstance(schema.get("items"), dict):
                found |= closed(schema["items"], f"{path}.0")
            return found

        places = {
            ".".join(
                "*" if i == 1 and p in ("twilio", "billing") else p
                for i, p in enumerate(place.split("."))
            )
            for place, _ in CONFIG_TYPOS
        }
        assert places == closed(config_schema(), "")

    def test_a_bad_value_in_config_fails_lint(self) -> None:
        """Types, enums and ranges of the broker's schema apply too, not only the keys."""
        import helm_python as helm

        values = yaml.safe_load((CHART / "values.yaml").read_text())
        values["config"]["apps"]["twilio"]["grant_type"] = "password"
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"], report


class TestMemoryFigures:
    def test_the_sizing_comments_and_the_docs_agree(self) -> None:
        """values.yaml, the plain Deployment and docs/deploy-kubernetes.md quote the same idle
        resident memory (bench/scale.py) for 10 apps on Redis and on memory://."""
        pattern = re.compile(
            r"(\d+) MiB\s+resident\s+with\s+10\s+apps\s+on\s+Redis,\s+idle\s+\((\d+)"
        )
        sources = [
            CHART / "values.yaml",
            BASE / "deployment.yaml",
            ROOT / "docs" / "deploy-kubernetes.md",
        ]
        figures = {source.name: pattern.findall(source.read_text()) for source in sources}
        assert all(len(found) == 1 for found in figures.values()), figures
        assert len({found[0] for found in figures.values()}) == 1, figures


class TestProbesAndDisruptionBudget:
    def test_startup_probe_waits_for_every_required_app_by_default(self) -> None:
        """The sidecar's startup probe is /readyz, every second for up to 120 s (it gates the
        main containers); readiness is /readyz too; both take the probes values."""
        pod = next(d for d in chart_docs(with_example()) if d["kind"] == "Deployment")
        sidecar = pod["spec"]["template"]["spec"]["initContainers"][0]
        assert sidecar["startupProbe"] == {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 1,
            "failureThreshold": 120,
        }
        assert sidecar["readinessProbe"] == {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        }
        docs = chart_docs(with_example({"probes": {"startup": {"failureThreshold": 600}}}))
        pod = next(d for d in docs if d["kind"] == "Deployment")
        probe = pod["spec"]["template"]["spec"]["initContainers"][0]["startupProbe"]
        assert (probe["periodSeconds"], probe["failureThreshold"]) == (1, 600)

    def test_the_example_workload_has_a_disruption_budget_option(self, tmp_path: Path) -> None:
        """Off by default; on, a PodDisruptionBudget selecting exactly the workload's pods."""
        assert not any(d["kind"] == "PodDisruptionBudget" for d in chart_docs(with_example()))
        values = with_example({"workload": {"podDisruptionBudget": {"enabled": True}}})
        docs = chart_docs(values)
        validate(docs, tmp_path)
        budget = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert budget["metadata"]["name"] == "demo-billing"
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"] == deployment["spec"]["selector"]


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
        # token_broker_next_refresh_timestamp_seconds, token_broker_app_ready (issue 24),
        # token_broker_token_refused_total, token_broker_proxy_egress_refused_total (issue 22),
        # token_broker_dpop_proofs_total, _dpop_nonce_retries_total, _dpop_unbound_tokens_total
        # (issue 23)
        assert len(known) == 30
        assert used <= known, used - known
        assert {
            "token_broker_token_expiry_timestamp_seconds",
            "token_broker_refresh_total",
            "token_broker_requests_total",
            "token_broker_request_duration_seconds",
            "token_broker_store_up",
            "token_broker_sink_writes_total",
            "token_broker_next_refresh_timestamp_seconds",
            "token_broker_app_ready",
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


def with_real_proxy_cas(values: dict[str, Any]) -> None:
    """Put a real CA certificate where the values hold a PLACEHOLDER `proxy_ca`, as an operator
    would: check-config parses the CA file that `ca_file` points at."""
    import trustme

    pem = trustme.CA().cert_pem.bytes().decode()
    for app in values.get("secrets", {}).get("apps", {}).values():
        if "proxy_ca" in app:
            assert str(app["proxy_ca"]).startswith("PLACEHOLDER")
            app["proxy_ca"] = pem


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

    @pytest.mark.parametrize("values_file", [None, "ci/example-values.yaml", "ci/tcp-values.yaml"])
    def test_helm_chart(self, tmp_path: Path, values_file: str | None) -> None:
        """The chart's rendered config passes check-config, which warns about its placeholders."""
        values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
        if values is not None:
            with_real_proxy_cas(values)
        config = chart_config(tmp_path, values)
        out = check_config(config)
        assert out.returncode == 0, out.stderr
        rendered = yaml.safe_load(config.read_text())
        # Every secret the chart's values hold is a PLACEHOLDER: each file is warned about.
        placeholders = {
            f"apps.{name}.{field}"
            for name, app in rendered["apps"].items()
            for field in ("client_id_file", "client_secret_file")
            if field in app
        }
        placeholders |= {
            f"clients.{name}.key_file"
            for name, client in rendered["clients"].items()
            if "key_file" in client
        }
        placeholders |= {
            f"store.{field}"
            for field in ("encryption_key_file", "password_file")
            if field in rendered["store"]
        }
        warned = {line.split(":")[1].strip() for line in out.stderr.splitlines()}
        assert "store.encryption_key_file" in placeholders
        assert placeholders <= warned

    def test_helm_chart_fills_in_the_previous_secret(self, tmp_path: Path) -> None:
        """secrets.apps.<name>.client_secret_previous becomes client_secret_previous_file."""
        previous = "previous-secret-" + "p" * 20
        values = {"secrets": {"apps": {"twilio": {"client_secret_previous": previous}}}}
        config = chart_config(tmp_path, values)
        app = yaml.safe_load(config.read_text())["apps"]["twilio"]
        assert app["client_secret_previous_file"].endswith(
            "/etc/token-broker/apps/twilio/client_secret_previous"
        )
        assert Path(app["client_secret_previous_file"]).read_text() == previous
        out = check_config(config)
        assert out.returncode == 0, out.stderr
        assert "previous secret configured" in out.stdout
        assert previous not in out.stdout + out.stderr

    def test_helm_chart_passes_the_replica_ack_settings(self, tmp_path: Path) -> None:
        """config.store.require_replica_ack and replica_ack_timeout reach the broker's config
        (and pass check-config); left out, the broker's default for the URL's scheme holds."""
        assert (
            "require_replica_ack" not in yaml.safe_load(chart_config(tmp_path).read_text())["store"]
        )
        values = {"config": {"store": {"require_replica_ack": True, "replica_ack_timeout": "1s"}}}
        config = chart_config(tmp_path / "on", values)
        store = yaml.safe_load(config.read_text())["store"]
        assert (store["require_replica_ack"], store["replica_ack_timeout"]) == (True, "1s")
        out = check_config(config)
        assert out.returncode == 0, out.stderr
        assert "a replica acknowledges each spend (WAIT, 1s)" in out.stdout

    def test_helm_chart_without_a_previous_secret_names_no_file(self, tmp_path: Path) -> None:
        """Without client_secret_previous the config names no previous-secret file."""
        app = yaml.safe_load(chart_config(tmp_path).read_text())["apps"]["twilio"]
        assert "client_secret_previous_file" not in app


def chart_config(root: Path, values: dict[str, Any] | None = None) -> Path:
    """The chart's rendered config, with its Secrets' files written where the pod mounts them."""
    docs = [
        d
        for name, text in render_chart(with_example(values)).items()
        if name.endswith(".yaml")
        for d in documents(text)
    ]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    return materialize(configmap["data"]["config.yaml"], secrets, pod_mounts(pod), root)


# Workload identity (issue 23): an Entra-style federated app on the pod's projected token, and
# an mTLS app whose certificate is the app Secret's tls.crt and tls.key.
FEDERATED: dict[str, Any] = {
    "serviceAccountToken": {
        "enabled": True,
        "audience": "api://AzureADTokenExchange",
        "expirationSeconds": 3600,
    },
    "config": {
        "apps": {
            "entra": {
                "token_url": "https://login.microsoftonline.com/tenant-id/oauth2/v2.0/token",
                "client_id": "00000000-0000-0000-0000-000000000001",
                "client_auth": "client_assertion",
                "scopes": ["https://graph.microsoft.com/.default"],
            }
        },
        "clients": {"billing": {"apps": ["twilio", "entra"]}},
    },
}


class TestWorkloadIdentityChart:
    def test_the_projected_token_is_mounted_and_named_in_the_config(self, tmp_path: Path) -> None:
        """The projected volume has the audience and expiry; the sidecar mounts it; the
        federated app's assertion_file is its path, with no secret and no app Secret."""
        import helm_python as helm

        report = helm.lint(
            str(CHART),
            _merge(yaml.safe_load((CHART / "values.yaml").read_text()), FEDERATED),
            strict=True,
        )
        assert report["errors"] == [], report
        docs = chart_docs(with_example(FEDERATED))
        validate(docs, tmp_path)
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        check_pod(pod)
        volumes = {v["name"]: v for v in pod["volumes"]}
        source = volumes["token-broker-sa-token"]["projected"]["sources"][0]
        assert source["serviceAccountToken"] == {
            "audience": "api://AzureADTokenExchange",
            "expirationSeconds": 3600,
            "path": "token",
        }
        assert "token-broker-app-entra" not in volumes
        sidecar = next(c for c in pod["initContainers"] if c["name"] == "token-broker")
        mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
        assert (
            mounts["token-broker-sa-token"]["mountPath"] == "/var/run/secrets/token-broker/sa-token"
        )
        assert mounts["token-broker-sa-token"]["readOnly"] is True
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        app = yaml.safe_load(configmap["data"]["config.yaml"])["apps"]["entra"]
        assert app["assertion_file"] == "/var/run/secrets/token-broker/sa-token/token"
        assert "client_secret_file" not in app
        out = check_config(chart_config(tmp_path / "mounted", FEDERATED))
        assert out.returncode == 0, out.stderr
        assert "entra: client_credentials, client_assertion" in out.stdout

    def test_a_token_exchange_app_needs_no_client_id_and_no_secret(self, tmp_path: Path) -> None:
        """Google STS's form: no client_id, so no client_id_file and no app Secret."""
        gcp = {
            "token_url": "https://sts.googleapis.com/v1/token",
            "client_auth": "client_assertion",
            "assertion_type": "token-exchange",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }
        values = _merge(
            FEDERATED,
            {"config": {"apps": {"gcp": gcp}, "clients": {"billing": {"apps": ["twilio", "gcp"]}}}},
        )
        docs = chart_docs(with_example(values))
        pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        assert "token-broker-app-gcp" not in {v["name"] for v in pod["volumes"]}
        config = chart_config(tmp_path, values)
        app = yaml.safe_load(config.read_text())["apps"]["gcp"]
        assert not {"client_id", "client_id_file", "client_secret_file"} & set(app)
        out = check_config(config)
        assert out.returncode == 0, out.stderr

    def test_client_assertion_without_a_token_source_is_refused(self) -> None:
        """No assertion_file and no projected token: the render fails and says what to set."""
        import helm_python as helm

        values = _merge(FEDERATED, {"serviceAccountToken": {"enabled": False}})
        with pytest.raises(helm.HelmError, match=r"serviceAccountToken\.enabled"):
            render_chart(values)
        values = _merge(FEDERATED, {"serviceAccountToken": {"audience": ""}})
        with pytest.raises(helm.HelmError, match=r"serviceAccountToken\.audience"):
            render_chart(with_example(values))

    def test_the_schema_refuses_a_token_below_the_kubelets_floor(self) -> None:
        """expirationSeconds below 600 is refused by helm lint (the API server would be too)."""
        import helm_python as helm

        values = yaml.safe_load((CHART / "values.yaml").read_text())
        values["serviceAccountToken"] = {
            **FEDERATED["serviceAccountToken"],
            "expirationSeconds": 60,
        }
        report = helm.lint(str(CHART), values, strict=True)
        assert "expirationSeconds" in json.dumps(report["errors"])

    def test_tls_client_auth_reads_the_apps_tls_secret(self, tmp_path: Path) -> None:
        """tls_client_auth takes tls.crt and tls.key from the app Secret; check-config loads them."""
        from tests.support.workload_identity import TestCA

        cert, key = TestCA().issue("broker")
        values = {
            "config": {
                "apps": {
                    "mtls": {
                        "token_url": "https://idp.example.com/token",
                        "client_id": "mtls-client",
                        "client_auth": "tls_client_auth",
                    }
                },
                "clients": {"billing": {"apps": ["twilio", "mtls"]}},
            },
            "secrets": {"apps": {"mtls": {"tls.crt": cert.decode(), "tls.key": key.decode()}}},
        }
        config = chart_config(tmp_path, values)
        app = yaml.safe_load(config.read_text())["apps"]["mtls"]
        assert app["tls_client_cert_file"].endswith("/etc/token-broker/apps/mtls/tls.crt")
        assert app["tls_client_key_file"].endswith("/etc/token-broker/apps/mtls/tls.key")
        assert "client_secret_file" not in app
        out = check_config(config)
        assert out.returncode == 0, out.stderr
        assert key.decode().splitlines()[1] not in out.stdout + out.stderr
