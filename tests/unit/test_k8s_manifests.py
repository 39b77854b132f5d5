"""deploy/k8s cannot be applied here (no cluster, no kubectl), so check what can go wrong without one.

Every kustomization is rendered (resources, components and RFC 6902 JSON patches: the subset of
kustomize these manifests use, patches applied by the jsonpatch library; anything else in a
kustomization fails the test rather than being rendered wrongly), and every rendered object validates
against the Kubernetes 1.30 schema (kubernetes-validate, strict: an unknown field is an error). Every
container that runs a service has its command and args, with its environment as Kubernetes builds it
(ConfigMap envFrom, the downward API's pod index, $(VAR) expansion, mounted Secrets), parsed by that
service's own `parse_args` and `config_from_args`; the probes, Services, volumes and the shard layout
are then checked against the configs they produce.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from tests.reliability.certs import make_pki

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the schema checked; the manifests need >= 1.28 (the pod-index label)
IMAGE = "twotower-serving"  # what docker-compose.yml builds from the Dockerfile
SERVICES = ("candidate_service", "user_service", "retrieval_gateway")
ENV_PREFIXES = ("TWOTOWER_", "CANDIDATE_", "USER_SERVICE_", "GATEWAY_")
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"
WORKLOADS = ("Deployment", "StatefulSet", "Job")

Doc = dict[str, Any]


# ---- rendering ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    docs: tuple[Doc, ...]
    components: frozenset[str]  # the components/ directories applied
    files: frozenset[Path]  # every file read
    patches: frozenset[tuple[Path, str, str]]  # (patch file, kind, name) that changed an object


def _topologies() -> list[str]:
    """What one applies: base/ and each overlay (towers/ and components/ are parts of them)."""
    overlays = K8S.glob("overlays/*/kustomization.yaml")
    return ["base", *sorted(p.parent.relative_to(K8S).as_posix() for p in overlays)]


def _accumulate(directory: Path, docs: list[Doc], kind: str, seen: dict[str, set]) -> list[Doc]:
    """kustomize's order: this directory's resources, then its components (each sees what has been
    accumulated so far), then its own patches. A patch whose target matches nothing does nothing, as in
    kustomize; test_every_file_and_patch_is_used catches one that never applies anywhere."""
    path = directory / "kustomization.yaml"
    seen["files"].add(path)
    k = yaml.safe_load(path.read_text())
    assert k["kind"] == kind, f"{path}: expected a {kind}"
    unmodelled = set(k) - {"apiVersion", "kind", "resources", "components", "patches"}
    assert not unmodelled, f"{path}: {sorted(unmodelled)} is not rendered by this test; extend it first"
    docs = list(docs)
    for entry in k.get("resources", []):
        source = (directory / entry).resolve()
        if source.is_dir():
            docs += _accumulate(source, [], "Kustomization", seen)
        else:
            assert source.parent == directory.resolve(), f"{path}: kustomize reads no file outside its dir"
            seen["files"].add(source)
            docs += [d for d in yaml.safe_load_all(source.read_text()) if d is not None]
    for entry in k.get("components", []):
        component = (directory / entry).resolve()
        seen["components"].add(component.relative_to(K8S).as_posix())
        docs = _accumulate(component, docs, "Component", seen)
    for patch in k.get("patches", []):
        assert set(patch) == {"path", "target"} and set(patch["target"]) == {"kind", "name"}, (
            f"{path}: only `path` + `target: {{kind, name}}` patches are rendered here"
        )
        source = (directory / patch["path"]).resolve()
        seen["files"].add(source)
        ops = yaml.safe_load(source.read_text())
        assert isinstance(ops, list), f"{source}: a JSON patch (a list of operations), not a strategic merge"
        kind_, name = patch["target"]["kind"], patch["target"]["name"]
        for i, doc in enumerate(docs):
            if doc["kind"] == kind_ and doc["metadata"]["name"] == name:
                docs[i] = jsonpatch.JsonPatch(ops).apply(doc)
                seen["patches"].add((source, kind_, name))
    ids = [(d["kind"], d["metadata"]["name"]) for d in docs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"{path}: kustomize refuses the same object twice: {duplicates}"
    return docs


@functools.cache
def render(variant: str) -> Rendered:
    seen: dict[str, set] = {"files": set(), "components": set(), "patches": set()}
    docs = _accumulate((K8S / variant).resolve(), [], "Kustomization", seen)
    return Rendered(tuple(docs), *(frozenset(seen[k]) for k in ("components", "files", "patches")))


VARIANTS = _topologies()


def _docs(variant: str) -> list[Doc]:
    return copy.deepcopy(list(render(variant).docs))


def _get(docs: list[Doc], kind: str, name: str) -> Doc:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _selects(selector: dict[str, str], workload: Doc) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


# ---- what a container would run ---------------------------------------------------------------------
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values: defined names are replaced, `$$`
    is a literal `$`, anything else is left as written."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class Parsed:
    workload: Doc
    container: Doc
    ordinal: int
    env: dict[str, str]  # as the container sees it, paths still as mounted
    module: str
    config: Any
    parse: Any  # argv -> config, as the service does it

    @property
    def role(self) -> str | None:
        """A gateway's --role (single, shard, router); None for the towers."""
        if self.module != "retrieval_gateway":
            return None
        return getattr(self.config, "role", "single")  # a gateway without the flag is a single one

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}[{self.ordinal}]"

    def port(self, name: str) -> int:
        [port] = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        return port


def _container_env(container: Doc, docs: list[Doc], ordinal: int, kind: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_get(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == POD_INDEX and kind == "StatefulSet", f"{var['name']}: unexpected {field}"
            env[var["name"]] = str(ordinal)  # the label the StatefulSet controller sets on pod <ordinal>
    return env


def _secret_mounts(workload: Doc, container: Doc, pki_dir: Path) -> dict[str, str]:
    """Mounted Secrets -> a local directory holding throwaway PEMs under the Secret's keys, so the
    services' TLS settings (which read their files at start) can be built here."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        if "secret" in volumes.get(mount["name"], {}):  # claim templates are not pod volumes
            local = pki_dir / mount["name"]
            if not local.exists():
                pki = make_pki(pki_dir / f"{mount['name']}-pki")
                local.mkdir()
                pems = {"tls.crt": pki.server_cert, "tls.key": pki.server_key, "ca.crt": pki.ca}
                for key, pem in pems.items():
                    (local / key).write_bytes(pem.read_bytes())
            mounts[mount["mountPath"]] = str(local)
    return mounts


def _localise(text: str, mounts: dict[str, str]) -> str:
    for mounted, local in mounts.items():
        if text == mounted or text.startswith(mounted + "/"):
            return local + text[len(mounted) :]
    return text


def _ordinals(workload: Doc) -> range:
    return range(workload["spec"]["replicas"]) if workload["kind"] == "StatefulSet" else range(1)


def _parse(
    workload: Doc,
    container: Doc,
    ordinal: int,
    docs: list[Doc],
    monkeypatch,
    pki_dir: Path,
    parse,
    unset: str | None = None,
) -> tuple[dict[str, str], Any]:
    """(env, parse(argv)) with the container's environment set (less `unset`, still used to expand
    $(VAR)) and its mounted Secrets local."""
    env = _container_env(container, docs, ordinal, workload["kind"])
    mounts = _secret_mounts(workload, container, pki_dir)
    argv = [_localise(_expand(a, env), mounts) for a in container["command"][1:] + container.get("args", [])]
    unexpanded = [a for a in argv if "$(" in a]
    assert not unexpanded, f"{workload['metadata']['name']}: $(VAR) with no such env var: {unexpanded}"
    with monkeypatch.context() as m:
        for key in os.environ:
            if key.startswith(ENV_PREFIXES):
                m.delenv(key)
        for key, value in env.items():
            if key != unset:
                m.setenv(key, _localise(value, mounts))
        try:
            return env, parse(argv)
        except SystemExit:
            pytest.fail(f"{workload['metadata']['name']}: {container['command'][:3]} rejects {argv}")


def _service_containers(variant: str, monkeypatch, tmp_path: Path) -> list[Parsed]:
    """Every container of every pod (each ordinal of a StatefulSet) that runs a service, parsed."""
    docs = _docs(variant)
    parsed = []
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            command = container["command"]
            if command[:2] != ["python", "-m"] or command[2] not in SERVICES:
                continue
            entry = importlib.import_module(f"{command[2]}.__main__")

            def parse(argv: list[str], entry=entry) -> Any:
                return entry.config_from_args(entry.parse_args(argv[2:]))  # after `-m <module>`

            for ordinal in _ordinals(workload):
                env, config = _parse(workload, container, ordinal, docs, monkeypatch, tmp_path, parse)
                parsed.append(Parsed(workload, container, ordinal, env, command[2], config, parse))
    return parsed


def _unread_env(p: Parsed, docs: list[Doc], monkeypatch, tmp_path: Path) -> list[str]:
    """The service env vars the container sets that change nothing when left out: misspelt or
    renamed, since the services ignore unknown variables. TWOTOWER_TLS_* are the probes' (checked there)
    and a variable consumed by $(VAR) in the args is checked by the parse itself."""
    expanded = set(_REF.findall(" ".join(p.container.get("args", []))))
    unread = []
    for key in p.env:
        if not key.startswith(ENV_PREFIXES) or key.startswith("TWOTOWER_TLS_") or key in expanded:
            continue
        try:
            _, config = _parse(p.workload, p.container, p.ordinal, docs, monkeypatch, tmp_path, p.parse, key)
        except (ValueError, pytest.fail.Exception):
            continue  # required, or half of a TLS pair: read
        if config == p.config:
            unread.append(key)
    return unread


def _probe_checks(p: Parsed, probe: Doc, docs: list[Doc], monkeypatch, tmp_path: Path) -> None:
    """A gRPC probe asks grpc.health.v1 about the service on its port; with TLS (which the kubelet's
    gRPC probe cannot speak) it is `twotower health` with the container's certificate instead."""
    port = p.config.server.port
    if p.config.server.tls is None:
        # The name each server registers in grpc.health.v1 beside "" (NOT_SERVING until ready).
        service = importlib.import_module(f"{p.module}.server").SERVICE_NAME
        assert probe["grpc"] == {"port": port, "service": service}, p.name
        return
    from shared.tls import client_tls_from_args
    from twotower_cli import cli

    def parse(argv: list[str]) -> tuple[argparse.Namespace, Any]:
        args = cli.build_parser().parse_args(argv)
        return args, client_tls_from_args(args)

    container = {**p.container, "command": probe["exec"]["command"], "args": []}
    _, (args, tls) = _parse(p.workload, container, p.ordinal, docs, monkeypatch, tmp_path, parse)
    assert probe["exec"]["command"][0] == "twotower" and args.command == "health", p.name
    assert args.address == f"127.0.0.1:{port}", p.name
    assert tls is not None and tls.server_name, f"{p.name}: a TLS server needs a TLS probe"
    if p.config.server.tls.client_ca is not None:
        assert tls.cert is not None, f"{p.name}: requires client certificates, so must its probe"
    assert probe["timeoutSeconds"] > args.timeout, p.name


# ---- the tests ---------------------------------------------------------------------------------------
def test_the_topologies_are_all_rendered():
    assert {"base", "overlays/sharded", "overlays/gpu", "overlays/tls"} <= set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_against_the_kubernetes_schema(variant):
    for doc in render(variant).docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{variant}: {doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")


def test_every_file_and_patch_is_used():
    files = set().union(*(render(v).files for v in VARIANTS))
    on_disk = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    assert on_disk - files == set(), "files no kustomization reads"
    applied = set().union(*(render(v).patches for v in VARIANTS))
    for component in K8S.glob("components/*/kustomization.yaml"):
        for patch in yaml.safe_load(component.read_text())["patches"]:
            target = patch["target"]
            key = ((component.parent / patch["path"]).resolve(), target["kind"], target["name"])
            assert key in applied, f"{component}: {patch} changes nothing in any topology"


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_containers_parse_into_their_config_and_probe_it(variant, monkeypatch, tmp_path):
    docs, rendered = _docs(variant), render(variant)
    parsed = _service_containers(variant, monkeypatch, tmp_path)
    assert {p.module for p in parsed} == set(SERVICES), variant
    gpu = "components/gpu" in rendered.components
    tls = "components/tls" in rendered.components
    for p in parsed:
        config, container = p.config, p.container
        assert not _unread_env(p, docs, monkeypatch, tmp_path), f"{p.name}: env vars {p.module} ignores"
        assert config.server.host == "0.0.0.0", p.name  # reachable from other pods
        assert config.server.port == p.port("grpc"), p.name
        assert config.server.metrics_port == p.port("metrics"), p.name
        _probe_checks(p, container["readinessProbe"], docs, monkeypatch, tmp_path)
        if p.module == "retrieval_gateway":
            # Readiness follows user_service and the corpus; liveness must not (see base/gateway.yaml).
            assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}, p.name
            assert "startupProbe" not in container, p.name
        else:
            _probe_checks(p, container["startupProbe"], docs, monkeypatch, tmp_path)
            _probe_checks(p, container["livenessProbe"], docs, monkeypatch, tmp_path)
        on_gpu = "nvidia.com/gpu" in container["resources"]["limits"]
        # The towers' model and the corpus matrix go to the GPU; candidate_service and routers stay put.
        computes = p.module == "user_service" or p.role in ("single", "shard")
        assert on_gpu == (gpu and computes), p.name
        assert (getattr(config, "device", "cpu") == "cuda") == on_gpu, p.name
        assert container["image"].endswith(":cuda") == on_gpu, p.name
        assert (config.server.tls is not None) == tls, p.name
        if p.module == "retrieval_gateway":
            assert (config.upstream_tls is not None and config.upstream_tls.cert is not None) == tls, p.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateways_dial_the_towers_through_headless_services_and_the_network_policy(
    variant, monkeypatch, tmp_path
):
    docs = _docs(variant)
    parsed = _service_containers(variant, monkeypatch, tmp_path)
    towers = {p.module: p for p in parsed if p.module != "retrieval_gateway"}
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for gateway in (p for p in parsed if p.module == "retrieval_gateway"):
        dials = {"user_service": gateway.config.user_service}
        if gateway.role != "router":
            dials["candidate_service"] = gateway.config.candidate_service
        for module, target in dials.items():
            match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
            assert match, f"{gateway.name}: {target} is not a dns:/// target (no client-side balancing)"
            service = _get(docs, "Service", match.group(1))
            assert service["spec"]["clusterIP"] == "None", f"{service['metadata']['name']} is not headless"
            assert _selects(service["spec"]["selector"], towers[module].workload)
            [port] = [p for p in service["spec"]["ports"] if p["port"] == int(match.group(2))]
            assert towers[module].port(port["targetPort"]) == towers[module].config.server.port
        assert _selects(allowed, gateway.workload), f"{gateway.name} is kept out by the network policy"
    tower_ports = {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
    assert tower_ports == {t.config.server.port for t in towers.values()}
    protected = policy["spec"]["podSelector"]["matchExpressions"][0]
    assert protected["key"] == "app.kubernetes.io/name" and protected["operator"] == "In"
    labels = [t.workload["spec"]["template"]["metadata"]["labels"] for t in towers.values()]
    assert {label["app.kubernetes.io/name"] for label in labels} == set(protected["values"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_clients_enter_through_the_gateway_service(variant, monkeypatch, tmp_path):
    docs = _docs(variant)
    service = _get(docs, "Service", "gateway")
    assert service["spec"]["type"] == "ClusterIP" and "clusterIP" not in service["spec"]
    parsed = _service_containers(variant, monkeypatch, tmp_path)
    entry = [p for p in parsed if p.role in ("single", "router")]
    assert entry and all(_selects(service["spec"]["selector"], p.workload) for p in entry)
    selected = [p for p in parsed if _selects(service["spec"]["selector"], p.workload)]
    assert selected == entry, "the entry point must not reach the shards or the towers"
    [port] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert all(p.port(port["targetPort"]) == p.config.server.port == port["port"] for p in entry)


def _has_shards(variant: str) -> bool:
    ids = {(d["kind"], d["metadata"]["name"]) for d in render(variant).docs}
    return ("StatefulSet", "gateway-shard") in ids


SHARDED = [v for v in VARIANTS if _has_shards(v)]


def test_the_sharded_topologies_are_checked():
    assert "overlays/sharded" in SHARDED


@pytest.mark.parametrize("variant", SHARDED)
def test_each_shard_index_is_its_pod_ordinal_and_the_router_dials_every_shard(variant, monkeypatch, tmp_path):
    docs = _docs(variant)
    parsed = _service_containers(variant, monkeypatch, tmp_path)
    shards = [p for p in parsed if p.role == "shard"]
    [router] = [p for p in parsed if p.role == "router"]
    statefulset = shards[0].workload
    count = statefulset["spec"]["replicas"]
    assert [(p.config.shard_index, p.config.num_shards) for p in shards] == [(i, count) for i in range(count)]
    headless = _get(docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and _selects(headless["spec"]["selector"], statefulset)
    assert headless["spec"]["publishNotReadyAddresses"] is True
    [port] = [p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    stem, domain = statefulset["metadata"]["name"], headless["metadata"]["name"]
    expected = tuple(f"dns:///{stem}-{i}.{domain}:{port}" for i in range(count))
    assert router.config.shard_addresses == expected
    assert router.config.num_shards == count
    assert all(p.config.server.port == port for p in shards)


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_service_is_one_writer_with_its_store_on_its_own_volume(variant, monkeypatch, tmp_path):
    parsed = _service_containers(variant, monkeypatch, tmp_path)
    [candidate] = [p for p in parsed if p.module == "candidate_service"]
    statefulset = candidate.workload
    assert statefulset["kind"] == "StatefulSet" and statefulset["spec"]["replicas"] == 1
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    [mount] = [m for m in candidate.container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    volume = PurePosixPath(mount["mountPath"])
    store = candidate.config.item_store or candidate.config.cache_dir / "items.sqlite3"
    for path in (candidate.config.cache_dir, store):
        assert PurePosixPath(path).is_relative_to(volume), f"{path} is not on the pod's volume"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_checkpoint_is_on_the_shared_volume_the_prepare_job_fills(variant, monkeypatch, tmp_path):
    docs = _docs(variant)
    claim = _get(docs, "PersistentVolumeClaim", "artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = _get(docs, "Job", "prepare-artifacts")
    [container] = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "training"] and "--if-missing" in command
    out = PurePosixPath(command[command.index("--out") + 1])
    for p in _service_containers(variant, monkeypatch, tmp_path):
        if p.module == "retrieval_gateway":
            continue
        volumes = {v["name"]: v for v in p.workload["spec"]["template"]["spec"]["volumes"]}
        [mount] = [
            m for m in p.container["volumeMounts"]
            if volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName") == "artifacts"
        ]  # fmt: skip
        assert PurePosixPath(p.config.checkpoint) == out / "checkpoint", p.name
        assert PurePosixPath(p.config.checkpoint).is_relative_to(mount["mountPath"]), p.name
        assert "TWOTOWER_CHECKPOINT" in p.env, f"{p.name}: the checkpoint comes from the ConfigMap"


@pytest.mark.parametrize("variant", VARIANTS)
def test_user_service_autoscales_on_cpu(variant, monkeypatch, tmp_path):
    docs = _docs(variant)
    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = _get(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    [user] = [p for p in _service_containers(variant, monkeypatch, tmp_path) if p.module == "user_service"]
    assert target is not None and target["metadata"]["name"] == user.workload["metadata"]["name"]
    assert target["kind"] == "Deployment"
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in user.container["resources"]["requests"]  # utilisation is measured against it
    assert user.config.state_file is not None and user.config.state_file.is_relative_to("/artifacts")


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_run_as_non_root_on_read_only_filesystems_with_no_capabilities(variant):
    for workload in (d for d in render(variant).docs if d["kind"] in WORKLOADS):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name  # nothing here talks to the API server
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: {bound}"
            assert container["image"].split(":")[0] == IMAGE, name
            assert container["imagePullPolicy"] == "IfNotPresent", f"{name}: a loaded image is not pulled"
