"""The deploy files checked offline: the validators of `make compose-check` / `make k8s-check`, then what
the schemas cannot say (probes, resources, security, grace periods, network reach, autoscaling)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from chorus.devtools import deploy_check
from chorus.devtools.compose import load_project, load_yaml, read_env_file
from services.dialogue.settings import DialogueSettings
from services.gateway.settings import GatewaySettings
from services.router.settings import RouterSettings
from services.tts.settings import TtsSettings
from shared import metrics
from shared.runtime import DRAIN_TIMEOUT_S

ROOT = deploy_check.ROOT
CHORUS_SERVICES = ("gateway", "router", "dialogue", "tts")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Shutdown after the drain (HTTP server exit, presence key deleted, Redis closed).
SHUTDOWN_S = 5
OVERLAYS = ("gpu", "cpu-dev")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization, rendered by `kubectl kustomize`: {"base": [...], "gpu": [...], ...}."""
    return {path.name: deploy_check.render(path) for path in deploy_check.kustomizations()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_project([deploy_check.COMPOSE_FILE], read_env_file(deploy_check.ENV_EXAMPLE))


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return str(obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def workload(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o in workloads(objects) if component(o) == name)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector applied to a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("500m", "2", "512Mi", "1Gi") as a number."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match[2] in ("", *suffixes), f"not a quantity: {value!r}"
    return float(match[1]) * suffixes.get(match[2], 1)


def dockerfile_cmds() -> dict[str, list[str]]:
    """Stage name -> its CMD, for every stage of every Dockerfile that has one."""
    cmds = {}
    for path in deploy_check.DOCKERFILES:
        for stage in re.split(r"^FROM ", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
            name = re.match(r"\S+\s+AS\s+(\S+)", stage, re.I)
            cmd = re.findall(r"^CMD (\[.*\])$", stage, re.M)
            if name and cmd:
                cmds[name[1]] = json.loads(cmd[-1])
    return cmds


# ---- the offline validators (the same functions `make compose-check` / `make k8s-check` run) ----


def test_compose_files_follow_the_compose_specification_alone_and_merged() -> None:
    assert deploy_check.compose_problems() == []


def test_dockerfiles_pass_hadolint() -> None:
    assert deploy_check.dockerfile_problems() == []


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_each_kustomization_renders_and_matches_the_kubernetes_schemas(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    assert rendered[name], f"{name} rendered nothing"
    assert deploy_check.k8s_object_problems(rendered[name], name) == []


def test_the_validators_reject_broken_files(
    tmp_path: Path, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    bad_compose = {"services": {"a": {"image": "x", "depends_on": {"redis": {"condition": "healthy"}}}}}
    assert deploy_check.schema_errors(bad_compose, "bad")
    deployment = json.loads(json.dumps(of_kind(rendered["gpu"], "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert deploy_check.k8s_object_problems([deployment], "bad")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:latest\nRUN apt-get install curl\n", encoding="utf-8")
    assert deploy_check.dockerfile_problems([dockerfile])


# ---- Kubernetes: what the schemas cannot say ----


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_read_only_with_probes_and_resources(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    found = set()
    for obj in workloads(rendered[overlay]):
        name, pod = component(obj), obj["spec"]["template"]["spec"]
        found.add(name)
        assert pod["enableServiceLinks"] is False, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), name
            assert quantity(resources["limits"]["memory"]) >= quantity(resources["requests"]["memory"]), name
            assert container["livenessProbe"] and container["readinessProbe"], name
            if name in CHORUS_SERVICES:
                assert container["startupProbe"]["httpGet"]["path"] == "/healthz", name
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
    assert found == {*CHORUS_SERVICES, "redis"}


def test_model_load_gets_a_longer_startup_window_than_the_slim_services(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    def startup_window_s(name: str) -> int:
        probe = workload(rendered["gpu"], name)["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        return int(probe["periodSeconds"] * probe["failureThreshold"])

    assert startup_window_s("dialogue") >= 600
    assert startup_window_s("tts") >= 300
    assert startup_window_s("gateway") < startup_window_s("tts")


def test_torch_workers_get_a_memory_backed_dev_shm(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("dialogue", "tts"):
        pod = workload(rendered["gpu"], name)["spec"]["template"]["spec"]
        shm = [m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name} has no /dev/shm mount"
        volume = next(v for v in pod["volumes"] if v["name"] == shm[0])
        assert volume["emptyDir"]["medium"] == "Memory"


def test_grace_periods_outlast_the_services_sigterm_drain(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    for obj in workloads(rendered["gpu"]):
        if component(obj) not in CHORUS_SERVICES:
            continue
        pod = obj["spec"]["template"]["spec"]
        pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pre_stop_s = int(pre_stop["command"][1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
        assert pod["terminationGracePeriodSeconds"] > pre_stop_s + DRAIN_TIMEOUT_S + SHUTDOWN_S, component(
            obj
        )
    gateway = workload(rendered["gpu"], "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep", "the gateway leaves its endpoint"
    for name in CHORUS_SERVICES:
        grace = compose["services"][name]["stop_grace_period"]
        assert int(grace.removesuffix("s")) > DRAIN_TIMEOUT_S + SHUTDOWN_S, name


def test_only_the_gateway_is_reachable_from_outside_the_namespace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["gpu"]
    pods = {component(o): o["spec"]["template"]["metadata"]["labels"] for o in workloads(objects)}
    policies = of_kind(objects, "NetworkPolicy")
    deny_all = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny_all and set(deny_all[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    open_to = set()
    for policy in policies:
        selected = {name for name, labels in pods.items() if matches(policy["spec"]["podSelector"], labels)}
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            if not peers:
                open_to |= selected
            for peer in peers:
                if "namespaceSelector" in peer:  # only Prometheus' namespace, only the metrics ports
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "monitoring"
                    }
                    assert all(
                        8000 <= p["port"] <= p.get("endPort", p["port"]) <= 8003 for p in rule["ports"]
                    )
                else:
                    assert "ipBlock" not in peer, policy["metadata"]["name"]
                    if "redis" in selected:
                        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "chorus"}}
    assert open_to == {"gateway"}


def test_every_chorus_service_may_reach_redis_and_dns(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu"]
    pods = {component(o): o["spec"]["template"]["metadata"]["labels"] for o in workloads(objects)}
    for name in CHORUS_SERVICES:
        rules = [
            rule
            for policy in of_kind(objects, "NetworkPolicy")
            if matches(policy["spec"]["podSelector"], pods[name])
            for rule in policy["spec"].get("egress", [])
        ]
        to_redis = [
            r
            for r in rules
            if any(matches(peer.get("podSelector", {}), pods["redis"]) for peer in r.get("to", []))
            and {"protocol": "TCP", "port": 6379} in r["ports"]
        ]
        assert to_redis, f"{name} cannot reach redis"
        assert any(not r.get("to") and {"protocol": "UDP", "port": 53} in r["ports"] for r in rules), name


def test_the_dialogue_hpa_scales_on_the_metric_the_adapter_rule_serves(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (hpa,) = of_kind(rendered["gpu"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "chorus-dialogue",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    values = load_yaml(deploy_check.K8S_DIR / "monitoring" / "prometheus-adapter-values.yaml")
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    rule = rules[metric["pods"]["metric"]["name"]]
    # The gauges the workers export (shared/metrics.py) are what the rule reads.
    assert metrics.WORKER_SLOTS_FREE._name in rule["seriesQuery"]
    assert metrics.WORKER_SLOTS_FREE._name in rule["metricsQuery"]
    assert metrics.WORKER_SLOTS_TOTAL._name in rule["metricsQuery"]
    assert 0 < quantity(metric["pods"]["target"]["averageValue"]) < 1, "a utilisation target, 0..1"
    assert not of_kind(rendered["cpu-dev"], "HorizontalPodAutoscaler"), "cpu-dev has no metrics adapter"


def test_the_gpu_overlay_gives_each_dialogue_worker_one_gpu_and_cpu_dev_none(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    gpu_pod = workload(rendered["gpu"], "dialogue")["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    cpu_pod = workload(rendered["cpu-dev"], "dialogue")["spec"]["template"]["spec"]
    assert "nvidia" not in json.dumps(cpu_pod)
    assert cpu_pod["containers"][0]["image"].split(":")[0].endswith("dialogue-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_reads_its_api_keys_from_the_secret_mounted_as_a_file(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    pod = workload(rendered[overlay], "gateway")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    keys_file = next(e["value"] for e in container["env"] if e["name"] == "CHORUS_API_KEYS_FILE")
    mount = next(m for m in container["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "chorus-api-keys"
    assert not volume["secret"].get("optional"), "without keys the gateway must not start with auth off"
    secrets = [o for o in rendered[overlay] if o["kind"] == "Secret"]
    # cpu-dev generates a development key; production creates the Secret itself, so no key is committed.
    assert [s["metadata"]["name"] for s in secrets] == (["chorus-api-keys"] if overlay == "cpu-dev" else [])


# ---- the same service everywhere ----


def test_each_service_runs_the_same_command_in_its_image_compose_and_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    cmds = dockerfile_cmds()
    for name in CHORUS_SERVICES:
        expected = ["chorus", name]
        target = compose["services"][name]["build"]["target"]
        assert cmds[target] == expected, f"Dockerfile stage {target}"
        assert compose["services"][name]["command"] == expected, f"compose {name}"
        for overlay in OVERLAYS:
            assert (
                workload(rendered[overlay], name)["spec"]["template"]["spec"]["containers"][0]["command"]
                == expected
            )
    assert cmds["dialogue-cpu"] == ["chorus", "dialogue"]


def test_every_chorus_variable_in_the_deploy_files_is_a_setting(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    settings = {
        f"CHORUS_{field.upper()}"
        for cls in (GatewaySettings, DialogueSettings, TtsSettings, RouterSettings)
        for field in cls.model_fields
    }
    used = set(read_env_file(deploy_check.ENV_EXAMPLE))
    used |= {key for service in compose["services"].values() for key in service.get("environment", {})}
    for objects in rendered.values():
        used |= {key for cm in of_kind(objects, "ConfigMap") for key in cm.get("data", {})}
        for obj in workloads(objects):
            used |= {
                e["name"] for c in obj["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
            }
    unknown = {name for name in used if name.startswith("CHORUS_")} - settings
    assert not unknown, f"not settings (typo, or a setting that was renamed): {sorted(unknown)}"


def test_base_images_are_pinned_by_tag_and_digest(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    pinned = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
    bases = [
        image
        for path in deploy_check.DOCKERFILES
        for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", path.read_text(encoding="utf-8"), re.M)
    ]
    assert len(bases) == len(deploy_check.DOCKERFILES)
    redis_images = [compose["services"]["redis"]["image"]]
    redis_images += [
        workload(rendered[o], "redis")["spec"]["template"]["spec"]["containers"][0]["image"] for o in OVERLAYS
    ]
    for image in bases + redis_images:
        assert pinned.match(image), image


def test_redis_keeps_no_persistence_in_compose_and_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    redis_pod = workload(rendered["gpu"], "redis")["spec"]["template"]["spec"]
    for args in (compose["services"]["redis"]["command"], redis_pod["containers"][0]["args"]):
        assert args[args.index("--save") + 1] == ""
        assert args[args.index("--appendonly") + 1] == "no"
    assert "volumeClaimTemplates" not in workload(rendered["gpu"], "redis")["spec"]


# ---- compose: what the schema cannot say ----


def test_compose_reserves_a_gpu_for_dialogue_and_the_cpu_override_drops_it(compose: dict[str, Any]) -> None:
    (device,) = compose["services"]["dialogue"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    cpu = load_project(deploy_check.COMPOSE_STACKS[1], read_env_file(deploy_check.ENV_EXAMPLE))
    assert "nvidia" not in json.dumps(cpu["services"]), "compose.cpu.yml must run with no GPU"
    assert cpu["services"]["dialogue"]["build"]["target"] == "dialogue-cpu"


def test_compose_keeps_voice_profiles_and_the_model_cache_in_named_volumes(compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        mounts = dict(reversed(v.split(":")[:2]) for v in service.get("volumes", []))
        for variable in ("CHORUS_DATA_DIR", "HF_HOME"):
            if variable in env:
                mount = next((m for m in mounts if env[variable].startswith(m)), None)
                assert mount and mounts[mount] in named, f"{name}: {variable} is not on a named volume"
    assert {"CHORUS_DATA_DIR", "HF_HOME"} <= set(compose["services"]["dialogue"]["environment"])
    assert "CHORUS_DATA_DIR" in compose["services"]["gateway"]["environment"]


def test_compose_publishes_only_the_gateway_and_on_loopback_by_default(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert list(published) == ["gateway"]
    assert published["gateway"] == ["127.0.0.1:8000:8000"]


def test_worker_health_servers_listen_on_the_pod_ip_in_kubernetes_and_loopback_in_compose(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    """Loopback is the default (shared/runtime.py); the kubelet's probes and Prometheus reach a pod on its
    IP, so the manifests bind that. Compose's health checks run inside the container, on loopback."""
    for name in ("router", "dialogue", "tts"):
        variable = f"CHORUS_{name.upper()}_HTTP_HOST"
        for overlay in OVERLAYS:
            container = workload(rendered[overlay], name)["spec"]["template"]["spec"]["containers"][0]
            host = next(e for e in container["env"] if e["name"] == variable)
            assert host["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, (overlay, name)
        service = compose["services"][name]
        assert variable not in service.get("environment", {}) and "expose" not in service, name
        assert "127.0.0.1" in " ".join(service["healthcheck"]["test"]), name
