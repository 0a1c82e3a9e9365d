"""deploy/kubernetes: kustomize renders it, Kubernetes' own schemas accept every object, and the
objects have the properties a pooler's rollout depends on.

``kubectl apply --dry-run=client`` needs an API server even so: kubectl maps every kind to its
REST resource through the server's discovery (``--validate=false`` skips only the OpenAPI
download, not that), and client-side apply GETs the live object to compute its patch. No flag
combination avoids either, so offline the objects are checked against the OpenAPI schemas of
kubectl's Kubernetes version that the ``kubernetes-validate`` package ships, strictly (unknown
fields are errors, which the server's client dry run would not even report); the apply dry run
itself runs when an API server is reachable.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from pgproxy.config import load_config
from tests.support.process import ROOT

DIR = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
UID = 10001

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")

Object = dict[str, Any]


def _kubectl(*args: str, stdin: str | None = None, timeout: float = 60) -> str:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered() -> str:
    return _kubectl("kustomize", str(DIR))


@pytest.fixture(scope="module")
def objects(rendered: str) -> dict[str, Object]:
    """The rendered objects by kind (one of each)."""
    found: dict[str, Object] = {}
    for doc in yaml.safe_load_all(rendered):
        assert doc["kind"] not in found, f"two {doc['kind']} objects"
        found[doc["kind"]] = doc
    return found


def test_kustomize_renders_the_objects_of_a_deployment(objects: Mapping[str, Object]) -> None:
    assert set(objects) == {"ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget"}
    assert {o["metadata"]["name"] for o in objects.values()} == {"pgproxy"}


def test_every_object_passes_kubernetes_schemas_strictly(objects: Mapping[str, Object]) -> None:
    client = json.loads(_kubectl("version", "--client", "-o", "json"))["clientVersion"]
    version = f"{client['major']}.{re.sub(r'[^0-9]', '', client['minor'])}.0"
    if version not in kubernetes_validate.utils.all_versions():  # a kubectl newer than them
        version = kubernetes_validate.latest_version()
    for kind, obj in objects.items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind}: {exc.message} at {list(exc.path)}") from None


def test_kubectl_apply_dry_run_accepts_it(rendered: str) -> None:
    assert KUBECTL is not None
    probe = subprocess.run(
        [KUBECTL, "version", "--request-timeout=3s"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("no Kubernetes API server reachable: apply --dry-run=client needs one")
    out = _kubectl("apply", "--dry-run=client", "-f", "-", stdin=rendered)
    assert out.count("(dry run)") == 5, out


def _pod(objects: Mapping[str, Object]) -> Object:
    spec: Object = objects["Deployment"]["spec"]["template"]["spec"]
    return spec


def _container(objects: Mapping[str, Object]) -> Object:
    (container,) = _pod(objects)["containers"]
    return dict(container)


def _env(objects: Mapping[str, Object]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(objects).get("env", [])}


def _port(container: Object, name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def test_deployment_replicas_probes_and_grace_period(objects: Mapping[str, Object]) -> None:
    deployment = objects["Deployment"]
    container = _container(objects)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert _port(container, "postgres") == 6432 and _port(container, "metrics") == 9127
    assert _env(objects)["PGPROXY_METRICS_LISTEN"] == "0.0.0.0:9127"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], _port(container, get["port"])) == (path, 9127), probe
    assert "lifecycle" not in container  # the preStop sleep is opt-in:
    assert re.search(r"# +preStop:\n# +exec:\n# +command: \[\"sleep\", \"5\"\]",
                     re.sub(r"\n +", "\n", (DIR / "deployment.yaml").read_text()))  # fmt: skip


def test_deployment_runs_locked_down(objects: Mapping[str, Object]) -> None:
    pod, container = _pod(objects), _container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert "memory" in container["resources"]["limits"]
    # The image's user and ports are the ones the manifests assume.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^USER {UID}:{UID}$", dockerfile, re.M)
    assert re.search(r"^EXPOSE 6432 9127$", dockerfile, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.M)


def test_config_and_secret_reach_the_container(objects: Mapping[str, Object]) -> None:
    container, volumes = _container(objects), _pod(objects)["volumes"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_volume = next(v for v in volumes if v["name"] == mounts["/etc/pgproxy"])
    assert config_volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert "pgproxy.toml" in objects["ConfigMap"]["data"]
    assert next(v for v in volumes if v["name"] == mounts["/tmp"])["emptyDir"]
    (source,) = container["envFrom"]
    assert source["secretRef"]["name"] == objects["Secret"]["metadata"]["name"]
    assert "DATABASE_URL" in objects["Secret"]["stringData"]


def test_the_configmap_is_a_valid_pgproxy_configuration(
    objects: Mapping[str, Object], tmp_path: Path
) -> None:
    """As the container loads it: the mounted file under the Secret's and the Deployment's
    environment."""
    path = tmp_path / "pgproxy.toml"
    path.write_text(objects["ConfigMap"]["data"]["pgproxy.toml"])
    env = {**objects["Secret"]["stringData"], **_env(objects)}
    config = load_config(path, env=env)
    settings, container = config.proxy, _container(objects)
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", _port(container, "postgres"))
    assert settings.metrics_listen == f"0.0.0.0:{_port(container, 'metrics')}"
    # The drain (shutdown_timeout) ends before the kubelet's SIGKILL, with 5 s to exit.
    assert _pod(objects)["terminationGracePeriodSeconds"] == settings.shutdown_timeout + 5 == 35
    assert settings.paused is False  # the declarative knob is there, off
    assert config.databases["*"].host == "postgres"


def test_service_and_budget_select_the_pods(objects: Mapping[str, Object]) -> None:
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]}
    assert ports == {"postgres": (6432, "postgres"), "metrics": (9127, "metrics")}
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()
