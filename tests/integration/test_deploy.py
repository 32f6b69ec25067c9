"""deploy/: what an operator installs.

The kustomize base validates against Kubernetes' schemas (rendered by ``kubectl kustomize`` when
kubectl is installed), runs under the restricted Pod Security Standard, drains within its grace
period, needs no provider-key Secret, and agrees with the Dockerfile on user, ports and spool;
the daemon configuration it ships passes ``aibridged check-config``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.processes import AIBRIDGED, clean_env

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_resources() -> list[dict[str, Any]]:
    """The manifests the kustomization lists, as written (before kustomize's edits)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_docs(K8S / name)]


def validate(doc: dict[str, Any]) -> None:
    """Schema-check a manifest (unknown fields refused); custom resources are checked apart."""
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        check_service_monitor(doc)
        return
    for version in KUBERNETES_VERSIONS:
        problem = ""
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # its text holds the whole schema
            problem = f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
        assert not problem, f"{doc['kind']}/{doc['metadata']['name']} ({version}) {problem}"


def check_service_monitor(doc: dict[str, Any]) -> None:
    """A ServiceMonitor is a CRD kubernetes-validate has no schema for: its fields by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "ServiceMonitor"
    spec = doc["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert set(spec["selector"]) == {"matchLabels"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def daemon_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "config.yaml").read_text())
    return loaded


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments of each occurrence (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            out.setdefault(instruction.upper(), []).append(args.strip())
    return out


def image_env() -> dict[str, str]:
    env = {}
    for args in dockerfile()["ENV"]:
        for pair in args.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize(
    "doc", base_resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_each_manifest_validates(doc: dict[str, Any]) -> None:
    validate(doc)


def test_kustomize_renders_the_base_and_every_object_validates() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        validate(doc)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "Service",
        "ServiceMonitor",
    ]
    # The generated ConfigMap holds config.yaml, and the pod mounts it under its hashed name.
    [config_map] = by_kind(docs, "ConfigMap")
    assert yaml.safe_load(config_map["data"]["aibridged.yaml"]) == daemon_config()
    pod = the(docs, "Deployment", "aibridged")["spec"]["template"]["spec"]
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert mounted == {config_map["metadata"]["name"]}
    assert pod["containers"][0]["image"] == "aibridged:0.1.0"


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the(base_resources(), "Deployment", "aibridged")["spec"]["template"][
        "spec"
    ]
    return spec


def test_pod_meets_the_restricted_pod_security_standard() -> None:
    pod = pod_spec()
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert all("hostPath" not in v for v in pod["volumes"])
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert not security.get("privileged")
        assert security.get("runAsUser", context["runAsUser"]) != 0


def test_only_the_spool_and_tmp_are_writable() -> None:
    pod = pod_spec()
    volumes = {v["name"]: v for v in pod["volumes"]}
    [container] = pod["containers"]
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    writable = {path: v for path, v in writable.items() if not _read_only(container, path)}
    spool_dir = str(Path(image_env()["AIBRIDGED_SPOOL_PATH"]).parent)
    assert set(writable) == {spool_dir, "/tmp"}
    for volume in writable.values():
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume


def _read_only(container: dict[str, Any], path: str) -> bool:
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    return bool(mount.get("readOnly"))


def test_probes_and_drain_fit_the_grace_period() -> None:
    pod = pod_spec()
    [container] = pod["containers"]
    http = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert image_env()["AIBRIDGED_LISTEN"] == f"0.0.0.0:{http}"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop > 0
    config = daemon_config()
    drain = pre_stop + config["shutdown_grace"] + config["control_grace"]
    assert pod["terminationGracePeriodSeconds"] > drain


def test_no_provider_key_secret_the_control_token_is_a_mounted_file() -> None:
    pod = pod_spec()
    [container] = pod["containers"]
    # Nothing from a Secret in the environment: the host pushes the providers and their keys.
    assert "envFrom" not in container
    assert all("valueFrom" not in e for e in container.get("env", []))
    config = daemon_config()
    assert config["require_control"] is True
    assert config["providers"] == []
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert list(secrets) == ["control-token"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "control-token"]
    assert mount["readOnly"] is True
    assert Path(config["control_token_file"]).parent == Path(mount["mountPath"])


def test_services_reach_each_replica_and_its_metrics() -> None:
    docs = base_resources()
    pod_labels = the(docs, "Deployment", "aibridged")["spec"]["template"]["metadata"]["labels"]
    [container] = pod_spec()["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = image_env()
    assert env["AIBRIDGED_CONTROL_LISTEN"] == f"0.0.0.0:{ports['control']}"
    assert env["AIBRIDGED_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}"
    for service in by_kind(docs, "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    control = the(docs, "Service", "aibridged-control")["spec"]
    # Headless, and listing replicas before they are ready: they wait for the host's push.
    assert control["clusterIP"] == "None"
    assert control["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in control["ports"]] == ["control"]
    metrics = the(docs, "Service", "aibridged-metrics")
    annotations = metrics["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    [monitor] = by_kind(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [
        s for s in by_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert matching == [metrics]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in metrics["spec"]["ports"]
    }
    [budget] = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_dockerfile_runs_as_the_pods_numeric_user_and_exposes_its_ports() -> None:
    instructions = dockerfile()
    assert instructions["FROM"] == ["python:3.11-slim"]
    [user] = instructions["USER"]
    assert re.fullmatch(r"\d+(:\d+)?", user), user
    context = pod_spec()["securityContext"]
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert instructions["STOPSIGNAL"] == ["SIGTERM"]
    [container] = pod_spec()["containers"]
    exposed = {int(p) for args in instructions["EXPOSE"] for p in args.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}


def test_the_shipped_daemon_config_passes_check_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("control-token-0123456789\n")
    config = str(K8S / "config.yaml")
    result = subprocess.run(
        [AIBRIDGED, "check-config", "--config", config, "--control-token-file", str(token)],
        env={**clean_env(), **image_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "managed by a host" in result.stdout
