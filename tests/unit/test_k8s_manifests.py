"""deploy/k8s validated offline: the kustomize base rendered by deploy/k8s/render.py
(what `kubectl kustomize deploy/k8s` prints), checked against the pinned Kubernetes
schemas (kubernetes-validate, strict), KEDA's ScaledObject CRD and the NATS chart's
values keys (deploy/schemas/), and for what a platform team asks of each pod:
non-root, read-only, no privileges, no API token, bounded resources, real probes,
default-deny networking, autoscaling on consumers the workers really create."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # the pinned schemas: without the package this file fails, never skips
import pytest
import yaml

from cplane.bus.prom import LIVE_PATH, READY_PATH
from cplane.schemas.messages import PRIORITIES, Role
from cplane.schemas.settings import Settings, load_settings
from cplane.schemas.subjects import ANY_TARGET, consumer_for_work, model_target
from tests.deploy_render import K8S_DIR, pod_spec, render, split_image
from tests.dockerfile import env_of, stages
from tests.netpol import Endpoint, allowed

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33"  # the oldest Kubernetes minor these manifests promise to work on
KEDA_CRD = ROOT / "deploy" / "schemas" / "keda-v2.20.2-scaledobjects.keda.sh.yaml"
NATS_KEYS = ROOT / "deploy" / "schemas" / "nats-chart-2.14.2-values-keys.json"
NATS_VALUES = K8S_DIR / "nats-values.yaml"
# The nats-jetstream scaler's metadata (kedacore/keda v2.20.2,
# pkg/scalers/nats_jetstream_scaler.go): every key it reads, and those it needs.
KEDA_NATS_KEYS = {"natsServerMonitoringEndpoint", "account", "accountID", "stream", "consumer",
                  "lagThreshold", "activationLagThreshold", "useHttps"}
KEDA_NATS_REQUIRED = {"natsServerMonitoringEndpoint", "stream", "consumer"}
# The official chart's selector labels for release `nats` (its _helpers.tpl).
NATS_POD_LABELS = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats",
                   "app.kubernetes.io/component": "nats"}
# What the images' target serves, by role (bus/prom.py; gateway/app.py's /health,
# exercised in tests/live/test_gateway.py).
SERVED = {"orchestrator": {LIVE_PATH, READY_PATH}, "worker": {LIVE_PATH, READY_PATH},
          "gateway": {"/health"}}
# Where vLLM, PyTorch, Triton and Hugging Face write: on a read-only root these
# must point into a writable emptyDir.
CACHE_ENV = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT",
             "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH")
VLLM_CACHE_ENV = {"HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"}

OBJECTS = render()
WORKLOADS = [o for o in OBJECTS if o["kind"] in ("Deployment", "StatefulSet")]
IMAGE_ENV = {name: env_of(stage) for name, stage in stages().items()}


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in of_kind(kind) if o["metadata"]["name"] == name]
    return obj


def ids(objs: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objs]


def component(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def arg(container: dict[str, Any], flag: str) -> str | None:
    args = [str(a) for a in container.get("args", [])]
    return args[args.index(flag) + 1] if flag in args else None


def cplane_toml() -> str:
    return str(named("ConfigMap", "cplane-config")["data"]["cplane.toml"])


def effective_settings(container: dict[str, Any]) -> Settings:
    """What the process loads in its pod: defaults <- cplane.toml <- the image's ENV
    <- the container's env (literal values), as schemas/settings.py merges them."""
    target = {"cplane-gpu": "gpu", "cplane-slim": "slim", "cplane-cpu": "cpu"}[
        split_image(container["image"])[0].rsplit("/", 1)[1]]
    env = {**IMAGE_ENV[target], **{e["name"]: e["value"] for e in container.get("env", [])
                                   if "value" in e}}
    return config_settings(env)


def config_settings(env: dict[str, str] | None = None) -> Settings:
    """cplane.toml of the ConfigMap, loaded as cplane loads it, under `env`."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as fh:
        fh.write(cplane_toml())
        fh.flush()
        return load_settings(fh.name, env=env or {})


def nats_values() -> dict[str, Any]:
    return dict(yaml.safe_load(NATS_VALUES.read_text()))


# -- schemas ------------------------------------------------------------------------------


def test_k8s_render_gives_every_object_once_in_its_namespace() -> None:
    keys = [(o["kind"], o["metadata"]["name"]) for o in OBJECTS]
    assert len(keys) == len(set(keys))
    for o in OBJECTS:
        assert o["metadata"].get("namespace") == (None if o["kind"] == "Namespace" else "cplane")
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cplane"
    assert {"Namespace", "ServiceAccount", "NetworkPolicy", "ConfigMap", "PersistentVolumeClaim",
            "Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
            "ScaledObject"} == {o["kind"] for o in OBJECTS}


@pytest.mark.parametrize("obj", [o for o in OBJECTS if o["kind"] != "ScaledObject"],
                         ids=ids([o for o in OBJECTS if o["kind"] != "ScaledObject"]))
def test_k8s_manifest_validates_against_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    # strict: an unknown field (a typo the API server would drop or refuse) fails too
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_k8s_schema_check_catches_a_misspelt_field() -> None:
    bad = copy.deepcopy(named("Deployment", "orchestrator"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return dict(version["schema"]["openAPIV3Schema"])


def pruned(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop: not in a structural schema's properties."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += pruned(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += pruned(value, extra, f"{path}.{key}")
            elif props is not None:
                out.append(f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            out += pruned(value, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("obj", of_kind("ScaledObject"), ids=ids(of_kind("ScaledObject")))
def test_k8s_scaledobject_validates_against_the_keda_crd(obj: dict[str, Any]) -> None:
    schema = _crd_schema()
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.Draft7Validator(schema).validate(obj)
    assert pruned(obj, schema) == []
    spec = obj["spec"]  # the CRD's CEL rule, which jsonschema does not run
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    for trigger in spec["triggers"]:
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert set(meta) <= KEDA_NATS_KEYS and KEDA_NATS_REQUIRED <= set(meta)
        assert all(isinstance(v, str) for v in meta.values())  # KEDA metadata is strings


def test_k8s_crd_check_catches_a_field_keda_would_drop() -> None:
    bad = copy.deepcopy(of_kind("ScaledObject")[0])
    bad["spec"]["minReplicas"] = 0
    assert pruned(bad, _crd_schema()) == [".spec.minReplicas"]


def _values_errors(values: Any, tree: Any, path: str = "") -> list[str]:
    kinds = {"bool": bool, "int": int, "string": str, "list": list, "map": dict}
    if isinstance(tree, dict):
        if not isinstance(values, dict):
            return [f"{path}: a map in the chart, {type(values).__name__} here"]
        out = []
        for key, value in values.items():
            if key not in tree:
                out.append(f"{path}.{key}: not a key of the chart")
            else:
                out += _values_errors(value, tree[key], f"{path}.{key}")
        return out
    if tree == "any" or isinstance(values, kinds[tree]):
        return []
    return [f"{path}: {tree} in the chart, {type(values).__name__} here"]


def test_k8s_nats_values_use_only_keys_the_chart_reads() -> None:
    tree = json.loads(NATS_KEYS.read_text())["values"]
    assert _values_errors(nats_values(), tree) == []
    assert _values_errors({"config": {"jetstream": {"fileStorage": {}}}}, tree) == [
        ".config.jetstream.fileStorage: not a key of the chart"]


def test_k8s_nats_values_match_what_cplane_and_keda_use() -> None:
    v = nats_values()
    cfg = v["config"]
    assert cfg["cluster"]["enabled"] and cfg["jetstream"]["enabled"]
    settings = config_settings()
    from cplane.bus.stream_config import store_configs, stream_configs

    # every stream and store R3 on the chart's 3-node cluster (an R3 stream needs 3 nodes)
    replicas = {c.name: c.num_replicas for c in
                [*stream_configs(settings), *store_configs(settings).values()]}
    assert set(replicas.values()) == {cfg["cluster"]["replicas"]} == {3}, replicas
    assert cfg["merge"]["max_payload"] == "<< 8MB >>"
    assert cfg["jetstream"]["merge"]["sync_interval"] == "<< 100ms >>"
    assert cfg["merge"]["00$include"] == "accounts.conf"
    port = cfg["monitor"]["port"]
    for so in of_kind("ScaledObject"):
        for t in so["spec"]["triggers"]:
            assert t["metadata"]["natsServerMonitoringEndpoint"] == (
                f"nats-headless.cplane.svc.cluster.local:{port}")
    assert v["service"]["ports"]["monitor"]["enabled"] is False  # 8222 not on the client service


def test_k8s_nats_pods_pass_the_restricted_standard() -> None:
    v = nats_values()
    pod = v["podTemplate"]["merge"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    _check_pod_security(pod["securityContext"])
    for name, c in (("nats", v["container"]), ("reloader", v["reloader"])):
        _check_container_security(c["merge"]["securityContext"], name)
        res = c.get("resources") or c["merge"]["resources"]
        _check_resources(res, name)
    assert v["natsBox"]["enabled"] is False and not v.get("promExporter", {}).get("enabled")


# -- every pod ----------------------------------------------------------------------------


def _check_pod_security(sc: dict[str, Any]) -> None:
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert isinstance(sc["runAsGroup"], int) and sc["runAsGroup"] > 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def _check_container_security(sc: dict[str, Any], name: str) -> None:
    assert sc["allowPrivilegeEscalation"] is False, name
    assert sc["readOnlyRootFilesystem"] is True, name
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
    assert not sc.get("privileged"), name


def _quantity(q: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    s = str(q)
    for unit, factor in units.items():
        if s.endswith(unit):
            return float(s[: -len(unit)]) * factor
    return float(s)


def _check_resources(res: dict[str, Any], name: str) -> None:
    for kind in ("cpu", "memory"):
        req, lim = res["requests"][kind], res["limits"][kind]
        assert _quantity(req) <= _quantity(lim), f"{name}: {kind} request over its limit"


@pytest.mark.parametrize("obj", WORKLOADS, ids=ids(WORKLOADS))
def test_k8s_pod_is_locked_down(obj: dict[str, Any]) -> None:
    spec = pod_spec(obj)
    assert spec is not None
    _check_pod_security(spec["securityContext"])
    assert spec["automountServiceAccountToken"] is False  # none of them calls the API
    account = named("ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any("hostPath" in v for v in volumes.values())
    for c in spec["containers"]:
        _check_container_security(c["securityContext"], c["name"])
        _check_resources(c["resources"], c["name"])
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on the read-only root"
        for m in c["volumeMounts"]:  # what is not scratch space is mounted read-only
            if "emptyDir" not in volumes[m["name"]]:
                assert m.get("readOnly") is True, m["mountPath"]
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"]["defaultMode"] & 0o007 == 0, "secrets not world-readable"


@pytest.mark.parametrize("obj", WORKLOADS, ids=ids(WORKLOADS))
def test_k8s_writable_caches_are_on_emptydirs(obj: dict[str, Any]) -> None:
    spec = pod_spec(obj)
    assert spec is not None
    scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for c in spec["containers"]:
        dirs = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in scratch]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for key in CACHE_ENV:
            if key in env:
                assert any(str(env[key]).startswith(d) for d in dirs), f"{key}={env[key]}"
        if arg(c, "--engine") == "vllm":
            assert VLLM_CACHE_ENV <= set(env), f"vLLM caches unset: {VLLM_CACHE_ENV - set(env)}"
            shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm and any(v["emptyDir"].get("medium") == "Memory"
                               for v in spec["volumes"] if v["name"] == shm[0]["name"])


@pytest.mark.parametrize("obj", WORKLOADS, ids=ids(WORKLOADS))
def test_k8s_probes_ask_the_endpoints_the_process_serves(obj: dict[str, Any]) -> None:
    spec = pod_spec(obj)
    assert spec is not None
    (c,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    role = component(obj)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port in ports.values(), f"{probe}: port {get['port']} is no containerPort"
        assert get["path"] in SERVED[role], f"{probe}: {get['path']} is not served"
        assert c[probe]["timeoutSeconds"] >= 4  # above bus/prom.py's 3 s loop check
    scrape = obj["spec"]["template"]["metadata"]["annotations"]  # prometheus.yml's job
    assert scrape["prometheus.io/scrape"] == "true"
    assert int(scrape["prometheus.io/port"]) == ports["http" if role == "gateway" else "metrics"]
    if role == "gateway":
        assert arg(c, "--host") == "0.0.0.0" and int(str(arg(c, "--port"))) == ports["http"]
        return
    assert c["livenessProbe"]["httpGet"]["path"] == LIVE_PATH  # never restart for a dependency
    assert c["readinessProbe"]["httpGet"]["path"] == READY_PATH
    m = effective_settings(c).metrics
    assert m.host == "0.0.0.0"  # the kubelet and Prometheus come from outside the pod
    assert (m.orchestrator_port if role == "orchestrator" else m.worker_port) == ports["metrics"]


def test_k8s_orchestrator_runs_two_behind_a_disruption_budget() -> None:
    orch = named("Deployment", "orchestrator")
    assert orch["spec"]["replicas"] == 2
    labels = orch["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [p for p in of_kind("PodDisruptionBudget")
              if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert pdb["spec"]["minAvailable"] == 1
    for p in of_kind("PodDisruptionBudget"):  # no budget guards nothing
        assert any(p["spec"]["selector"]["matchLabels"].items()
                   <= w["spec"]["template"]["metadata"]["labels"].items() for w in WORKLOADS)
    for w in WORKLOADS:  # a selector that matches its own pods
        assert w["spec"]["selector"]["matchLabels"].items() <= (
            w["spec"]["template"]["metadata"]["labels"].items())


def test_k8s_gateway_service_reaches_the_gateway_pods() -> None:
    svc = named("Service", "gateway")
    gw = named("Deployment", "gateway")
    assert svc["spec"]["selector"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in gw["spec"]["template"]["spec"]
                                  ["containers"][0]["ports"]}


def test_k8s_images_are_pinned() -> None:
    for w in WORKLOADS:
        for c in pod_spec(w)["containers"]:  # type: ignore[index]
            _, tag, digest = split_image(c["image"])
            assert digest or (tag and tag != "latest"), f"{c['image']} moves"


# -- workers and KEDA ---------------------------------------------------------------------


WORKERS = of_kind("StatefulSet")


@pytest.mark.parametrize("obj", WORKERS, ids=ids(WORKERS))
def test_k8s_worker_pool_holds_one_gpu_per_pod(obj: dict[str, Any]) -> None:
    spec = pod_spec(obj)
    assert spec is not None
    (c,) = spec["containers"]
    assert arg(c, "--engine") == "vllm" and arg(c, "--worker-id") == "$(POD_NAME)"
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        spec["tolerations"])
    assert "replicas" not in obj["spec"]  # KEDA owns the count
    settings = effective_settings(c)
    assert int(str(arg(c, "--capacity"))) == settings.worker.capacity


def _worker_consumers(sts: dict[str, Any]) -> tuple[Role, set[str]]:
    """The role of a pool and the pool consumers its workers create (workers/runtime.py:
    the role's `any` pool and each served model's pool; a worker's own is not a pool)."""
    (c,) = pod_spec(sts)["containers"]  # type: ignore[index]
    role = Role(arg(c, "--role"))
    model = arg(c, "--served-model-name") or str(arg(c, "--model"))
    return role, {consumer_for_work(role, ANY_TARGET), consumer_for_work(role, model_target(model))}


def test_k8s_every_worker_pool_is_scaled_on_a_consumer_its_workers_create() -> None:
    scaled = {}
    for so in of_kind("ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]
        assert ref["apiVersion"] == "apps/v1"
        target = named(ref["kind"], ref["name"])  # an object of this base
        role, consumers = _worker_consumers(target)
        work = [t["metadata"] for t in so["spec"]["triggers"]
                if t["metadata"]["stream"] == "LLM_WORK"]
        assert work, "no trigger on the pool's own work"
        for meta in work:
            assert meta["consumer"] in consumers, f"{so['metadata']['name']}: {meta['consumer']}"
            if role is Role.DECODE:  # prefill hands decode work to the model's pool only
                assert meta["consumer"] != consumer_for_work(role, ANY_TARGET)
            assert meta["account"] == "CPLANE"
        scaled[ref["name"]] = so
    assert set(scaled) == {w["metadata"]["name"] for w in WORKERS}


def test_k8s_scaling_signal_fits_the_dispatch_bound() -> None:
    """KEDA counts messages: one request per message, and a threshold below what the
    orchestrator dispatches per worker, or the pool never grows."""
    s = config_settings()
    assert s.orchestrator.max_batch == 1
    assert s.streams.work.name == "LLM_WORK"
    bound = s.worker.capacity * (1 + s.orchestrator.headroom)
    for so in of_kind("ScaledObject"):
        assert so["spec"]["minReplicaCount"] >= 1  # 0 needs the LLM_REQ wake triggers
        for t in so["spec"]["triggers"]:
            assert 0 < int(t["metadata"]["lagThreshold"]) < bound
            assert t["metadata"]["activationLagThreshold"] == "0"


def test_k8s_scale_to_zero_wake_consumers_are_the_orchestrators() -> None:
    text = (K8S_DIR / "keda-scaledobjects.yaml").read_text()
    block = text[text.index("Scale to zero"):text.index("Which consumer carries")]
    for p in PRIORITIES:  # the documented wake triggers name real LLM_REQ consumers
        assert f"orch-{p.value}" in block


# -- networking ---------------------------------------------------------------------------


POLICIES = of_kind("NetworkPolicy")
NS_LABELS = {**named("Namespace", "cplane")["metadata"]["labels"],
             "kubernetes.io/metadata.name": "cplane"}


def _pod(obj: dict[str, Any]) -> Endpoint:
    return Endpoint(obj["metadata"]["name"], "cplane",
                    obj["spec"]["template"]["metadata"]["labels"], NS_LABELS)


PODS = {w["metadata"]["name"]: _pod(w) for w in WORKLOADS}
NATS = Endpoint("nats-0", "cplane", NATS_POD_LABELS, NS_LABELS)
DNS = Endpoint("coredns", "kube-system", {"k8s-app": "kube-dns"},
               {"kubernetes.io/metadata.name": "kube-system"})
KEDA = Endpoint("keda-operator", "keda", {"app": "keda-operator"},
                {"kubernetes.io/metadata.name": "keda"})
PROM = Endpoint("prometheus", "monitoring", {"app": "prometheus"},
                {"kubernetes.io/metadata.name": "monitoring", "cplane.io/scrape-metrics": "true"})
STRANGER = Endpoint("stranger", "default", {"app": "x"}, {"kubernetes.io/metadata.name": "default"})
INTERNET = Endpoint("internet", ip="203.0.113.7")


def test_k8s_network_policies_cover_every_pod_with_default_deny() -> None:
    deny = [p for p in POLICIES if p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny policy"
    for pod in [*PODS.values(), NATS]:
        assert allowed(POLICIES, pod, DNS, 53, "UDP"), pod.name
        assert not allowed(POLICIES, pod, INTERNET, 443), f"{pod.name} reaches the internet"
        assert not allowed(POLICIES, STRANGER, pod, 4222), f"{pod.name} open to strangers"


@pytest.mark.parametrize("name", sorted(PODS))
def test_k8s_each_role_reaches_only_nats_and_dns(name: str) -> None:
    pod = PODS[name]
    assert allowed(POLICIES, pod, NATS, 4222)
    assert allowed(POLICIES, pod, DNS, 53, "UDP") and allowed(POLICIES, pod, DNS, 53, "TCP")
    for port in (6222, 8222):  # routes and monitoring are not for clients
        assert not allowed(POLICIES, pod, NATS, port)
    assert not allowed(POLICIES, pod, KEDA, 443) and not allowed(POLICIES, pod, PROM, 9090)
    pd = {"worker-prefill", "worker-decode"}
    for other_name, other in PODS.items():
        if other_name == name:
            continue
        for port in (8000, 9100, 5600):
            want = name in pd and other_name in pd  # NIXL between prefill and decode only
            assert allowed(POLICIES, pod, other, port) is want, (name, other_name, port)


def test_k8s_nats_accepts_its_clients_its_peers_and_keda_only() -> None:
    for pod in PODS.values():
        assert allowed(POLICIES, pod, NATS, 4222)
    peer = Endpoint("nats-1", "cplane", NATS_POD_LABELS, NS_LABELS)
    assert allowed(POLICIES, NATS, peer, 6222)
    assert not allowed(POLICIES, NATS, peer, 4222)
    assert allowed(POLICIES, KEDA, NATS, 8222)
    for stranger in (STRANGER, PROM, INTERNET):
        for port in (4222, 6222, 8222):
            assert not allowed(POLICIES, stranger, NATS, port), (stranger.name, port)
    for pod in PODS.values():  # NATS opens no connection to the services
        assert not allowed(POLICIES, NATS, pod, 9100)


def test_k8s_gateway_takes_clients_and_prometheus_scrapes_metrics() -> None:
    gateway = PODS["gateway"]
    for client in (STRANGER, INTERNET, PROM):
        assert allowed(POLICIES, client, gateway, 8000)
        assert not allowed(POLICIES, client, gateway, 9100)
    for name in ("orchestrator", "worker-unified", "worker-prefill", "worker-decode"):
        assert allowed(POLICIES, PROM, PODS[name], 9100)
        unlabelled = Endpoint("prom2", "monitoring", {"app": "prometheus"},
                              {"kubernetes.io/metadata.name": "monitoring"})
        assert not allowed(POLICIES, unlabelled, PODS[name], 9100)
        assert not allowed(POLICIES, STRANGER, PODS[name], 9100)


# -- the renderer itself ------------------------------------------------------------------


def test_k8s_render_sets_images_and_refuses_what_it_does_not_apply(tmp_path: Path) -> None:
    assert split_image("registry:5000/a/b:1.2@sha256:" + "0" * 64) == (
        "registry:5000/a/b", "1.2", "sha256:" + "0" * 64)
    assert split_image("registry:5000/a/b") == ("registry:5000/a/b", None, None)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x/app:1"}]}}}}))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "n", "resources": ["d.yaml"],
        "images": [{"name": "x/app", "newName": "reg/app", "newTag": "2"}]}))
    (d,) = render(tmp_path)
    assert d["metadata"]["namespace"] == "n"
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/app:2"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["d.yaml"], "patches": [{"path": "p.yaml"}]}))
    with pytest.raises(ValueError, match="patches"):
        render(tmp_path)
