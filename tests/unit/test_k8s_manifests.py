"""The Kubernetes manifests (deploy/k8s): each kustomization built offline, every document validated strictly against
Kubernetes' own schemas (kubernetes-validate's copies), and what the relay needs from them checked against the code:
probes, drain grace, security context, the UDP port range, the settings' names and values, the Services, the
NetworkPolicies and the TURN gateway's wiring.

No kustomize runs in CI, so this file builds the kustomizations itself, with the subset of Kustomize they use:
`resources` (files and directories) and `patches` of whole documents (strategic merge, the list merge keys taken from
the same schemas: x-kubernetes-patch-merge-key), `null` to remove a field, `$patch: delete` for a list item or a
whole document. Anything else in a kustomization or a patch is refused rather than half understood. The builder's
own tests pin its results to what `kubectl kustomize` (kustomize v5.5) printed for the same input; on the real
manifests it gave exactly what `kubectl kustomize` printed when they were written.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version
from packaging.version import Version

from relay.config import Settings, SettingsError, cpu_limit
from relay.server.workers import DRAIN_MARGIN_S

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE, HOST_NETWORK, TURN_GATEWAY = K8S / "base", K8S / "overlays" / "host-network", K8S / "overlays" / "turn-gateway"
KUSTOMIZATIONS = {"base": BASE, "host-network": HOST_NETWORK, "turn-gateway": TURN_GATEWAY}
POD_NETWORK = ("base", "turn-gateway")  # the relays on the pod network: they set their own UDP port range

# Validated against the newest Kubernetes whose schemas kubernetes-validate ships, and against 1.31, the oldest we
# claim (unhealthyPodEvictionPolicy is GA there; the pod-index label is on by default since 1.28).
NEWEST = latest_version()
OLDEST = "1.31.0"
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{NEWEST}-local-strict"

# The cluster settings of issue 19; relay/config.py has them once cluster mode is in (then they are checked there).
CLUSTER_ENV = {"RELAY_NODE_ID", "RELAY_CLUSTER_SECRET", "RELAY_ADVERTISE_URL", "RELAY_PEER_URL_TEMPLATE",
               "RELAY_REDIS_URL"}
PLACEHOLDER = "REPLACE-ME"
# What a pod sees through the downward API in these tests.
POD = {"status.podIP": "10.244.1.7", "status.hostIP": "192.0.2.10",
       "metadata.labels['apps.kubernetes.io/pod-index']": "1", "metadata.name": "relay-1"}
# Fields the downward API gives to environment variables (Kubernetes' validation of fieldRef in env).
ENV_FIELDS = re.compile(r"metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[^']+'\]|spec\.nodeName|"
                        r"spec\.serviceAccountName|status\.(hostIP|hostIPs|podIP|podIPs)")


# --- the builder ---------------------------------------------------------------------------------------------------

class BuildError(ValueError):
    """A kustomization or patch this builder does not handle exactly, or one that cannot be applied."""


KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def build(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build directory` prints, as documents, for kustomizations of `resources` and `patches`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if unknown := set(kustomization) - KUSTOMIZATION_KEYS:
        raise BuildError(f"{directory}: kustomization fields this builder does not handle: {sorted(unknown)}")
    if (kustomization.get("apiVersion"), kustomization.get("kind")) != (
            "kustomize.config.k8s.io/v1beta1", "Kustomization"):
        raise BuildError(f"{directory}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        documents += build(path) if path.is_dir() else load_documents(path)
    ids = [identity(doc) for doc in documents]
    if duplicates := {i for i in ids if ids.count(i) > 1}:
        raise BuildError(f"{directory}: resources defined twice: {sorted(duplicates)}")
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise BuildError(f"{directory}: patches other than a path to strategic-merge documents: {entry}")
        for patch in load_documents(directory / entry["path"]):
            targets = [i for i, doc in enumerate(documents) if identity(doc) == identity(patch)]
            if len(targets) != 1:
                raise BuildError(f"{directory}: patch {entry['path']} matches no resource: {identity(patch)}")
            if patch.get("$patch") == "delete":
                del documents[targets[0]]
                continue
            documents[targets[0]] = merge(documents[targets[0]], patch, kind_schema(patch))
    return documents


def identity(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


@cache
def definitions() -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / "_definitions.json").read_text())["$defs"]


def kind_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """The schema file kubernetes-validate uses for this kind (its naming: kind-group-version.json)."""
    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    path = SCHEMA_DIR / f"{doc['kind'].lower()}-{api_version}.json"
    if not path.exists():
        raise BuildError(f"no schema for {doc['apiVersion']} {doc['kind']} in {SCHEMA_DIR.name}")
    return json.loads(path.read_text())


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref (both kinds in these files: '#/$defs/x' and '/api/_definitions.json#/$defs/x'), keeping the
    referring schema's own annotations (the patch strategy sits next to the $ref of a list's items)."""
    while "$ref" in schema:
        name = schema["$ref"].split("#/$defs/", 1)[1]
        schema = {**definitions()[name], **{k: v for k, v in schema.items() if k not in ("$ref", "description")}}
    return schema


def child(schema: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    schema = resolve(schema)
    if key in schema.get("properties", {}):
        return schema["properties"][key]
    if isinstance(schema.get("additionalProperties"), dict):
        return schema["additionalProperties"]
    raise BuildError(f"{where}.{key}: not in the schema")


def merge(original: Any, patch: Any, schema: dict[str, Any], where: str = "") -> Any:
    """Strategic merge patch as Kustomize applies it: maps merge key by key (null removes a key), lists with a
    patch merge key merge item by item (the patch's items first, in its order, then the original's others, in
    theirs; `$patch: delete` removes one), other lists and scalars are replaced."""
    if isinstance(patch, dict):
        if "$patch" in patch or any(key.startswith("$") for key in patch):
            raise BuildError(f"{where}: directive this builder does not handle: {patch}")
        if not isinstance(original, dict):
            return no_directives(patch, where)
        merged = dict(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in original:
                merged[key] = merge(original[key], value, child(schema, key, where), f"{where}.{key}")
            else:
                child(schema, key, where)  # a field the schema does not know is an error, not a guess
                merged[key] = no_directives(value, f"{where}.{key}")
        return merged
    if isinstance(patch, list):
        schema = resolve(schema)
        strategy = schema.get("x-kubernetes-patch-strategy", "").split(",")
        key = schema.get("x-kubernetes-patch-merge-key")
        if "merge" in strategy and key is None:
            raise BuildError(f"{where}: a merged list of scalars, which this builder does not handle")
        if "merge" not in strategy or not isinstance(original, list):
            return no_directives(patch, where)
        return merge_list(original, patch, key, schema["items"], where)
    return patch


def merge_list(original: list, patch: list, key: str, items: dict[str, Any], where: str) -> list:
    originals = {item[key]: item for item in original}
    if len(originals) != len(original):
        raise BuildError(f"{where}: items share a {key}; a merge by {key} would be ambiguous")
    merged, seen = [], set()
    for item in patch:
        name = item[key]
        seen.add(name)
        if item.get("$patch") == "delete":
            if set(item) != {key, "$patch"}:
                raise BuildError(f"{where}: `$patch: delete` with other fields: {item}")
            continue
        merged.append(merge(originals[name], item, items, f"{where}[{name}]") if name in originals
                      else no_directives(item, f"{where}[{name}]"))
    return merged + [item for item in original if item[key] not in seen]


def no_directives(value: Any, where: str) -> Any:
    """A copy of a new subtree, which must hold no patch directive (they mean something only against an original)."""
    if isinstance(value, dict):
        if any(key.startswith("$") for key in value):
            raise BuildError(f"{where}: directive in a new subtree: {value}")
        return {k: no_directives(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [no_directives(v, where) for v in value]
    return copy.deepcopy(value)


# --- reading the built documents -----------------------------------------------------------------------------------

@cache
def _built(name: str) -> tuple[str, ...]:
    return tuple(yaml.safe_dump(doc) for doc in build(KUSTOMIZATIONS[name]))


def built(name: str) -> list[dict[str, Any]]:
    return [yaml.safe_load(text) for text in _built(name)]


def the(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def relay_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return container(the(docs, "StatefulSet", "relay"), "relay")


def env_var(c: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [var for var in c.get("env", []) if var["name"] == name]
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity(text: str | int) -> Fraction:
    """A Kubernetes quantity (the forms these manifests use): 2, 500m, 256Mi, 1Gi, 200M."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|Ki|Mi|Gi)?", str(text))
    assert match, f"not a quantity: {text}"
    scale = {None: 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30}[match.group(2)]
    return Fraction(match.group(1)) * scale


def container_env(workload: dict[str, Any], name: str, docs: list[dict[str, Any]],
                  secrets: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The environment the kubelet gives container `name`: values with $(VAR) expanded from the variables before
    them (an unknown or later one stays as written, as Kubernetes leaves it), the downward API's fields (POD), a
    resource field (ceil(value / divisor)) and Secrets' keys (from `secrets`, else the built Secrets)."""
    if secrets is None:
        secrets = {doc["metadata"]["name"]: {**doc.get("stringData", {})} for doc in of_kind(docs, "Secret")}
    c = container(workload, name)
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            value = POD[var["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in var["valueFrom"]:
            ref = var["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            of = container(workload, ref.get("containerName", name))
            value = str(math.ceil(quantity(of["resources"][kind][resource]) / quantity(ref.get("divisor", "1"))))
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
        env[var["name"]] = value
    return env


def settings_env_names() -> set[str]:
    return {Settings.env_name(name) for name in Settings.model_fields}


REAL_SECRETS = {  # what an operator puts in place of REPLACE-ME (test values, never used anywhere)
    "relay-secrets": {"RELAY_API_KEYS": "sk-test-" + "a1" * 16, "RELAY_TOKEN_SECRET": "b2" * 32,
                      "RELAY_CLUSTER_SECRET": "c3" * 32, "OPENAI_API_KEY": "sk-test-" + "d4" * 16},
    "relay-turn": {"secret": "e5" * 32},
}


def coturn_config(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    text = the(docs, "ConfigMap", "coturn")["data"]["turnserver.conf"]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split("=", 1)) if "=" in line else (line, "") for line in lines]


def udp_range(docs: list[dict[str, Any]]) -> tuple[int, int]:
    """The relays' UDP ports: the pod's net.ipv4.ip_local_port_range sysctl."""
    sysctls = the(docs, "StatefulSet", "relay")["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    (value,) = [s["value"] for s in sysctls if s["name"] == "net.ipv4.ip_local_port_range"]
    low, high = map(int, value.split())
    return low, high


def _unavailable(reason: str) -> None:
    """In CI a missing tool fails the test; elsewhere it skips, saying why."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# --- the builder's own tests ---------------------------------------------------------------------------------------

BUILDER_BASE = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector: {matchLabels: {app: d}}
  template:
    metadata: {labels: {app: d}}
    spec:
      securityContext:
        runAsNonRoot: true
        sysctls: [{name: net.ipv4.ip_local_port_range, value: "50000 50099"}]
      containers:
        - name: c
          image: x
          args: [serve, --verbose]
          env: [{name: A, value: "1"}, {name: B, value: "2"}, {name: C, value: "3"}, {name: D, value: "4"}]
          ports: [{containerPort: 1}, {containerPort: 2}]
        - name: e
          image: y
      volumes: [{name: v1, emptyDir: {}}, {name: v2, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  selector: {app: d}
  ports: [{port: 80}]
"""
BUILDER_PATCH = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  template:
    spec:
      hostNetwork: true
      securityContext: {sysctls: null}
      containers:
        - name: e
          image: z
        - name: c
          args: [serve]
          env: [{name: E, value: "5"}, {name: C, value: "33"}, {name: A, $patch: delete}]
          ports: [{containerPort: 3}]
      volumes: [{name: v3, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: s}
$patch: delete
"""
# `kubectl kustomize` (kustomize v5.5.0) on BUILDER_BASE with BUILDER_PATCH printed exactly this Deployment, and no
# Service: the patch's list items first, in the patch's order, then the original's others.
BUILDER_EXPECTED = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  selector: {matchLabels: {app: d}}
  template:
    metadata: {labels: {app: d}}
    spec:
      hostNetwork: true
      securityContext: {runAsNonRoot: true}
      containers:
        - name: e
          image: z
        - name: c
          image: x
          args: [serve]
          env: [{name: E, value: "5"}, {name: C, value: "33"}, {name: B, value: "2"}, {name: D, value: "4"}]
          ports: [{containerPort: 3}, {containerPort: 1}, {containerPort: 2}]
      volumes: [{name: v3, emptyDir: {}}, {name: v1, emptyDir: {}}, {name: v2, emptyDir: {}}]
"""


def _builder_case(tmp_path: Path, kustomization: str, patch: str = BUILDER_PATCH) -> Path:
    (tmp_path / "base.yaml").write_text(BUILDER_BASE)
    (tmp_path / "patch.yaml").write_text(patch)
    (tmp_path / "kustomization.yaml").write_text(kustomization)
    return tmp_path


PATCHED = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [base.yaml]\n" \
          "patches: [{path: patch.yaml}]\n"


def test_the_builder_merges_as_kustomize_does(tmp_path):
    assert build(_builder_case(tmp_path, PATCHED)) == [yaml.safe_load(BUILDER_EXPECTED)]


@pytest.mark.parametrize("kustomization, patch, error", [
    (PATCHED.replace("patches:", "namePrefix: x-\npatches:"), BUILDER_PATCH, "namePrefix"),
    (PATCHED.replace("{path: patch.yaml}", "{path: patch.yaml, target: {kind: Service}}"), BUILDER_PATCH, "target"),
    (PATCHED.replace("[base.yaml]", "[base.yaml, base.yaml]"), BUILDER_PATCH, "defined twice"),
    (PATCHED, BUILDER_PATCH.replace("metadata: {name: d}", "metadata: {name: other}"), "matches no resource"),
    (PATCHED, BUILDER_PATCH.replace("hostNetwork: true", "hostNetwrk: true"), "hostNetwrk"),
    (PATCHED, BUILDER_PATCH.replace("securityContext: {sysctls: null}", "securityContext: {$patch: replace}"),
     "directive"),
    (PATCHED, BUILDER_PATCH.replace("{name: A, $patch: delete}", "{name: A, value: x, $patch: delete}"), "delete"),
])
def test_the_builder_refuses_what_it_does_not_handle_exactly(tmp_path, kustomization, patch, error):
    with pytest.raises(BuildError, match=re.escape(error)):
        build(_builder_case(tmp_path, kustomization, patch))


# --- every document, against Kubernetes' schemas -------------------------------------------------------------------

def test_the_schemas_are_a_current_kubernetes():
    assert Version(NEWEST) >= Version("1.34"), f"kubernetes-validate ships schemas up to {NEWEST} only"
    assert OLDEST in all_versions()


@pytest.mark.parametrize("version", [NEWEST, OLDEST])
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_document_validates_strictly(name, version):
    docs = built(name)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} against {version}: {path}: {error.message}")


def test_strict_validation_refuses_an_unknown_field():
    """The check above can fail: a misspelt field is refused, not ignored."""
    doc = built("base")
    statefulset = the(doc, "StatefulSet", "relay")
    statefulset["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, NEWEST, strict=True)


# --- what the relay needs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_selectors_and_ports_meet(name):
    """Every Service, PodDisruptionBudget and NetworkPolicy selects pods that exist, and each Service's target port
    is a port those pods declare, with its protocol; each workload's selector matches its own pods."""
    docs = built(name)
    pods = {doc["metadata"]["name"]: doc["spec"]["template"] for doc in workloads(docs)}
    for doc in workloads(docs):
        assert selects(doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"])
    for doc in of_kind(docs, "Service") + of_kind(docs, "PodDisruptionBudget") + of_kind(docs, "NetworkPolicy"):
        selector = {"Service": lambda spec: spec["selector"],
                    "PodDisruptionBudget": lambda spec: spec["selector"]["matchLabels"],
                    "NetworkPolicy": lambda spec: spec["podSelector"]["matchLabels"]}[doc["kind"]](doc["spec"])
        chosen = [t for t in pods.values() if selects(selector, t["metadata"]["labels"])]
        assert chosen, f"{doc['kind']} {doc['metadata']['name']} selects no pod"
        if doc["kind"] != "Service":
            continue
        for port in doc["spec"]["ports"]:
            for template in chosen:
                declared = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
                assert any(p.get("name") == port["targetPort"] or p["containerPort"] == port["targetPort"]
                           for p in declared if p.get("protocol", "TCP") == port.get("protocol", "TCP")), \
                    f"Service {doc['metadata']['name']}: {port}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_relay_is_a_statefulset_with_its_services(name):
    docs = built(name)
    statefulset = the(docs, "StatefulSet", "relay")
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    headless = the(docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # a draining relay still owns its calls
    client = the(docs, "Service", "relay")
    assert client["spec"].get("sessionAffinity", "None") == "None"  # plain round robin
    assert client["spec"].get("clusterIP") != "None"
    pdb = the(docs, "PodDisruptionBudget", "relay")
    assert selects(pdb["spec"]["selector"]["matchLabels"], statefulset["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["maxUnavailable"] == 1
    # A Service named `relay` would otherwise put RELAY_PORT=tcp://… (and RELAY_SERVICE_HOST) into the pods.
    assert statefulset["spec"]["template"]["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_and_drain(name):
    docs = built(name)
    statefulset = the(docs, "StatefulSet", "relay")
    relay = relay_container(docs)
    env = container_env(statefulset, "relay", docs)
    (http,) = [p for p in relay["ports"] if p["name"] == "http"]
    assert http["containerPort"] == int(env["RELAY_PORT"])
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert relay[probe]["httpGet"]["path"] == path, probe
        assert relay[probe]["httpGet"]["port"] in ("http", http["containerPort"]), probe
    # The grace period covers the preStop pause, the relay's drain and the master's allowance for its workers.
    pre_stop = relay["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env["RELAY_DRAIN_TIMEOUT_S"])
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + drain + DRAIN_MARGIN_S


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_security_context(name):
    docs = built(name)
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    for workload in workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert isinstance(spec["securityContext"]["runAsUser"], int)  # the check needs a numeric user
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert "privileged" not in context and "add" not in context["capabilities"]
    statefulset = the(docs, "StatefulSet", "relay")
    context = statefulset["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid.group(1)), int(uid.group(2)))
    # The read-only root needs a writable /tmp for the workers' sockets.
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    (tmp,) = [m for m in relay_container(docs)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


@pytest.mark.parametrize("name", POD_NETWORK)
def test_the_udp_range_is_the_pods_sysctl_and_fits_the_calls(name):
    docs = built(name)
    low, high = udp_range(docs)
    assert 1024 < low <= high < 65536
    env = container_env(the(docs, "StatefulSet", "relay"), "relay", docs)
    # One port per call per address gathered (one: RELAY_ICE_ADDRESSES), and as many again for the pod's outbound
    # TCP connections, which take their ports from the same numbers.
    addresses = len(env["RELAY_ICE_ADDRESSES"].split(","))
    assert high - low + 1 >= 2 * int(env["RELAY_MAX_CALLS"]) * addresses


def test_on_the_host_network_the_range_is_the_nodes():
    """Kubernetes refuses a net.* sysctl on a pod with hostNetwork: the range is the node's own."""
    spec = the(built("host-network"), "StatefulSet", "relay")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert "sysctls" not in spec["securityContext"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_workers_follow_the_cpu_limit(name, tmp_path):
    docs = built(name)
    statefulset = the(docs, "StatefulSet", "relay")
    relay = relay_container(docs)
    assert relay["resources"]["requests"] == relay["resources"]["limits"]  # one worker drives one core
    cpus = quantity(relay["resources"]["limits"]["cpu"])
    assert cpus.denominator == 1, "whole CPUs: the relay counts whole CPUs of its quota"
    assert env_var(relay, "RELAY_WORKERS")["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    env = container_env(statefulset, "relay", docs)
    # What the relay itself would find in its cgroup under that limit (the kubelet's cpu.max: quota per 100 ms).
    (tmp_path / "cpu.max").write_text(f"{int(cpus * 100000)} 100000\n")
    assert int(env["RELAY_WORKERS"]) == cpu_limit(str(tmp_path))
    # README, Performance: 32 calls per core with at most 0.5 % late frames.
    assert int(env["RELAY_MAX_CALLS"]) <= 32 * int(env["RELAY_WORKERS"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_setting_named_is_a_setting(name):
    docs = built(name)
    known = settings_env_names()
    relay = relay_container(docs)
    names = [var["name"] for var in relay["env"]]
    assert len(names) == len(set(names))
    for var in names:
        assert var in known or var == "POD_IP", var
    for var in relay["env"]:
        if "fieldRef" in var.get("valueFrom", {}):
            assert ENV_FIELDS.fullmatch(var["valueFrom"]["fieldRef"]["fieldPath"]), var
    # Every $(VAR) names a variable set before it (Kubernetes expands only those; the others stay as written).
    env = container_env(the(docs, "StatefulSet", "relay"), "relay", docs)
    assert not [v for v in env.values() if "$(" in v]


def test_the_cluster_settings_are_the_relays():
    """The cluster settings the manifests set are relay/config.py's (issue 19's names)."""
    missing = CLUSTER_ENV - settings_env_names()
    assert not missing, f"relay/config.py has no {sorted(missing)}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_cluster_wiring(name):
    docs = built(name)
    statefulset = the(docs, "StatefulSet", "relay")
    relay = relay_container(docs)
    env = container_env(statefulset, "relay", docs)
    assert env_var(relay, "RELAY_NODE_ID")["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    assert f"relay-{env['RELAY_NODE_ID']}" == POD["metadata.name"]  # relay-{node} is the pod's name
    (http,) = [p["containerPort"] for p in relay["ports"] if p["name"] == "http"]
    assert env["RELAY_ADVERTISE_URL"] == f"http://{POD['status.podIP']}:{http}"
    headless = the(docs, "Service", statefulset["spec"]["serviceName"])
    template = urlsplit(env["RELAY_PEER_URL_TEMPLATE"])
    assert template.hostname == f"{statefulset['metadata']['name']}-{{node}}.{headless['metadata']['name']}"
    assert template.port in [p["port"] for p in headless["spec"]["ports"]]
    assert template.port == http  # the headless Service's DNS names the pod itself: its own port
    redis = urlsplit(env["RELAY_REDIS_URL"])
    service = the(docs, "Service", redis.hostname)
    assert redis.port in [p["port"] for p in service["spec"]["ports"]]
    redis_pods = the(docs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], redis_pods)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_settings_load(name):
    """The relay accepts the manifests' settings with real secrets, and refuses to start on the placeholders."""
    docs = built(name)
    statefulset = the(docs, "StatefulSet", "relay")
    settings = Settings.load(container_env(statefulset, "relay", docs, REAL_SECRETS))
    assert settings.host == "0.0.0.0" and settings.api_keys
    with pytest.raises(SettingsError):
        Settings.load(container_env(statefulset, "relay", docs))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_secrets_are_placeholders(name):
    docs = built(name)
    referenced = {(var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
                  for workload in workloads(docs) for c in workload["spec"]["template"]["spec"]["containers"]
                  for var in c.get("env", []) if "secretKeyRef" in var.get("valueFrom", {})}
    secrets = of_kind(docs, "Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret  # readable placeholders only, no base64 to hide a value in
        for key, value in secret["stringData"].items():
            assert value == PLACEHOLDER, f"{secret['metadata']['name']}.{key} holds a value"
    defined = {(s["metadata"]["name"], key) for s in secrets for key in s["stringData"]}
    assert referenced <= defined
    # Secrets travel in Secrets only: no literal value of a secret setting.
    relay = relay_container(docs)
    for var in relay["env"]:
        if var["name"] in {"RELAY_API_KEYS", "RELAY_TOKEN_SECRET", "RELAY_CLUSTER_SECRET", "OPENAI_API_KEY",
                           "RELAY_TURN_SECRET", "RELAY_UPSTREAM_API_KEY"}:
            assert "secretKeyRef" in var["valueFrom"], var["name"]


def test_redis_keeps_nothing_on_disk_and_only_relays_reach_it():
    docs = built("base")
    redis = container(the(docs, "Deployment", "redis"), "redis")
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    policy = the(docs, "NetworkPolicy", "redis")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "relay"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_the_host_network_overlay():
    docs = built("host-network")
    spec = the(docs, "StatefulSet", "relay")["spec"]["template"]["spec"]
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # redis and relay-N.relay-internal still resolve
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"  # one relay per node: they share its ports
    assert selects(term["labelSelector"]["matchLabels"], the(docs, "StatefulSet", "relay")["spec"]["template"]
                   ["metadata"]["labels"])
    relay = relay_container(docs)
    assert all(p["hostPort"] == p["containerPort"] for p in relay["ports"])
    assert env_var(relay, "RELAY_ICE_ADDRESSES")["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # A podSelector does not match relays on the host network: the base's Redis policy would lock them out.
    assert not [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "redis"]


def test_the_turn_gateway_wiring():
    docs = built("turn-gateway")
    statefulset = the(docs, "StatefulSet", "relay")
    relay = relay_container(docs)
    env = container_env(statefulset, "relay", docs)
    coturn = the(docs, "Deployment", "coturn")
    config = coturn_config(docs)
    options = dict(config)
    # The relays gather their pod address only, and do not allocate on the gateway themselves.
    assert env_var(relay, "RELAY_ICE_ADDRESSES")["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env.get("RELAY_TURN_FOR_RELAY", "false") == "false"
    # TURN REST: coturn checks with the secret the relays mint with; the secret is not in the ConfigMap.
    assert "use-auth-secret" in options and "static-auth-secret" not in options and options["realm"]
    relay_secret = env_var(relay, "RELAY_TURN_SECRET")["valueFrom"]["secretKeyRef"]
    coturn_secret = env_var(container(coturn, "coturn"), "TURN_SECRET")["valueFrom"]["secretKeyRef"]
    assert relay_secret == coturn_secret
    assert "TURN_SECRET" in " ".join(container(coturn, "coturn")["args"])
    # The URLs the relays hand out name the gateway's Service: its port, with each transport it carries.
    service = the(docs, "Service", "turn")
    assert service["spec"]["type"] == "LoadBalancer"
    published = {(p["protocol"].lower(), p["port"]) for p in service["spec"]["ports"]}
    urls = env["RELAY_TURN_URLS"].split(",")
    handed_out = {(re.search(r"transport=(udp|tcp)", url).group(1), int(re.search(r":(\d+)\?", url).group(1)))
                  for url in urls}
    assert handed_out == published
    declared = {(p["protocol"].lower(), p["containerPort"]) for p in container(coturn, "coturn")["ports"]}
    assert declared == published
    assert {port for _, port in published} == {int(options["listening-port"])}
    # The relays' UDP range is open to coturn only, and coturn sends nowhere else.
    low, high = udp_range(docs)
    relay_policy = the(docs, "NetworkPolicy", "relay")
    media = [rule for rule in relay_policy["spec"]["ingress"] if any(p["protocol"] == "UDP" for p in rule["ports"])]
    assert media == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "coturn"}}}],
                      "ports": [{"protocol": "UDP", "port": low, "endPort": high}]}]
    assert [p for rule in relay_policy["spec"]["ingress"] for p in rule["ports"] if p["protocol"] == "TCP"] == \
        [{"protocol": "TCP", "port": int(env["RELAY_PORT"])}]
    coturn_policy = the(docs, "NetworkPolicy", "coturn")
    assert coturn_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert coturn_policy["spec"]["egress"] == [
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "relay"}}}],
         "ports": [{"protocol": "UDP", "port": low, "endPort": high}]}]
    relayed = {"protocol": "UDP", "port": int(options["min-port"]), "endPort": int(options["max-port"])}
    assert {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "relay"}}}],
            "ports": [relayed]} in coturn_policy["spec"]["ingress"]
    # Peers: the pod network only; nothing else private, loopback or link-local (the nodes' metadata endpoint).
    denied = [value for key, value in config if key == "denied-peer-ip"]
    for needed in ("10.0.0.0-10.255.255.255", "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255",
                   "127.0.0.0-127.255.255.255", "169.254.0.0-169.254.255.255"):
        assert needed in denied
    assert "no-tcp-relay" in options and "no-multicast-peers" in options and "no-cli" in options


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        return udp.getsockname()[1]


async def test_coturn_takes_the_gateways_config_and_the_relays_credentials(tmp_path):
    """Debian's coturn (the image's version, 4.6) starts on the ConfigMap's settings without a complaint, and
    allocates for a credential the relay mints from the same secret (what /relay/client-config hands out)."""
    if shutil.which("turnserver") is None:
        _unavailable("coturn's turnserver is not installed (apt-get install coturn)")
    import asyncio

    from aioice.stun import TransactionFailed
    from aioice.turn import create_turn_endpoint

    from relay.webrtc.ice import turn_credential

    docs = built("turn-gateway")
    secret = REAL_SECRETS["relay-turn"]["secret"]
    text = the(docs, "ConfigMap", "coturn")["data"]["turnserver.conf"].replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "turnserver.conf").write_text(text + f"static-auth-secret={secret}\n")
    port = _free_port()
    log = tmp_path / "turnserver.log"
    with log.open("w") as output:
        # Loopback stands in for the pod address (--relay-ip, as the Deployment passes $POD_IP).
        process = subprocess.Popen(["turnserver", "-c", str(tmp_path / "turnserver.conf"), "--relay-ip=127.0.0.1",
                                    "--listening-ip=127.0.0.1", f"--listening-port={port}"],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "Total General servers" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        assert "Bad configuration format" not in log.read_text(), log.read_text()
        username, password = turn_credential(secret, "test", 600, time.time())
        transport, _ = await asyncio.wait_for(create_turn_endpoint(
            asyncio.DatagramProtocol, ("127.0.0.1", port), username, password), 10)
        try:
            relayed = transport.get_extra_info("sockname")
            options = dict(coturn_config(docs))
            assert int(options["min-port"]) <= relayed[1] <= int(options["max-port"])
        finally:
            transport.close()
        # A credential from another secret is refused (401 Unauthorized).
        username, password = turn_credential("f6" * 32, "test", 600, time.time())
        with pytest.raises(TransactionFailed, match="401"):
            await asyncio.wait_for(create_turn_endpoint(
                asyncio.DatagramProtocol, ("127.0.0.1", port), username, password), 10)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_docs_describe_these_manifests():
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for path in KUSTOMIZATIONS.values():
        assert str(path.relative_to(ROOT)) in docs, path
    low, high = udp_range(built("base"))
    assert f"{low} {high}" in docs or f"{low}–{high}" in docs or f"{low}-{high}" in docs
