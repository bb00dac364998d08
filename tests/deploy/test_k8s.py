"""deploy/k8s: the manifests agree with each other, with the image and with the server."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import (
    ADAPTER_RULES,
    K8S,
    SHUTDOWN_SLACK_S,
    exported_series,
    load_docs,
    load_one,
    parse_dockerfile,
    parse_promql,
    parse_serve,
    setting_default,
)

# Applied on their own (see kustomization.yaml): CRD-based or not a cluster resource.
NOT_IN_KUSTOMIZATION = {
    "kustomization.yaml",
    "servicemonitor.yaml",
    "prometheus-adapter-rules.yaml",
}


@pytest.fixture(scope="module")
def kustomization():
    return load_one(K8S / "kustomization.yaml")


@pytest.fixture(scope="module")
def resources(kustomization) -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, for everything the kustomization applies."""
    found = {}
    for file in kustomization["resources"]:
        for doc in load_docs(K8S / file):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"duplicate {key}"
            found[key] = doc
    return found


def one(resources, kind: str) -> dict:
    (found,) = [doc for (k, _), doc in resources.items() if k == kind]
    return found


@pytest.fixture(scope="module")
def deployment(resources):
    return one(resources, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment):
    return deployment["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod):
    (found,) = pod["spec"]["containers"]
    return found


@pytest.fixture(scope="module")
def configmap(resources, container):
    (ref,) = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    return resources[("ConfigMap", ref)]


def container_env(container, configmap, resources) -> dict[str, str]:
    """The container's environment: envFrom the ConfigMap, then env (values from the Secret)."""
    env = dict(configmap["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = resources[("Secret", ref["name"])]
            env[item["name"]] = str({**secret.get("stringData", {})}[ref["key"]])
    return env


def named_port(container, name_or_number) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name_or_number]
    return port


def pre_stop_seconds(container) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def drain_timeout(env: dict[str, str], args: list[str]) -> float:
    parsed = parse_serve(["serve", *args])
    if parsed.drain_timeout is not None:
        return float(parsed.drain_timeout)
    return float(env.get("XLLM_DRAIN_TIMEOUT", setting_default("XLLM_DRAIN_TIMEOUT")))


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ----------------------------------------------------------------------------- files


def test_kustomization_lists_every_manifest(kustomization):
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")}
    assert listed <= present
    assert present - listed == NOT_IN_KUSTOMIZATION


def test_schemas(resources):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for version in ("1.29.0", kv.latest_version()):
        for (kind, name), doc in resources.items():
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(f"{kind}/{name} (Kubernetes {version}): {exc}") from None


def test_no_namespaces_hardcoded_in_resources(resources, kustomization):
    """The kustomization's namespace applies to all; a hard-coded one would split them."""
    assert kustomization["namespace"]
    assert ("Namespace", kustomization["namespace"]) in resources
    for (kind, name), doc in resources.items():
        assert "namespace" not in doc["metadata"], f"{kind}/{name}"


# ----------------------------------------------------------------------------- container


def test_container_runs_the_image_entrypoint(container, kustomization):
    assert "command" not in container, "keep the image's ENTRYPOINT (xllm serve --host 0.0.0.0)"
    entrypoint = parse_dockerfile().final.last("ENTRYPOINT")
    assert '"serve"' in entrypoint and '"0.0.0.0"' in entrypoint
    parse_serve(["serve", "--host", "0.0.0.0", *container.get("args", [])])
    images = {i["name"] for i in kustomization.get("images", [])}
    assert container["image"].split(":")[0] in images


def test_env_is_settings(container, configmap, resources, check_settings_env):
    check_settings_env(dict(configmap["data"]), f"ConfigMap {configmap['metadata']['name']}")
    env = container_env(container, configmap, resources)
    check_settings_env(env, "Deployment container environment")
    for (kind, name), doc in resources.items():
        if kind == "Secret":
            check_settings_env(dict(doc.get("stringData", {})), f"Secret {name}")


def test_api_key_comes_from_the_secret(container, configmap, resources):
    assert "XLLM_API_KEY" not in configmap["data"]
    (item,) = [e for e in container["env"] if e["name"] == "XLLM_API_KEY"]
    ref = item["valueFrom"]["secretKeyRef"]
    assert ref["key"] in resources[("Secret", ref["name"])]["stringData"]


def test_ports_agree(container, configmap, resources, pod):
    port = int(configmap["data"].get("XLLM_PORT", setting_default("XLLM_PORT")))
    assert named_port(container, "http") == port
    exposed = parse_dockerfile().final.all("EXPOSE")
    assert [str(port)] == exposed
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_service_links_cannot_shadow_settings(pod, resources):
    """A Service named "xllm" makes Kubernetes inject XLLM_PORT=tcp://...:80 and friends,
    which pydantic-settings would read as --port: service links must be off."""
    services = [name for kind, name in resources if kind == "Service"]
    if any(name.upper().replace("-", "_").startswith("XLLM") for name in services):
        assert pod["spec"].get("enableServiceLinks") is False


def test_probes_use_real_routes(container, route_status):
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/ready"
    startup = container["startupProbe"]
    # /ready: the app is up before the model: only a loaded model ends the start-up phase
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "slow model loads"
    assert route_status("/health") == 200
    assert route_status("/ready") == 503, "not ready while no model is loaded"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert route_status(get["path"]) != 404, probe
        named_port(container, get["port"])
        assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"]


def test_termination_grace_covers_prestop_and_drain(pod, container, configmap, resources):
    env = container_env(container, configmap, resources)
    drain = drain_timeout(env, container.get("args", []))
    pre_stop = pre_stop_seconds(container)
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop > 0, "endpoints need a moment to drop the pod before the drain"
    assert grace > pre_stop + drain, (grace, pre_stop, drain)
    assert grace >= pre_stop + drain + SHUTDOWN_SLACK_S, (grace, pre_stop, drain)


def test_gpu_and_models_volume(container, pod, configmap):
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert configmap["data"]["XLLM_DEVICE"] == "cuda"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes[mounts["/models"]["name"]].get("persistentVolumeClaim")
    assert claim is None or claim.get("readOnly") is True
    assert configmap["data"]["XLLM_MODEL"].startswith("/models/")


def test_security_context_matches_the_image(pod, container):
    user = parse_dockerfile().final.last("USER").split(":")[0]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == user
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    if own.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", "/home/xllm/.cache"} <= mounts, "writable scratch and cache"


# ----------------------------------------------------------------------------- wiring


def test_selectors_match_the_pods(deployment, pod, resources):
    labels = pod["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(resources, "Service")
    assert matches(service["spec"]["selector"], labels)
    (container,) = pod["spec"]["containers"]
    for port in service["spec"]["ports"]:
        named_port(container, port["targetPort"])
    pdb = one(resources, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)


def test_pdb_never_blocks_drains_forever(resources):
    spec = one(resources, "PodDisruptionBudget")["spec"]
    hpa = one(resources, "HorizontalPodAutoscaler")["spec"]
    if "minAvailable" in spec:
        assert spec["minAvailable"] < hpa["minReplicas"]
    else:
        assert spec["maxUnavailable"] >= 1


def test_scrape_annotations(pod, route_status):
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert route_status(annotations["prometheus.io/path"]) == 200


def test_service_monitor(resources, route_status):
    monitor = load_one(K8S / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = one(resources, "Service")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert route_status(endpoint.get("path", "/metrics")) == 200


# ----------------------------------------------------------------------------- autoscaling


@pytest.fixture(scope="module")
def adapter_rules():
    return load_one(ADAPTER_RULES)["rules"]["custom"]


def test_hpa_scales_the_deployment_on_exported_pod_metrics(resources, deployment, adapter_rules):
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    served = {rule["name"]["as"] for rule in adapter_rules}
    names = []
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        names.append(name)
        assert name in exported_series(), f"{name} is not exported by the server"
        assert name in served, f"no prometheus-adapter rule serves {name}"
        assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert names[0] == "xllm_num_requests_waiting", "the queue drives the scaling"


def test_hpa_running_target_is_reachable(resources, configmap):
    """A running-requests target above XLLM_MAX_BATCH could never be reached."""
    hpa = one(resources, "HorizontalPodAutoscaler")
    max_batch = int(configmap["data"].get("XLLM_MAX_BATCH", setting_default("XLLM_MAX_BATCH")))
    for metric in hpa["spec"]["metrics"]:
        if metric["pods"]["metric"]["name"] == "xllm_num_requests_running":
            assert float(metric["pods"]["target"]["averageValue"]) < max_batch


def test_adapter_rules(adapter_rules):
    pytest.importorskip("promql_parser", reason="pip install promql-parser")
    for rule in adapter_rules:
        series = rule["seriesQuery"].split("{")[0]
        assert series in exported_series(), series
        assert rule["name"]["as"] == series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        parse_promql(rule["metricsQuery"])
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
