"""The deployments (Dockerfile, compose.yaml, k8s/) checked offline: k8s/ and its overlays
rendered with `kubectl kustomize` and validated strictly against the Kubernetes schemas,
compose.yaml against the compose specification, and all of them against the code: image
names, service modules, WISP_* variables (the config dataclasses' fields), HTTP ports and
health routes. No container runtime can start containers on these machines, so nothing here
runs an image."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import BaseConfig
from common.protocol import MAX_PAYLOAD_BYTES

ROOT = Path(__file__).resolve().parents[2]
K8S_TARGETS = ["k8s", "k8s/overlays/cpu", "k8s/overlays/gpu"]
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests must be valid for
IMAGE_REPO = "wisp"
CUDA_TAG_SUFFIX = "-cuda"


# --- loading -------------------------------------------------------------------------------


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render k8s/ with `kubectl kustomize`")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / target)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


@functools.cache
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@dataclasses.dataclass
class Dockerfile:
    env: dict[str, str]  # of the final stage
    expose: set[int]
    cmd: list[str] | None
    entrypoint: list[str] | None
    user: str | None
    healthcheck: str | None


@functools.cache
def dockerfile() -> Dockerfile:
    text = (ROOT / "Dockerfile").read_text()
    df = Dockerfile({}, set(), None, None, None, None)
    for line in re.sub(r"\\\n", " ", text).splitlines():  # join continuation lines
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        args = args.strip()
        match instruction.upper():
            case "FROM":  # a new stage: only the last one's settings are the image's
                df = Dockerfile({}, set(), None, None, None, None)
            case "ENV":
                for pair in shlex.split(args):
                    key, _, value = pair.partition("=")
                    df.env[key] = value
            case "EXPOSE":
                df.expose |= {int(p.split("/")[0]) for p in args.split()}
            case "CMD":
                df.cmd = json.loads(args)
            case "ENTRYPOINT":
                df.entrypoint = json.loads(args)
            case "USER":
                df.user = args
            case "HEALTHCHECK":
                df.healthcheck = args
    return df


@functools.cache
def service_configs() -> dict[str, type]:
    """Each service module (`services.<name>`, the ones with a __main__) → its config class."""
    configs = {}
    for main in sorted((ROOT / "services").glob("*/__main__.py")):
        module = f"services.{main.parent.name}"
        namespace = vars(importlib.import_module(module + ".__main__"))
        found = [obj for obj in namespace.values() if isinstance(obj, type)
                 and issubclass(obj, BaseConfig) and obj is not BaseConfig]
        assert len(found) == 1, f"{module}: expected one config class, found {found}"
        configs[module] = found[0]
    return configs


def env_names(cls: type) -> set[str]:
    return {"WISP_" + f.name.upper() for f in dataclasses.fields(cls)}


def service_module(command: list[str] | str | None) -> str | None:
    """`python -m services.x` → services.x; None for other commands (servers, loadgen)."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command and command[:2] == ["python", "-m"] and command[2].startswith("services."):
        return command[2]
    return None


def compose_wisp_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items()
            if service_module(svc.get("command"))}


def compose_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def k8s_containers(docs: tuple[dict, ...]) -> list[tuple[dict, dict]]:
    """(pod template spec, container) of every wisp container in Deployments."""
    return [(d["spec"]["template"]["spec"], c) for d in docs if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]
            if service_module(c.get("command"))]


def k8s_env(docs: tuple[dict, ...], container: dict) -> dict[str, str | None]:
    """What the container sees: envFrom ConfigMaps first, `env` overriding (None: valueFrom)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def http_port(env: dict[str, str | None], module: str) -> int:
    """The port the service listens on: its environment, else the image's, else its default."""
    value = env.get("WISP_HTTP_PORT") or dockerfile().env.get("WISP_HTTP_PORT")
    return int(value) if value else service_configs()[module]().http_port


def launched_modules() -> set[str]:
    """The services `wisp up` (the embedded default) starts."""
    from services.stack.launcher import plan_services, stack_options

    return {svc.module for svc in plan_services(stack_options())}


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", K8S_TARGETS)
def test_k8s_renders_and_every_resource_is_valid(target):
    import kubernetes_validate

    docs = render(target)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("StatefulSet", "nats"), ("StatefulSet", "redis"), ("Service", "nats"),
                     ("Service", "redis"), ("PodDisruptionBudget", "gpu-verifier"),
                     ("HorizontalPodAutoscaler", "edge-drafter")]:
        assert expected in kinds, f"{target}: no {expected}"
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap"}
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"wisp"}


def test_compose_matches_the_compose_specification():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- agreement with the code ---------------------------------------------------------------


def test_every_deployment_starts_the_services_wisp_up_starts():
    modules = launched_modules()
    assert modules <= set(service_configs())  # each has a __main__ (python -m works)
    compose_modules = {service_module(s["command"]) for s in compose_wisp_services().values()}
    assert compose_modules == modules
    for target in K8S_TARGETS:
        assert {service_module(c["command"]) for _, c in k8s_containers(render(target))} \
            == modules, target
    loadgen = compose()["services"]["loadgen"]
    assert loadgen["profiles"] == ["loadgen"]
    assert loadgen["command"][:2] == ["loadgen", "replay"]
    assert loadgen["command"][loadgen["command"].index("--nats-url") + 1] == "nats://nats:4222"
    trace = loadgen["command"][loadgen["command"].index("--trace") + 1]
    assert (ROOT / trace.removeprefix("/app/")).is_file()


def test_compose_and_k8s_run_the_same_image():
    images = {name: svc["image"] for name, svc in compose()["services"].items()
              if service_module(svc.get("command")) or name == "loadgen"}
    default = {img for name, img in images.items()
               if not compose()["services"][name].get("profiles") or name == "loadgen"}
    gpu = {images[name] for name, svc in compose()["services"].items()
           if "gpu" in svc.get("profiles", [])}
    assert len(default) == 1 and len(gpu) == 1, images
    (default_image,), (gpu_image,) = default, gpu
    assert default_image.split(":")[0] == IMAGE_REPO
    assert gpu_image == default_image + CUDA_TAG_SUFFIX
    for target, image in [("k8s", default_image), ("k8s/overlays/cpu", default_image),
                          ("k8s/overlays/gpu", gpu_image)]:
        assert {c["image"] for _, c in k8s_containers(render(target))} == {image}, target


def test_every_wisp_variable_is_a_config_field_of_its_service():
    configs = service_configs()
    everywhere = env_names(BaseConfig)
    image_vars = {k for k in dockerfile().env if k.startswith("WISP_")}
    assert image_vars <= everywhere, f"the image sets {image_vars - everywhere} for every service"
    for name, svc in compose_wisp_services().items():
        module = service_module(svc["command"])
        unknown = {k for k in compose_env(svc) if k.startswith("WISP_")} - env_names(
            configs[module])
        assert not unknown, f"compose service {name} ({module}) gets unknown {unknown}"
    for target in K8S_TARGETS:
        docs = render(target)
        for _, container in k8s_containers(docs):
            module = service_module(container["command"])
            unknown = {k for k in k8s_env(docs, container) if k.startswith("WISP_")} - env_names(
                configs[module])
            assert not unknown, f"{target}: {container['name']} ({module}) gets unknown {unknown}"


def test_services_listen_on_all_interfaces_only_in_containers():
    assert BaseConfig().http_host == "127.0.0.1"  # local runs keep the loopback default
    assert dockerfile().env["WISP_HTTP_HOST"] == "0.0.0.0"
    for name, svc in compose_wisp_services().items():
        assert compose_env(svc).get("WISP_HTTP_HOST", "0.0.0.0") == "0.0.0.0", name
    for target in K8S_TARGETS:
        docs = render(target)
        for _, container in k8s_containers(docs):
            assert k8s_env(docs, container).get("WISP_HTTP_HOST") == "0.0.0.0", container["name"]


def test_health_checks_probe_the_ports_the_services_listen_on():
    for name, svc in compose_wisp_services().items():
        port = http_port(compose_env(svc), service_module(svc["command"]))
        test = " ".join(svc["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in test, f"compose {name}: {test}"
        assert port in dockerfile().expose, f"compose {name}: port {port} not exposed"
        assert all(dep.get("condition") == "service_healthy"
                   for dep in svc["depends_on"].values()), name
        assert svc["restart"] == "unless-stopped", name
    for target in K8S_TARGETS:
        docs = render(target)
        for _, container in k8s_containers(docs):
            port = http_port(k8s_env(docs, container), service_module(container["command"]))
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
                get = container[probe]["httpGet"]
                assert get["path"] == path, (target, container["name"], probe)
                assert ports.get(get["port"], get["port"]) == port, (target, container["name"])
            assert port in dockerfile().expose, (target, container["name"], port)
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        for _, container in k8s_containers(docs):
            svc_ports = services[container["name"]]["spec"]["ports"]
            assert [p["targetPort"] for p in svc_ports] == ["http"], container["name"]


async def test_the_probed_routes_exist():
    import aiohttp

    from common.transport.service import start_http

    class Probed:
        name = "probed"

        def ready(self) -> bool:
            return True

        def routes(self) -> list:
            return []

    runner, port = await start_http(Probed(), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/readyz", "/healthz"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 200, path
    finally:
        await runner.cleanup()


def test_dockerfile_entry_point_user_and_ports():
    df = dockerfile()
    # No ENTRYPOINT: compose's and k8s's `python -m services.<name>` commands run as given.
    assert df.entrypoint is None
    assert df.cmd[:2] == ["python", "-m"] and (ROOT / df.cmd[2].replace(".", "/")).with_suffix(
        ".py").is_file()
    assert int(df.env["WISP_HTTP_PORT"]) in df.expose
    assert "/readyz" in df.healthcheck and "WISP_HTTP_PORT" in df.healthcheck
    uid = int(df.user.split(":")[0])
    assert uid != 0
    for target in K8S_TARGETS:
        for pod, container in k8s_containers(render(target)):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == uid, container["name"]
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY models /app/models$", text, re.M)
    assert 'VOLUME ["/models"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".wisp"} <= set(ignored)
    assert "models" not in ignored and "services" not in ignored


def test_nats_and_redis_are_configured_alike():
    conf_path = ROOT / "k8s/base/nats.conf"
    conf = conf_path.read_text()
    assert re.search(rf"^max_payload: {MAX_PAYLOAD_BYTES}$", conf, re.M)
    assert re.search(r"^jetstream \{", conf, re.M)
    spec = compose()
    assert (ROOT / spec["configs"]["nats-conf"]["file"]).resolve() == conf_path
    assert spec["services"]["nats"]["command"] == ["--config", "/etc/nats/nats.conf"]
    assert "--appendonly" in spec["services"]["redis"]["command"]
    for target in K8S_TARGETS:
        docs = render(target)
        maps = [d for d in docs if d["kind"] == "ConfigMap" and "nats.conf" in d.get("data", {})]
        assert [m["data"]["nats.conf"] for m in maps] == [conf], target
        sets = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
                if d["kind"] == "StatefulSet"}
        assert sets["nats"]["containers"][0]["args"] == ["--config", "/etc/nats/nats.conf"]
        assert "--appendonly" in sets["redis"]["containers"][0]["args"]


def test_replicated_verifiers_get_unique_ids():
    from services.gpu_verifier.service import VerifierConfig

    assert VerifierConfig().verifier_id != VerifierConfig().verifier_id
    for name, svc in compose_wisp_services().items():
        if service_module(svc["command"]) in ("services.gpu_verifier", "services.edge_drafter"):
            # Replicas share one environment: a fixed id would be shared too.
            assert "WISP_VERIFIER_ID" not in compose_env(svc), name
            assert "WISP_DEVICE_ID" not in compose_env(svc), name
    assert compose()["services"]["gpu-verifier"]["deploy"]["replicas"] >= 2
    assert compose()["services"]["edge-drafter"]["deploy"]["replicas"] >= 2
    for target in K8S_TARGETS:
        for _, container in k8s_containers(render(target)):
            for var in container.get("env", []):
                if var["name"] in ("WISP_VERIFIER_ID", "WISP_DEVICE_ID"):
                    assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_gpu_deployments_reserve_gpus_and_mount_the_model():
    cuda = compose()["services"]["gpu-verifier-cuda"]
    assert cuda["profiles"] == ["gpu"]
    assert compose_env(cuda)["WISP_DEVICE"] == "cuda"
    devices = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    docs = render("k8s/overlays/gpu")
    verifier = next(d for d in docs if d["kind"] == "Deployment"
                    and d["metadata"]["name"] == "gpu-verifier")
    pod = verifier["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and pod["tolerations"]
    env = k8s_env(docs, container)
    assert env["WISP_DEVICE"] == "cuda"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["WISP_TARGET_MODEL"].startswith(mounts["models"] + "/")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert ("PersistentVolumeClaim", claims["models"]) in {
        (d["kind"], d["metadata"]["name"]) for d in docs}
    cpu_verifier = next(c for _, c in k8s_containers(render("k8s")) if c["name"] == "gpu-verifier")
    assert "nvidia.com/gpu" not in cpu_verifier["resources"].get("limits", {})
