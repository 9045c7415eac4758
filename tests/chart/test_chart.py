"""Tests of the Helm chart (charts/tokenfab), with Helm's own Go SDK and no helm binary.

Every values file in tests/chart/values/ (and the chart's defaults) is linted with
`helm_python.lint`, rendered with `helm_python.Chart.load(...).render(...)`, and every
rendered object is validated by kubernetes-validate in strict mode (unknown fields are
errors) against Kubernetes 1.34. Then the things that matter are asserted: replica counts,
peer addresses, RBAC rules (exactly the Kubernetes operator's calls), probes, resources,
security contexts, images, credentials, the operator's flags against the objects they
name (its control-plane URL, its agent selector, its service account and bindings), and the
simulator sweep's Indexed Job against the binary's own count of configurations (when a
tokenfab binary is built, it runs the Job's last index and is asked for one beyond it).
The planted-mistake tests at the end break a copy of the chart on purpose and check that
these same checks catch it, so a green run means something.

Objects of monitoring.coreos.com (ServiceMonitor, PrometheusRule) have no schema in
kubernetes-validate, and the Prometheus operator's published CRD schemas are not available
as data from PyPI or npm: npm's @kubernetes-models/prometheus-operator ships compiled
JavaScript validators generated from the operator's Go types (they need node and do not
reject unknown fields), and PyPI's cloudcoil-models-prometheus-operator ships pydantic
models whose recent releases do not install on this Python. So those objects are checked
structurally here (check_monitoring): known fields only, the ServiceMonitors point at
rendered Services and ports, and the PrometheusRule's groups are exactly the rules file in
deploy/prometheus/ (linted by promtool when it is installed).

Run: .venv/bin/python -m pytest tests/chart -q
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import tomllib

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tokenfab"
VALUES_DIR = pathlib.Path(__file__).resolve().parent / "values"
RULES_FILE = ROOT / "deploy" / "prometheus" / "tokenfab-rules.yaml"
KUBERNETES = "1.34.0"
RELEASE = "tf"
NAMESPACE = "inference"
FULLNAME = f"{RELEASE}-tokenfab"

VALUES_FILES = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
# "defaults" is the chart's values.yaml alone.
CASES = ["defaults", *VALUES_FILES]

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Kinds whose pods run to completion: no probes.
RUN_TO_COMPLETION = {"Job"}


# ---------------------------------------------------------------------------------------
# Rendering


def load_values(case: str) -> dict:
    if case == "defaults":
        return {}
    return yaml.safe_load((VALUES_DIR / case).read_text()) or {}


def render_chart(chart_dir: pathlib.Path, values: dict) -> tuple[list[dict], str]:
    """The rendered objects (each with its template in `_template`) and NOTES.txt."""
    with helm.Chart.load(str(chart_dir)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_template"] = template
                objects.append(doc)
    return objects, notes


@functools.lru_cache(maxsize=None)
def _rendered(case: str) -> tuple[str, str]:
    objects, notes = render_chart(CHART, load_values(case))
    return json.dumps(objects), notes


def rendered(case: str) -> list[dict]:
    """A fresh copy of the objects a case renders (rendered once per run)."""
    return json.loads(_rendered(case)[0])


def notes_of(case: str) -> str:
    return _rendered(case)[1]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(o, o["spec"]["template"]["spec"]) for o in objects if o["kind"] in POD_KINDS]


def containers(spec: dict) -> list[dict]:
    return spec.get("containers", []) + spec.get("initContainers", [])


def args_of(container: dict) -> list[str]:
    return [str(a) for a in container.get("args", [])]


def flag_values(container: dict, flag: str) -> list[str]:
    prefix = flag + "="
    return [a[len(prefix) :] for a in args_of(container) if a.startswith(prefix)]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def where(obj: dict) -> str:
    return f"{obj['kind']} {obj['metadata']['name']} ({obj.get('_template', '?')})"


# ---------------------------------------------------------------------------------------
# Checks, shared by the tests and the planted-mistake tests


def check_strict(objects: list[dict]) -> None:
    """kubernetes-validate --strict against Kubernetes 1.34 for every object it has a
    schema for; monitoring.coreos.com objects go to check_monitoring."""
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        body = {k: v for k, v in obj.items() if k != "_template"}
        try:
            kubernetes_validate.validate(body, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{where(obj)}: {path}: {e.message}") from None
        except kubernetes_validate.SchemaNotFoundError as e:
            raise AssertionError(f"{where(obj)}: no schema to validate it: {e.message}") from None


SERVICE_MONITOR_SPEC = {
    "jobLabel", "namespaceSelector", "selector", "endpoints", "targetLabels", "podTargetLabels",
    "sampleLimit", "targetLimit", "labelLimit", "attachMetadata", "scrapeClass",
}
SERVICE_MONITOR_ENDPOINT = {
    "port", "path", "scheme", "interval", "scrapeTimeout", "tlsConfig", "authorization",
    "relabelings", "metricRelabelings", "honorLabels", "params", "followRedirects", "enableHttp2",
}
TLS_CONFIG = {"ca", "cert", "keySecret", "serverName", "insecureSkipVerify"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
PROM_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def check_monitoring(objects: list[dict]) -> None:
    """Structural checks of ServiceMonitor and PrometheusRule (see the module's docstring)."""
    services = by_kind(objects, "Service")
    for sm in by_kind(objects, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1", where(sm)
        spec = sm["spec"]
        assert set(spec) <= SERVICE_MONITOR_SPEC, f"{where(sm)}: unknown fields {set(spec) - SERVICE_MONITOR_SPEC}"
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}, where(sm)
        wanted = spec["selector"]["matchLabels"]
        targets = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert targets, f"{where(sm)}: its selector {wanted} matches no rendered Service"
        for s in targets:
            assert spec["jobLabel"] in s["metadata"]["labels"], f"{where(sm)}: {where(s)} lacks the job label"
        assert spec["endpoints"], where(sm)
        for ep in spec["endpoints"]:
            assert set(ep) <= SERVICE_MONITOR_ENDPOINT, f"{where(sm)}: unknown endpoint fields {set(ep) - SERVICE_MONITOR_ENDPOINT}"
            for s in targets:
                ports = {p["name"] for p in s["spec"]["ports"]}
                assert ep["port"] in ports, f"{where(sm)}: port {ep['port']!r} is not a port of {where(s)}"
            assert ep["path"] == "/metrics"
            assert ep["scheme"] in ("http", "https")
            for field in ("interval", "scrapeTimeout"):
                assert PROM_DURATION.match(ep[field]), f"{where(sm)}: {field} {ep[field]!r}"
            if "tlsConfig" in ep:
                assert set(ep["tlsConfig"]) <= TLS_CONFIG, where(sm)
            if "authorization" in ep:
                auth = ep["authorization"]
                assert auth["type"] == "Bearer" and set(auth["credentials"]) == {"name", "key"}, where(sm)
            for r in ep.get("relabelings", []):
                assert set(r) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator"}, where(sm)
    for pr in by_kind(objects, "PrometheusRule"):
        assert pr["apiVersion"] == "monitoring.coreos.com/v1", where(pr)
        assert set(pr["spec"]) == {"groups"}, where(pr)
        for group in pr["spec"]["groups"]:
            assert set(group) <= {"name", "interval", "rules", "limit"} and group["rules"], where(pr)
            for rule in group["rules"]:
                assert set(rule) <= RULE_KEYS, f"{where(pr)}: unknown rule fields {set(rule) - RULE_KEYS}"
                assert ("alert" in rule) != ("record" in rule), f"{where(pr)}: a rule is an alert or a record"
                assert isinstance(rule["expr"], str) and rule["expr"].strip()
                if "for" in rule:
                    assert PROM_DURATION.match(rule["for"]), rule["for"]
                for field in ("labels", "annotations"):
                    assert all(isinstance(v, str) for v in rule.get(field, {}).values())


def check_rbac(objects: list[dict], node_patch: bool = False) -> None:
    """No wildcard anywhere; cluster-wide permissions read-only, except `patch` on nodes
    when `node_patch` (the operator's drain marks, with operator.followDrain); bindings only
    to the operator's account."""
    read_only = {"get", "list", "watch"}
    for role in by_kind(objects, "Role") + by_kind(objects, "ClusterRole"):
        assert "aggregationRule" not in role, where(role)
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{where(role)}: wildcard in {field}: {rule}"
            assert "nonResourceURLs" not in rule, where(role)
            # An empty resourceNames list means every name: a rule names some or leaves it out.
            assert rule.get("resourceNames", ["?"]), f"{where(role)}: empty resourceNames: {rule}"
            if role["kind"] == "ClusterRole":
                writes = set(rule["verbs"]) - read_only
                if node_patch and rule["apiGroups"] == [""] and rule["resources"] == ["nodes"]:
                    writes -= {"patch"}
                assert not writes, f"{where(role)}: cluster-wide verbs {rule['verbs']} are not read-only"
    for binding in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{FULLNAME}-operator", "namespace": NAMESPACE}
        ], f"{where(binding)}: binds {binding['subjects']}"


def check_probes(objects: list[dict]) -> None:
    """Every long-running container (the operator's included: --health-listen) has
    readiness and liveness probes on a port it has. Pods that run to completion (the
    sweep's Jobs) have none."""
    for obj, spec in pod_specs(objects):
        if obj["kind"] in RUN_TO_COMPLETION:
            assert not any({"startupProbe", "readinessProbe", "livenessProbe"} & set(c) for c in containers(spec)), where(obj)
            continue
        for c in spec["containers"]:
            ports = {p["name"] for p in c.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe"):
                assert kind in c, f"{where(obj)}: container {c['name']} has no {kind}"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in c:
                    port = c[kind]["httpGet"]["port"]
                    assert port in ports, f"{where(obj)}: {kind} port {port!r} is not a container port ({sorted(ports)})"


def check_resources(objects: list[dict]) -> None:
    for obj, spec in pod_specs(objects):
        for c in containers(spec):
            res = c.get("resources", {})
            for want in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
                assert want[1] in res.get(want[0], {}), f"{where(obj)}: container {c['name']} has no {'.'.join(want)}"


def is_operator(spec: dict) -> bool:
    return any(c.get("command") == ["tokenfab-operator"] for c in spec["containers"])


def is_tokenfab(spec: dict) -> bool:
    return is_operator(spec) or any(c.get("command") == ["tokenfab"] for c in spec["containers"])


def check_security(objects: list[dict]) -> None:
    """tokenfab's containers (the operator's included): non-root, read-only root, no
    privilege escalation, no capabilities, RuntimeDefault seccomp. Every container: no
    privilege, no escalation, capabilities dropped. No pod but the operator's mounts an API
    token, and the operator's runs as its own account."""
    for obj, spec in pod_specs(objects):
        if is_operator(spec):
            assert spec.get("automountServiceAccountToken") is True, f"{where(obj)}: the operator needs its API token"
            assert spec["serviceAccountName"] == f"{FULLNAME}-operator", where(obj)
        else:
            assert spec.get("automountServiceAccountToken") is False, f"{where(obj)}: mounts an API token"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where(obj)
        pod = spec.get("securityContext", {})
        for c in containers(spec):
            sc = c.get("securityContext", {})
            what = f"{where(obj)}: container {c['name']}"
            assert not sc.get("privileged"), f"{what} is privileged"
            assert sc.get("allowPrivilegeEscalation") is False, f"{what} allows privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what} keeps capabilities"
            assert not sc.get("capabilities", {}).get("add"), f"{what} adds capabilities"
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{what}: seccomp {seccomp}"
            if is_tokenfab(spec):
                assert sc.get("readOnlyRootFilesystem") is True, f"{what}: root filesystem is writable"
                assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{what} may run as root"
                assert pod.get("runAsUser", 0) != 0, f"{what} runs as UID 0"


def check_registry(objects: list[dict], registry: str, pull_secret: str) -> None:
    for obj, spec in pod_specs(objects):
        for c in containers(spec):
            assert c["image"].startswith(registry + "/"), f"{where(obj)}: container {c['name']} pulls {c['image']}"
        assert {"name": pull_secret} in spec.get("imagePullSecrets", []), f"{where(obj)} has no pull secret"


def labels_match(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def parse_selector(text: str) -> dict:
    """A label selector of equality terms ("k=v,k=v"), as the operator's flags take them."""
    terms = [t.split("=", 1) for t in text.split(",")]
    assert all(len(t) == 2 and t[0] and "!" not in t[0] for t in terms), f"not k=v terms: {text!r}"
    return dict(terms)


def check_operator(objects: list[dict]) -> None:
    """The operator's flags name what the release renders: --control-url is the control
    plane's HTTP Service and port, --agent-selector selects exactly the agent DaemonSet's
    pods, --namespace comes from the downward API; its account is the one the RBAC binds, and
    the RBAC names the engine Deployments and the ThroughputSLA it acts on."""
    dep = one(objects, "Deployment", f"{FULLNAME}-operator")
    spec = dep["spec"]["template"]["spec"]
    (op,) = spec["containers"]
    assert op["command"] == ["tokenfab-operator"] and args_of(op)[0] == "run", where(dep)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}, "one operator at a time"

    # --control-url: the Service of the control plane's port named http, and that port is
    # the one the server's --metrics-listen binds.
    sts, server = control_plane(objects)
    server_labels = sts["spec"]["template"]["metadata"]["labels"]
    (http_port,) = [p["containerPort"] for p in server["ports"] if p["name"] == "http"]
    assert flag_values(server, "--metrics-listen")[0].endswith(f":{http_port}")
    services = [
        (s, p)
        for s in by_kind(objects, "Service")
        if s["spec"].get("clusterIP") != "None" and labels_match(s["spec"]["selector"], server_labels)
        for p in s["spec"]["ports"]
        if p["targetPort"] == "http"
    ]
    assert len(services) == 1, f"one Service should serve the control plane's HTTP port, found {len(services)}"
    svc, port = services[0]
    url = f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port['port']}"
    assert flag_values(op, "--control-url") == [url], f"--control-url {flag_values(op, '--control-url')} is not {url}"

    # --agent-selector: the agent DaemonSet's pods, and no other pod of the release.
    ds = one(objects, "DaemonSet", f"{FULLNAME}-agent")
    (text,) = flag_values(op, "--agent-selector")
    selector = parse_selector(text)
    ds_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert labels_match(selector, ds_labels), f"--agent-selector {text} does not select the agent DaemonSet's pods (labels {ds_labels})"
    for obj, _ in pod_specs(objects):
        if obj is not ds:
            assert not labels_match(selector, obj["spec"]["template"]["metadata"]["labels"]), f"--agent-selector {text} also selects {where(obj)}"
    assert selector == ds["spec"]["selector"]["matchLabels"], f"--agent-selector {text} is not the DaemonSet's own selector"

    # --namespace: the pod's own, from the downward API.
    assert flag_values(op, "--namespace") == ["$(POD_NAMESPACE)"]
    assert env_of(op)["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    # Its account exists and is the one every binding names.
    account = spec["serviceAccountName"]
    assert ("ServiceAccount", account) in {(o["kind"], o["metadata"]["name"]) for o in objects}, f"no ServiceAccount {account}"
    bindings = by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding")
    assert {b["kind"] for b in bindings} == {"RoleBinding", "ClusterRoleBinding"}
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}], where(b)
        assert one(objects, b["roleRef"]["kind"], b["roleRef"]["name"]), where(b)

    # The RBAC's names are the objects the operator acts on.
    role = one(objects, "Role", f"{FULLNAME}-operator")
    named = {(r["resources"][0], v): set(r["resourceNames"]) for r in role["rules"] if "resourceNames" in r for v in r["verbs"]}
    engines = {d["metadata"]["name"] for d in by_kind(objects, "Deployment") if "tokenfab.io/model" in d["metadata"]["labels"]}
    if "--create-engines" in args_of(op):
        # It creates engines under names chosen at run time: not limited by name.
        assert ("deployments", "update") not in named, "a name list would keep it from scaling what it creates"
    else:
        assert named[("deployments", "update")] == engines, "the operator may scale exactly the engine Deployments"
    (sla,) = flag_values(op, "--sla-name")
    assert named[("throughputslas", "get")] == named[("throughputslas", "patch")] == named[("throughputslas/status", "patch")] == {sla}
    # --engine-selector: exactly this release's engine Deployments (besides tokenfab.io/model).
    (text,) = flag_values(op, "--engine-selector")
    eselector = dict(kv.split("=", 1) for kv in text.split(","))
    for d in by_kind(objects, "Deployment"):
        selected = labels_match(eselector, d["metadata"]["labels"]) and "tokenfab.io/model" in d["metadata"]["labels"]
        assert selected == (d["metadata"]["name"] in engines), f"--engine-selector {text} and {where(d)}"


def check_engine_labels(objects: list[dict], engines: list[dict]) -> None:
    """Each engine Deployment carries the labels the operator reads (reconcile.rs): what it
    runs, as engines.vllm says."""
    for e in engines:
        dep = one(objects, "Deployment", f"{FULLNAME}-vllm-{e['name']}")
        labels = dep["metadata"]["labels"]
        want = {"tokenfab.io/model": e["model"], "tokenfab.io/tensor-parallel": str(e["tensorParallelSize"])}
        if e.get("accelerator"):
            want["tokenfab.io/accelerator"] = e["accelerator"]
        got = {k: v for k, v in labels.items() if k in ("tokenfab.io/model", "tokenfab.io/accelerator", "tokenfab.io/tensor-parallel")}
        assert got == want, f"{where(dep)}: labels {got}, want {want}"
        assert isinstance(labels["tokenfab.io/tensor-parallel"], str)


# ---------------------------------------------------------------------------------------
# The chart as a whole


def test_every_value_is_commented():
    """Each key of values.yaml has a comment above it, except the fields of Kubernetes
    objects (security contexts, probes, resources, tolerations...) described as a whole."""
    kubernetes_objects = {"podSecurityContext", "securityContext", "resources", "updateStrategy", "tolerations", "nodeSelector", "affinity", "startup", "readiness", "liveness"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    bare = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)(?:- )?([A-Za-z][A-Za-z0-9_.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        parents = [(d, k) for d, k in parents if d < indent]
        inside_object = any(k in kubernetes_objects for _, k in parents)
        parents.append((indent, key))
        if not inside_object and not lines[i - 1].strip().startswith("#") and "#" not in line:
            bare.append(f"{i + 1}: {line.strip()}")
    assert bare == []


def test_crds_folder_exists_and_its_crds_are_valid():
    crds = CHART / "crds"
    assert crds.is_dir(), "charts/tokenfab/crds/ holds the generated ThroughputSLA CRD"
    with helm.Chart.load(str(CHART)) as chart:
        loaded = {c["filename"] for c in chart.crds}
    # Generated from the Rust type (`tokenfab-operator crd`; the Rust tests check it matches).
    crd_file = crds / "throughputsla.yaml"
    docs = [d for d in yaml.safe_load_all(crd_file.read_text()) if d]
    assert len(docs) == 1, f"{crd_file}: one CustomResourceDefinition"
    (crd,) = docs
    assert crd["kind"] == "CustomResourceDefinition"
    kubernetes_validate.validate(crd, KUBERNETES, strict=True)
    assert crd["spec"]["group"] == "tokenfab.io"
    assert crd["spec"]["names"]["kind"] == "ThroughputSLA"
    assert crd["spec"]["names"]["shortNames"] == ["tsla"], "NOTES.txt and docs/operations.md say `kubectl get tsla`"
    assert crd["spec"]["scope"] == "Namespaced", "the operator's Role is namespaced"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    # The operator writes the status through the status subresource (patch_status).
    assert v1["subresources"] == {"status": {}}
    assert set(v1["schema"]["openAPIV3Schema"]["properties"]) >= {"spec", "status"}
    assert loaded and all(name.endswith("throughputsla.yaml") for name in loaded), f"Helm loads {loaded} as CRDs"
    # The operator's Role names this CRD's group and plural.
    role = one(rendered("operator-on.yaml"), "Role", f"{FULLNAME}-operator")
    tokenfab_rules = [r for r in role["rules"] if r["apiGroups"] == [crd["spec"]["group"]]]
    plural = crd["spec"]["names"]["plural"]
    assert {res for r in tokenfab_rules for res in r["resources"]} == {plural, f"{plural}/status"}


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case):
    report = helm.lint(str(CHART), load_values(case), strict=True, namespace=NAMESPACE, kube_version="v" + KUBERNETES)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 ("icon is recommended") is information.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_validates_strictly(case):
    objects = rendered(case)
    assert objects
    check_strict(objects)
    check_monitoring(objects)
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, where(obj)


def operator_values(case: str) -> dict:
    return load_values(case).get("operator", {})


@pytest.mark.parametrize("case", CASES)
def test_rbac_is_least_privilege(case):
    """Without the operator: no RBAC, no operator account. With it: exactly the calls
    tokenfab-operator makes (crates/tokenfab-kube/src/api.rs and operator.rs)."""
    objects = rendered(case)
    rbac_kinds = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    if not operator_values(case).get("enabled"):
        assert [where(o) for o in objects if o["kind"] in rbac_kinds] == []
        assert ("ServiceAccount", f"{FULLNAME}-operator") not in {(o["kind"], o["metadata"]["name"]) for o in objects}
        return
    follow_drain = operator_values(case).get("followDrain", True)
    check_rbac(objects, node_patch=follow_drain)
    assert_operator_rbac(objects, follow_drain, create_engines=operator_values(case).get("createEngines", True))


def assert_operator_rbac(objects: list[dict], follow_drain: bool, sla: str = FULLNAME, create_engines: bool = True) -> None:
    cluster_role = one(objects, "ClusterRole", f"{FULLNAME}-{NAMESPACE}-operator")
    # Discovery and the node watch (a reflector: list, then watch); drain marks by patch.
    nodes = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
    if follow_drain:
        nodes.append({"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]})
    assert cluster_role["rules"] == nodes
    engines = [d["metadata"]["name"] for d in by_kind(objects, "Deployment") if "tokenfab.io/engine" in d["metadata"]["labels"]]
    role = one(objects, "Role", f"{FULLNAME}-operator")
    rules = [
        # Each round lists the engine Deployments; a scale is get, then replace (update).
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]},
        # With createEngines the operator also creates engine Deployments under names it
        # chooses at run time and deletes them when idle (derive.rs): not limited by name.
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "update", "create", "delete"]}
        if create_engines
        else {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "update"], "resourceNames": engines},
    ]
    if follow_drain:
        # Which nodes still run an agent pod.
        rules.append({"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]})
    rules += [
        # publish(): get_opt, a spec patch when the settings changed, create when missing,
        # patch_status.
        {"apiGroups": ["tokenfab.io"], "resources": ["throughputslas"], "verbs": ["get", "patch"], "resourceNames": [sla]},
        {"apiGroups": ["tokenfab.io"], "resources": ["throughputslas"], "verbs": ["create"]},
        {"apiGroups": ["tokenfab.io"], "resources": ["throughputslas/status"], "verbs": ["patch"], "resourceNames": [sla]},
    ]
    assert role["rules"] == rules
    assert one(objects, "ClusterRoleBinding", cluster_role["metadata"]["name"])["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert one(objects, "RoleBinding", f"{FULLNAME}-operator")["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": f"{FULLNAME}-operator",
    }
    assert len(by_kind(objects, "ClusterRole")) == 1 and len(by_kind(objects, "Role")) == 1


@pytest.mark.parametrize("case", CASES)
def test_probes_resources_and_security_contexts(case):
    objects = rendered(case)
    check_probes(objects)
    check_resources(objects)
    check_security(objects)


@pytest.mark.parametrize("case", CASES)
def test_services_reach_their_pods(case):
    """Every Service selects a rendered pod template, and its target ports are named ports
    of that pod's containers."""
    objects = rendered(case)
    pods = pod_specs(objects)
    for svc in by_kind(objects, "Service"):
        selector = svc["spec"]["selector"]
        matching = [(o, s) for o, s in pods if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert matching, f"{where(svc)} selects no pod"
        for _, spec in matching:
            names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in names, f"{where(svc)}: targetPort {port['targetPort']} not in {names}"


@pytest.mark.parametrize("case", CASES)
def test_mounted_secrets_and_config_maps_exist(case):
    """A volume names a Secret or ConfigMap the release renders, or one the values name."""
    values = load_values(case)
    objects = rendered(case)
    rendered_names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    named_in_values = set(re.findall(r"\b[a-z0-9][a-z0-9-]*\b", json.dumps(values)))
    for obj, spec in pod_specs(objects):
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                name = vol["secret"]["secretName"]
                assert ("Secret", name) in rendered_names or name in named_in_values, f"{where(obj)}: Secret {name}"
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in rendered_names, where(obj)


# ---------------------------------------------------------------------------------------
# The control plane


def control_plane(objects):
    sts = one(objects, "StatefulSet", FULLNAME)
    return sts, sts["spec"]["template"]["spec"]["containers"][0]


def test_single_node_control_plane():
    objects = rendered("single-node.yaml")
    sts, server = control_plane(objects)
    assert sts["spec"]["replicas"] == 1
    assert by_kind(objects, "PodDisruptionBudget") == []
    assert "affinity" not in sts["spec"]["template"]["spec"]
    assert "TOKENFAB_REPLICA_NAME" not in env_of(server) and flag_values(server, "--store") == []
    # The store on a claim of its own.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert {"name": "data", "mountPath": "/var/lib/tokenfab"} in server["volumeMounts"]
    assert flag_values(server, "--data-dir") == ["/var/lib/tokenfab/store"]
    # Flags from values.
    assert flag_values(server, "--models") == ["llama-3.1-8b,llama-3.1-70b"]
    assert flag_values(server, "--sla-class") == ["premium", "standard", "bulk:best-effort"]
    assert flag_values(server, "--default-sla-class") == ["standard"]
    assert flag_values(server, "--retention") == ["7d"]
    assert flag_values(server, "--profile") == ["/etc/tokenfab/profiles/llama-3.1-8b-h100.toml"]
    profiles = one(objects, "ConfigMap", f"{FULLNAME}-control-plane-profiles")
    assert 'model = "llama-3.1-8b"' in profiles["data"]["llama-3.1-8b-h100.toml"]
    # Listeners inside the pod, probes on /healthz (alive) and /readyz (serving).
    assert flag_values(server, "--listen") == ["0.0.0.0:7443"]
    assert flag_values(server, "--metrics-listen") == ["0.0.0.0:9464"]
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert server[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTP"}
    assert server["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}


def test_ha_control_plane_shares_etcd_and_agents_follow_the_elected_replica():
    objects = rendered("ha.yaml")
    sts, server = control_plane(objects)
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # The etcd store backend, each replica named by its pod.
    assert flag_values(server, "--store") == ["etcd"]
    assert flag_values(server, "--etcd-endpoints") == [
        "http://etcd-0.etcd.inference.svc:2379,http://etcd-1.etcd.inference.svc:2379,http://etcd-2.etcd.inference.svc:2379"
    ]
    assert flag_values(server, "--etcd-prefix") == [f"/tokenfab/{NAMESPACE}/{RELEASE}"]
    assert flag_values(server, "--etcd-lease-ttl") == ["5s"]
    assert env_of(server)["TOKENFAB_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Only the elected replica is ready (/readyz), so the Services send traffic to it alone;
    # the waiting ones stay alive (/healthz).
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The headless Service governs the StatefulSet and publishes every replica, ready or not.
    peers_svc = one(objects, "Service", f"{FULLNAME}-peers")
    assert sts["spec"]["serviceName"] == peers_svc["metadata"]["name"]
    assert peers_svc["spec"]["clusterIP"] == "None" and peers_svc["spec"]["publishNotReadyAddresses"] is True
    assert [p["name"] for p in peers_svc["spec"]["ports"]] == ["grpc"]
    # Agents get every replica's gRPC address through it, and follow the elected one.
    agent = one(objects, "DaemonSet", f"{FULLNAME}-agent")["spec"]["template"]["spec"]["containers"][0]
    assert flag_values(agent, "--control") == [
        ",".join(f"http://{FULLNAME}-{i}.{FULLNAME}-peers.{NAMESPACE}.svc.cluster.local:7443" for i in range(3))
    ]
    # A drain takes one replica at a time; no two replicas on one node.
    pdb = one(objects, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    (term,) = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert "share the etcd at" in notes_of("ha.yaml") and "--features etcd" in notes_of("ha.yaml")


def test_ha_control_plane_on_raft_names_every_peer_and_opens_the_peer_port():
    objects = rendered("ha-raft.yaml")
    sts, server = control_plane(objects)
    assert sts["spec"]["replicas"] == 3
    # The Raft store backend: every replica's peer URL through the headless Service, its id
    # from its pod's name (the binary derives it: NAME-N is N+1), the same list everywhere.
    assert flag_values(server, "--store") == ["raft"]
    assert flag_values(server, "--raft-peers") == [
        ",".join(f"{i + 1}=http://{FULLNAME}-{i}.{FULLNAME}-peers.{NAMESPACE}.svc.cluster.local:7400" for i in range(3))
    ]
    assert flag_values(server, "--raft-listen") == ["0.0.0.0:7400"]
    assert flag_values(server, "--raft-compact-every") == ["5000"]
    assert flag_values(server, "--raft-id") == [] and flag_values(server, "--etcd-endpoints") == []
    assert {"name": "raft", "containerPort": 7400, "protocol": "TCP"} in server["ports"]
    peers_svc = one(objects, "Service", f"{FULLNAME}-peers")
    assert [(p["name"], p["port"]) for p in peers_svc["spec"]["ports"]] == [("grpc", 7443), ("raft", 7400)]
    assert peers_svc["spec"]["publishNotReadyAddresses"] is True
    # Only the leader is ready; agents are given every replica.
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    agent = one(objects, "DaemonSet", f"{FULLNAME}-agent")["spec"]["template"]["spec"]["containers"][0]
    assert flag_values(agent, "--control") == [
        ",".join(f"http://{FULLNAME}-{i}.{FULLNAME}-peers.{NAMESPACE}.svc.cluster.local:7443" for i in range(3))
    ]
    notes = notes_of("ha-raft.yaml")
    assert "one Raft group" in notes and "--features raft" in notes and "admin members --raft-peers" in notes


def test_more_than_one_replica_without_ha_is_refused_with_the_reason():
    with pytest.raises(helm.HelmRenderError, match="More replicas need controlPlane.ha.enabled"):
        render_chart(CHART, {"controlPlane": {"replicas": 3}})
    etcd = {"endpoints": ["http://etcd:2379"], "prefix": "", "leaseTtl": "3s"}
    with pytest.raises(helm.HelmRenderError, match="at least 2 replicas"):
        render_chart(CHART, {"controlPlane": {"replicas": 1, "ha": {"enabled": True, "store": "etcd", "etcd": etcd}}})
    with pytest.raises(helm.HelmRenderError, match="needs controlPlane.ha.etcd.endpoints"):
        render_chart(CHART, {"controlPlane": {"replicas": 2, "ha": {"enabled": True, "store": "etcd"}}})
    # Raft needs a majority that survives a loss: an odd number, 3 or more.
    for replicas in (2, 4):
        with pytest.raises(helm.HelmRenderError, match="needs an odd number of replicas, 3 or more"):
            render_chart(CHART, {"controlPlane": {"replicas": replicas, "ha": {"enabled": True}}})


def test_tls_turns_every_listener_and_client_to_tls():
    objects = rendered("tls-node-tokens.yaml")
    _, server = control_plane(objects)
    assert flag_values(server, "--tls-cert") == ["/etc/tokenfab/tls/tls.crt"]
    assert flag_values(server, "--tls-key") == ["/etc/tokenfab/tls/tls.key"]
    assert flag_values(server, "--agent-ca") == ["/etc/tokenfab/agent-ca/ca.crt"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["scheme"] == "HTTPS"
    agent = one(objects, "DaemonSet", f"{FULLNAME}-agent")["spec"]["template"]["spec"]["containers"][0]
    assert flag_values(agent, "--control") == [f"https://{FULLNAME}.{NAMESPACE}.svc.cluster.local:7443"]
    assert flag_values(agent, "--tls-ca") == ["/etc/tokenfab/tls-ca/ca.crt"]
    assert flag_values(agent, "--tls-cert") == ["/etc/tokenfab/agent-certs/$(TOKENFAB_NODE).crt"]
    # Each agent reads only its own node's token.
    assert flag_values(agent, "--agent-token-file") == ["/etc/tokenfab/node-tokens/$(TOKENFAB_NODE)"]
    # Secrets the operator manages are used, none generated.
    assert [s["metadata"]["name"] for s in by_kind(objects, "Secret")] == []


# ---------------------------------------------------------------------------------------
# Agents and engines


def test_agents_run_on_gpu_nodes_and_drive_their_node_local_engines():
    objects = rendered("single-node.yaml")
    ds = one(objects, "DaemonSet", f"{FULLNAME}-agent")
    spec = ds["spec"]["template"]["spec"]
    agent = spec["containers"][0]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["terminationGracePeriodSeconds"] > 600, "an agent drains its running requests (up to --request-timeout 10m)"
    # A node labelled tokenfab.io/drain loses its agent (which drains); the user's own node
    # affinity is kept beside that condition.
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone-a"]},
        {"key": "tokenfab.io/drain", "operator": "DoesNotExist"},
    ]
    default_spec = one(rendered("defaults"), "DaemonSet", f"{FULLNAME}-agent")["spec"]["template"]["spec"]
    assert default_spec["affinity"] == {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "tokenfab.io/drain", "operator": "DoesNotExist"}]}]
            }
        }
    }
    env = env_of(agent)
    assert env["TOKENFAB_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert "nvidia.com/gpu" not in json.dumps(agent["resources"]), "the agent must not take GPUs from the engines"
    assert flag_values(agent, "--node") == ["$(TOKENFAB_NODE)"]
    assert flag_values(agent, "--devices") == ["nvml"]
    assert flag_values(agent, "--tuner") == ["active"]
    assert flag_values(agent, "--metrics-listen") == ["0.0.0.0:9465"]
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    replicas = [dict(kv.split("=", 1) for kv in r.split(",")) for r in flag_values(agent, "--replica")]
    assert replicas == [
        {
            "url": f"http://{FULLNAME}-vllm-llama-8b.{NAMESPACE}.svc.cluster.local:8000",
            "model": "llama-3.1-8b",
            "id": "llama-8b",
            "engine-model": "llama-3.1-8b",
            "window": "128",
            "max": "512",
        },
        {
            "url": f"http://{FULLNAME}-vllm-llama-70b.{NAMESPACE}.svc.cluster.local:8000",
            "model": "llama-3.1-70b",
            "id": "llama-70b",
            "engine-model": "llama70",
            "window": "64",
            "max": "256",
            "gpus": "4-7",
        },
    ]
    for r in replicas:
        svc = one(objects, "Service", r["url"].split("//")[1].split(".")[0])
        assert svc["spec"]["internalTrafficPolicy"] == "Local"
    # Agents (and their metrics) are scraped through a headless Service.
    metrics = one(objects, "Service", f"{FULLNAME}-agent-metrics")
    assert metrics["spec"]["clusterIP"] == "None"


def test_vllm_deployments_per_model_and_pool():
    objects = rendered("single-node.yaml")
    big = one(objects, "Deployment", f"{FULLNAME}-vllm-llama-70b")
    spec = big["spec"]["template"]["spec"]
    vllm = spec["containers"][0]
    assert big["spec"]["replicas"] == 1
    assert big["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert vllm["image"] == "docker.io/vllm/vllm-openai:v0.11.0"
    assert "--model=meta-llama/Llama-3.1-70B-Instruct" in vllm["args"]
    assert "--tensor-parallel-size=4" in vllm["args"]
    assert "--served-model-name=llama70" in vllm["args"]
    assert "--max-model-len=32768" in vllm["args"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert vllm["resources"]["requests"]["memory"] == "128Gi"
    assert env_of(vllm)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["enableServiceLinks"] is False
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]
    assert {v["name"]: v for v in spec["volumes"]}["shm"]["emptyDir"]["medium"] == "Memory"
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"


def test_external_engines_get_one_agent_of_their_own():
    objects = rendered("airgapped.yaml")
    dep = one(objects, "Deployment", f"{FULLNAME}-external-agent")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}, "two agents must never act as one node"
    agent = dep["spec"]["template"]["spec"]["containers"][0]
    assert env_of(agent)["TOKENFAB_NODE"]["value"] == "external"
    assert flag_values(agent, "--devices") == ["none"]
    assert flag_values(agent, "--replica") == [
        "url=http://sglang.inference.svc:30000,model=llama-3.1-8b,id=sglang-a,"
        "engine-model=meta-llama/Llama-3.1-8B-Instruct,window=32,max=256"
    ]
    # The node agents drive only the chart's own vLLM engines.
    ds_agent = one(objects, "DaemonSet", f"{FULLNAME}-agent")["spec"]["template"]["spec"]["containers"][0]
    assert all("sglang" not in r for r in flag_values(ds_agent, "--replica"))


def test_an_agent_without_engines_is_refused():
    with pytest.raises(helm.HelmRenderError, match="no engine is configured"):
        render_chart(CHART, {"engines": {"vllm": []}})
    objects, _ = render_chart(CHART, {"engines": {"vllm": []}, "agent": {"enabled": False}})
    assert by_kind(objects, "DaemonSet") == [] and by_kind(objects, "StatefulSet")


# ---------------------------------------------------------------------------------------
# The Kubernetes operator


def operator_without_drain() -> dict:
    """operator-on.yaml, advisory, not following cordons, not creating engines, without the
    HTTP token, with its own ThroughputSLA name."""
    values = load_values("operator-on.yaml")
    values["operator"] = {"enabled": True, "followDrain": False, "createEngines": False, "slaName": "inference-sla"}
    values["secrets"] = {"http": {"enabled": False}}
    return values


@functools.lru_cache(maxsize=None)
def _rendered_without_drain() -> str:
    return json.dumps(render_chart(CHART, operator_without_drain())[0])


def test_the_operator_is_off_by_default():
    objects = rendered("defaults")
    assert not any(is_operator(s) for _, s in pod_specs(objects))
    assert "Kubernetes operator" not in notes_of("defaults")
    # The engines still say what they run; no accelerator is given, so no such label.
    check_engine_labels(objects, yaml.safe_load((CHART / "values.yaml").read_text())["engines"]["vllm"])


def test_the_operator_acts_on_what_the_release_renders():
    objects = rendered("operator-on.yaml")
    check_operator(objects)
    dep = one(objects, "Deployment", f"{FULLNAME}-operator")
    spec = dep["spec"]["template"]["spec"]
    (op,) = spec["containers"]
    # The same image as the control plane: one image ships both binaries.
    assert op["image"] == control_plane(objects)[1]["image"]
    assert flag_values(op, "--mode") == ["active"]
    assert flag_values(op, "--interval") == ["1m"]
    assert flag_values(op, "--min-interval") == ["10m"]
    assert flag_values(op, "--scale-down-after") == ["30m"]
    assert flag_values(op, "--max-step") == ["1"]
    assert flag_values(op, "--sla-name") == [FULLNAME]
    assert "--no-drain" not in args_of(op)
    assert "--create-engines" in args_of(op)
    assert flag_values(op, "--agent-selector") == [
        f"app.kubernetes.io/component=agent,app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=tokenfab"
    ]
    # The control plane requires the HTTP token: the operator sends it, from the same Secret.
    assert flag_values(op, "--http-token-file") == ["/etc/tokenfab/http-token/http-token"]
    (vol,) = spec["volumes"]
    assert vol["secret"]["secretName"] == f"{FULLNAME}-http-token" and vol["secret"]["items"] == [{"key": "http-token", "path": "http-token"}]
    assert {"name": "http-token", "mountPath": "/etc/tokenfab/http-token", "readOnly": True} in op["volumeMounts"]
    assert spec["securityContext"]["fsGroup"] == 65532, "the token's file is 0440, readable through the group"
    assert flag_values(control_plane(objects)[1], "--http-token-file") == ["/etc/tokenfab/http-token/http-token"]
    check_rbac(objects, node_patch=True)
    notes = notes_of("operator-on.yaml")
    assert f"kubectl -n {NAMESPACE} get tsla {FULLNAME}" in notes
    assert "owns their" in notes and "give each engine one pod per node" not in notes


def test_the_operator_without_drain_gets_no_write_outside_the_namespace():
    objects = json.loads(_rendered_without_drain())
    # What differs from operator-on.yaml (validated with every case): the operator and its RBAC.
    check_strict([o for o in objects if o["metadata"]["name"].endswith("-operator")])
    check_operator(objects)
    check_rbac(objects, node_patch=False)
    assert_operator_rbac(objects, follow_drain=False, sla="inference-sla", create_engines=False)
    (op,) = one(objects, "Deployment", f"{FULLNAME}-operator")["spec"]["template"]["spec"]["containers"]
    assert "--no-drain" in args_of(op) and "--create-engines" not in args_of(op)
    assert flag_values(op, "--mode") == ["advisory"]
    assert flag_values(op, "--interval") == ["30s"] and flag_values(op, "--max-step") == ["2"]
    assert flag_values(op, "--sla-name") == ["inference-sla"]
    assert flag_values(op, "--http-token-file") == [] and "volumeMounts" not in op


def test_engines_carry_the_labels_the_operator_reads():
    values = load_values("operator-on.yaml")
    objects = rendered("operator-on.yaml")
    check_engine_labels(objects, values["engines"]["vllm"])
    # One model on two pools: the L40S pool starts empty, on its own nodes.
    l40s = one(objects, "Deployment", f"{FULLNAME}-vllm-llama-8b-l40s")
    assert l40s["spec"]["replicas"] == 0
    (term,) = l40s["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L40S"]}]
    big = one(objects, "Deployment", f"{FULLNAME}-vllm-llama-70b-h100")
    assert big["metadata"]["labels"]["tokenfab.io/tensor-parallel"] == "4"
    # Engine entries that leave out maxNumSeqs get the default, as the agent's max does.
    vllm = big["spec"]["template"]["spec"]["containers"][0]
    assert "--max-num-seqs=256" in vllm["args"]
    check_engine_labels(rendered("single-node.yaml"), load_values("single-node.yaml")["engines"]["vllm"])


def operator_binary() -> pathlib.Path | None:
    found = [pathlib.Path(os.environ["TOKENFAB_OPERATOR_BIN"])] if os.environ.get("TOKENFAB_OPERATOR_BIN") else []
    found += [ROOT / "target" / d / "tokenfab-operator" for d in ("debug", "release")]
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def engine_deployments(objects: list[dict]) -> list[dict]:
    return [d for d in by_kind(objects, "Deployment") if "tokenfab.io/engine" in d["metadata"]["labels"]]


@pytest.mark.parametrize("case", CASES)
def test_each_engine_deployment_selects_only_its_own_pods(case):
    """Engine Deployments select their pods by tokenfab.io/deployment, so none selects
    another's pods (the operator's variants included: they differ in that label only), while
    the node-local Service selects every variant of its engine by tokenfab.io/engine."""
    engines = engine_deployments(rendered(case))
    for d in engines:
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.get("tokenfab.io/deployment") == d["metadata"]["name"], where(d)
        for other in engines:
            if other is not d:
                assert not labels_match(selector, other["spec"]["template"]["metadata"]["labels"]), f"{where(d)} selects the pods of {where(other)}"


def derive_with_operator(template: dict, *args: str) -> subprocess.CompletedProcess:
    body = {k: v for k, v in template.items() if k != "_template"}
    return subprocess.run(
        [str(operator_binary()), "derive", "--from", "-", *args],
        input=yaml.safe_dump(body), capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(operator_binary() is None, reason="no tokenfab-operator binary built (target/debug or target/release)")
def test_what_the_operator_creates_from_a_chart_engine_is_valid_and_reached_by_its_service():
    """`tokenfab-operator derive` prints the Deployment the operator would create (the same
    code as its rounds: derive.rs) from the chart's rendered engine: another pool at another
    tensor-parallel degree, and one pinned to an NVLink clique. Each is valid Kubernetes 1.34
    (strict), selects only its own pods, and the engine's Service still reaches its pods."""
    objects = rendered("operator-on.yaml")
    template = one(objects, "Deployment", f"{FULLNAME}-vllm-llama-8b-h100")
    service = one(objects, "Service", f"{FULLNAME}-vllm-llama-8b-h100")
    variants = {
        "l40s-tp2": ["--accelerator", "l40s", "--tp", "2", "--gpu-product", "NVIDIA-L40S"],
        "pinned": ["--accelerator", "h100-sxm", "--super-node", "nvidia.com/gpu.clique=7f3c1a2b.1", "--gpu-product", "NVIDIA-H100-80GB-HBM3"],
    }
    for what, args in variants.items():
        out = derive_with_operator(template, *args)
        assert out.returncode == 0, f"{what}: {out.stderr}"
        made = yaml.safe_load(out.stdout)
        made["_template"] = f"tokenfab-operator derive ({what})"
        check_strict([made])
        pod_labels = made["spec"]["template"]["metadata"]["labels"]
        assert labels_match(made["spec"]["selector"]["matchLabels"], pod_labels), what
        assert not labels_match(template["spec"]["selector"]["matchLabels"], pod_labels), f"{what}: the chart's Deployment would select it"
        assert not labels_match(made["spec"]["selector"]["matchLabels"], template["spec"]["template"]["metadata"]["labels"]), what
        assert labels_match(service["spec"]["selector"], pod_labels), f"{what}: the engine's Service does not reach it"
        assert made["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tokenfab-operator"
        assert made["metadata"]["ownerReferences"][0]["name"] == template["metadata"]["name"]
        (vllm,) = made["spec"]["template"]["spec"]["containers"]
        tp = "2" if what == "l40s-tp2" else "1"
        assert f"--tensor-parallel-size={tp}" in vllm["args"], vllm["args"]
        assert str(vllm["resources"]["limits"]["nvidia.com/gpu"]) == tp
        terms = made["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        if what == "pinned":
            assert all({"key": "nvidia.com/gpu.clique", "operator": "In", "values": ["7f3c1a2b.1"]} in t["matchExpressions"] for t in terms), terms
        else:
            assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L40S"]} in terms[1]["matchExpressions"], terms

    # A template whose selector lacks tokenfab.io/deployment (the chart's engines before
    # this label) is refused, with what to do.
    old = json.loads(json.dumps(template))
    del old["spec"]["selector"]["matchLabels"]["tokenfab.io/deployment"]
    out = derive_with_operator(old, "--accelerator", "l40s")
    assert out.returncode != 0 and "add the label to its selector" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"tls": {"enabled": True, "existingSecret": "tokenfab-tls"}}, "plain HTTP"),
        ({"engines": {"vllm": [{"name": "a", "model": "m", "hfModel": "x", "replicas": 1, "tensorParallelSize": 1, "gpuProduct": "NVIDIA-L40S"}]}}, '"a" has no accelerator'),
        ({"engines": {"vllm": [{"name": "a", "model": "m", "hfModel": "x", "replicas": 1, "tensorParallelSize": 1, "accelerator": "l40s"}]}}, '"a" has no gpuProduct'),
        (
            {"engines": {"vllm": [
                {"name": "a", "model": "m", "hfModel": "x", "replicas": 1, "tensorParallelSize": 2, "gpuProduct": "P", "accelerator": "l40s"},
                {"name": "b", "model": "m", "hfModel": "y", "replicas": 1, "tensorParallelSize": 2, "gpuProduct": "Q", "accelerator": "l40s"},
            ]}},
            r'"a" and "b" both run m on l40s \(tensor parallel 2\)',
        ),
        ({"serviceAccounts": {"operator": {"create": False}}}, "default account"),
        ({"agent": {"drainLabel": "example.com/maintenance"}}, "agent.drainLabel must be tokenfab.io/drain"),
    ],
)
def test_the_operator_is_refused_where_it_could_not_work(change, complaint):
    values = load_values("operator-on.yaml")
    for key, value in change.items():
        values[key] = {**values.get(key, {}), **value}
    with pytest.raises(helm.HelmRenderError, match=complaint):
        render_chart(CHART, values)


# ---------------------------------------------------------------------------------------
# Credentials


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    return data


def test_default_values_hold_no_credentials():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        else:
            yield path, node

    for path, value in walk(defaults, ""):
        leaf = path.rsplit(".", 1)[-1].lower()
        if leaf in ("token", "password", "agenttoken", "admintoken", "httptoken", "secret"):
            raise AssertionError(f"values.yaml has a credential field {path}")
        if leaf == "existingsecret" or leaf.endswith("secret"):
            assert value == "", f"{path} names a Secret by default"


def test_no_clear_text_token_outside_secrets_by_default():
    objects = rendered("defaults")
    secrets = {s["metadata"]["name"]: secret_data(s) for s in by_kind(objects, "Secret")}
    assert set(secrets) == {
        f"{FULLNAME}-agent-secret",
        f"{FULLNAME}-admin-token",
        f"{FULLNAME}-tenant-tokens",
        f"{FULLNAME}-tenants",
    }
    generated = [
        secrets[f"{FULLNAME}-agent-secret"]["agent-secret"],
        secrets[f"{FULLNAME}-admin-token"]["admin-token"],
        secrets[f"{FULLNAME}-tenant-tokens"]["default"],
    ]
    for value in generated:
        assert len(value) >= 32 and value.isalnum()
    # No generated value appears in any object but its own Secret (not in args, env,
    # ConfigMaps, annotations or NOTES).
    for obj in objects:
        if obj["kind"] == "Secret" and obj["metadata"]["name"] != f"{FULLNAME}-tenants":
            continue
        text = json.dumps(obj)
        for value in generated:
            assert value not in text, f"{where(obj)} holds a generated credential in clear text"
    assert not any(v in notes_of("defaults") for v in generated)
    # Secrets reach processes as files, never as flags or environment values.
    for obj, spec in pod_specs(objects):
        for c in containers(spec):
            for a in args_of(c):
                assert not re.match(r"--(agent-token|admin-token|tenant|token|http-token)=", a), f"{where(obj)}: {a}"
            for name, e in env_of(c).items():
                if name in ("TOKENFAB_AGENT_TOKEN", "TOKENFAB_ADMIN_TOKEN", "TOKENFAB_TOKEN", "HF_TOKEN"):
                    assert "value" not in e, f"{where(obj)}: {name} in clear text"
    # The control plane's tenants file holds the digest of the generated token, not the token.
    tenants = tomllib.loads(secrets[f"{FULLNAME}-tenants"]["tenants.toml"])["tenants"]
    token = secrets[f"{FULLNAME}-tenant-tokens"]["default"]
    assert tenants == [{"name": "default", "token_sha256": hashlib.sha256(token.encode()).hexdigest()}]
    # The token Secret is mounted by no pod.
    mounted = {v["secret"]["secretName"] for _, s in pod_specs(objects) for v in s.get("volumes", []) if "secret" in v}
    assert f"{FULLNAME}-tenant-tokens" not in mounted


def test_tenants_from_digests_make_a_valid_tenants_file():
    objects = rendered("single-node.yaml")
    assert [s["metadata"]["name"] for s in by_kind(objects, "Secret") if "tenant" in s["metadata"]["name"]] == [
        f"{FULLNAME}-tenants"
    ]
    text = secret_data(one(objects, "Secret", f"{FULLNAME}-tenants"))["tenants.toml"]
    tenants = tomllib.loads(text)["tenants"]
    assert tenants[0] == {
        "name": "acme",
        "token_sha256": "307c609f87da43c3d563428a4f7efdf9857f4871fd10465732c4ab11a985a08c",
        "weight": 2,
        "retention": "7d",
        "max_active_batches": 100,
        "max_stored_bytes": "10GiB",
    }
    assert tenants[1]["name"] == "globex"
    # Only the fields `tokenfab server --tenants-file` accepts (it refuses unknown ones).
    known = {"name", "token_sha256", "weight", "retention", "max_active_batches", "max_queued_requests",
             "max_stored_bytes", "output_tokens_per_hour"}
    assert all(set(t) <= known for t in tenants)


# ---------------------------------------------------------------------------------------
# Images


def test_default_images():
    objects = rendered("defaults")
    images = {c["image"] for _, s in pod_specs(objects) for c in containers(s)}
    assert images == {"ghcr.io/tokenfab/tokenfab:0.1.0", "docker.io/vllm/vllm-openai:v0.11.0"}


def test_air_gapped_registry_applies_to_every_container():
    objects = rendered("airgapped.yaml")
    check_registry(objects, "registry.airgap.internal:5000", "mirror-credentials")
    images = {c["image"] for _, s in pod_specs(objects) for c in containers(s)}
    assert images == {
        "registry.airgap.internal:5000/tokenfab/tokenfab@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "registry.airgap.internal:5000/vllm/vllm-openai:v0.11.0",
    }
    qwen = one(objects, "Deployment", f"{FULLNAME}-vllm-qwen3")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in qwen["volumes"]}["models"] == {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "model-weights"},
    }


# ---------------------------------------------------------------------------------------
# Monitoring


def test_monitoring_on_renders_service_monitors_and_the_one_rules_file():
    objects = rendered("monitoring-on.yaml")
    server_sm = one(objects, "ServiceMonitor", f"{FULLNAME}-server")
    assert server_sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (ep,) = server_sm["spec"]["endpoints"]
    assert ep["scheme"] == "https" and ep["interval"] == "15s"
    assert ep["tlsConfig"]["ca"] == {"secret": {"name": "tokenfab-tls", "key": "ca.crt"}}
    assert ep["authorization"]["credentials"] == {"name": f"{FULLNAME}-http-token", "key": "http-token"}
    one(objects, "ServiceMonitor", f"{FULLNAME}-agent")
    rule = one(objects, "PrometheusRule", FULLNAME)
    # One source: the chart's rules are the rules file Prometheus loads without Kubernetes.
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    job_names = {s["metadata"]["labels"]["tokenfab.io/job"] for s in by_kind(objects, "Service") if "tokenfab.io/job" in s["metadata"]["labels"]}
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            for job in re.findall(r'job="([^"]+)"', r["expr"]):
                assert job in job_names, f"rule {r.get('alert')} names job {job}, which no ServiceMonitor scrapes"


def test_monitoring_off_renders_no_prometheus_operator_object():
    for case in ("monitoring-off.yaml", "defaults"):
        assert [o for o in rendered(case) if o["apiVersion"].startswith("monitoring.coreos.com/")] == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_rules_file_passes_promtool(tmp_path):
    out = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------
# values.schema.json


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"controlPlane": {"replicas": "three"}}, "/controlPlane/replicas"),
        ({"controlPlane": {"replicas": 0}}, "/controlPlane/replicas"),
        ({"controlPlane": {"replicaCount": 1}}, "replicaCount"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
        ({"agent": {"devices": "cuda"}}, "/agent/devices"),
        ({"controlPlane": {"ports": {"grpc": 70000}}}, "/controlPlane/ports/grpc"),
        ({"controlPlane": {"retention": "a month"}}, "/controlPlane/retention"),
        ({"images": {"tokenfab": {"pullPolicy": "Sometimes"}}}, "/images/tokenfab/pullPolicy"),
        # A tenant's token in clear text has no place in values: digests only.
        ({"tenants": {"entries": [{"name": "acme", "token": "acme-secret"}]}}, "/tenants/entries/0"),
        ({"engines": {"vllm": [{"name": "Bad_Name", "model": "m", "hfModel": "x", "replicas": 1, "tensorParallelSize": 1}]}}, "/engines/vllm/0/name"),
        ({"engines": {"external": [{"name": "e", "url": "sglang:30000", "model": "m"}]}}, "/engines/external/0/url"),
        ({"engines": {"vllm": [{"name": "a", "model": "m", "hfModel": "x", "replicas": 1, "tensorParallelSize": 1, "accelerator": "H100 SXM"}]}}, "/engines/vllm/0/accelerator"),
        ({"operator": {"mode": "auto"}}, "/operator/mode"),
        ({"operator": {"maxStep": 0}}, "/operator/maxStep"),
        ({"operator": {"interval": "0s"}}, "/operator/interval"),
        ({"operator": {"scaleDownAfter": "ten minutes"}}, "/operator/scaleDownAfter"),
        ({"operator": {"slaName": "Inference_SLA"}}, "/operator/slaName"),
        ({"operator": {"followDrains": False}}, "followDrains"),
        ({"sweep": {"vary": [{"path": "pools[0].nodes", "values": ["1,2"]}]}}, "/sweep/vary/0/values/0"),
        ({"sweep": {"vary": [{"path": "pools[0]..nodes", "values": [1]}]}}, "/sweep/vary/0/path"),
        ({"sweep": {"vary": [{"path": "pools[0].nodes", "values": []}]}}, "/sweep/vary/0/values"),
        ({"sweep": {"vary": [{"path": "pools[0].nodes", "value": [1]}]}}, "/sweep/vary/0"),
        ({"sweep": {"files": {"../escape.toml": "x"}}}, "'../escape.toml' does not match pattern"),
        ({"sweep": {"seed": -1}}, "/sweep/seed"),
        ({"sweep": {"sla": 99.9}}, "/sweep/sla"),
        ({"sweep": {"gather": {"wait": "two hours"}}}, "/sweep/gather/wait"),
        ({"sweep": {"resultsClaim": "Sweep_Results"}}, "/sweep/resultsClaim"),
        ({"sweep": {"name": "H100-Sweep"}}, "/sweep/name"),
        ({"sweep": {"gatherWait": "2h"}}, "gatherWait"),
    ],
)
def test_schema_rejects_bad_values(values, complaint):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError) as caught:
            chart.validate_schema(values)
    assert complaint in str(caught.value)


@pytest.mark.parametrize("case", CASES)
def test_schema_accepts_the_values_files(case):
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(load_values(case))


# ---------------------------------------------------------------------------------------
# Flags the chart passes exist in the binary


def tokenfab_binary() -> pathlib.Path | None:
    found = [pathlib.Path(os.environ["TOKENFAB_BIN"])] if os.environ.get("TOKENFAB_BIN") else []
    found += [ROOT / "target" / d / "tokenfab" for d in ("debug", "release")]
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def subcommand_of(container: dict) -> tuple[str, list[str]]:
    """The subcommand of a `tokenfab` container (its leading words: "server", "sim sweep")
    and the arguments after it."""
    args = args_of(container)
    n = 0
    while n < len(args) and re.fullmatch(r"[a-z][a-z-]*", args[n]):
        n += 1
    return " ".join(args[:n]), args[n:]


def unknown_flags(binary: pathlib.Path, renders: list[list[dict]]) -> list[tuple[str, str, str]]:
    """(command, flag, value) of every flag, choice or --replica key in the chart's `tokenfab`
    containers (server, agent, sim sweep, sim gather) that the binary's --help does not name."""
    used: set[tuple[str, str, str]] = set()
    for objects in renders:
        for _, spec in pod_specs(objects):
            for c in spec["containers"]:
                if c.get("command") == ["tokenfab"]:
                    cmd, rest = subcommand_of(c)
                    used |= {(cmd, *a.partition("=")[::2]) for a in rest if a.startswith("-")}
    helps = {
        cmd: subprocess.run([str(binary), *cmd.split(), "--help"], capture_output=True, text=True, timeout=30).stdout
        for cmd in {u[0] for u in used}
    }
    missing = []
    for cmd, flag, value in sorted(used):
        if not re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", helps[cmd], re.M):
            missing.append((cmd, flag, ""))
        elif flag in ("--devices", "--tuner", "--tuner-objective", "--routing", "--placement"):
            if not re.search(rf"\b{re.escape(value)}\b", helps[cmd]):
                missing.append((cmd, flag, value))
        elif flag == "--replica":
            # Every key of a replica spec is one the agent's grammar names (url=URL,model=M,...).
            for key in (kv.split("=", 1)[0] for kv in value.split(",")):
                if not re.search(rf"(^|[\[,\s]){re.escape(key)}=", helps[cmd], re.M):
                    missing.append((cmd, "--replica", key + "="))
    return missing


needs_binary = pytest.mark.skipif(tokenfab_binary() is None, reason="no tokenfab binary built (target/debug or target/release)")


@needs_binary
def test_every_flag_the_chart_passes_exists_in_the_binary():
    binary = tokenfab_binary()
    renders = [rendered(case) for case in CASES]
    commands = {subcommand_of(c)[0] for objects in renders for _, s in pod_specs(objects) for c in s["containers"] if c.get("command") == ["tokenfab"]}
    assert commands == {"server", "agent", "sim sweep", "sim gather"}
    assert unknown_flags(binary, renders) == [], f"`tokenfab` ({binary}) does not know these"


@pytest.mark.skipif(operator_binary() is None, reason="no tokenfab-operator binary built (target/debug or target/release)")
def test_every_flag_the_chart_passes_exists_in_the_operator_binary():
    binary = operator_binary()
    help_text = subprocess.run([str(binary), "run", "--help"], capture_output=True, text=True, timeout=30).stdout
    renders = [rendered(case) for case in CASES] + [json.loads(_rendered_without_drain())]
    used = {
        a.partition("=")[::2]
        for objects in renders
        for _, spec in pod_specs(objects)
        if is_operator(spec)
        for c in spec["containers"]
        for a in args_of(c)[1:]
    }
    assert ("--no-drain", "") in used and ("--mode", "active") in used and ("--mode", "advisory") in used
    missing = []
    for flag, value in sorted(used):
        if not re.search(rf"^\s+(-\w, )?{re.escape(flag)}\b", help_text, re.M):
            missing.append(flag)
        elif flag == "--mode" and not re.search(rf"possible\s+values:[^\]]*\b{value}\b", help_text):
            missing.append(f"--mode={value}")
    assert missing == [], f"`tokenfab-operator run` ({binary}) does not know these"


# ---------------------------------------------------------------------------------------
# The simulator sweep (templates/sweep.yaml)

SWEEP_CASE = "sweep.yaml"


def sweep_jobs(objects: list[dict], run: str) -> tuple[dict, dict, dict, dict]:
    """The sweep's Indexed Job and gather Job, and the container of each."""
    sweep = one(objects, "Job", f"{run}-sweep")
    gather = one(objects, "Job", f"{run}-sweep-gather")
    (sweep_c,) = sweep["spec"]["template"]["spec"]["containers"]
    (gather_c,) = gather["spec"]["template"]["spec"]["containers"]
    return sweep, sweep_c, gather, gather_c


def vary_text(value) -> str:
    """A value of sweep.vary as the simulator should read it (YAML 1.2 plain scalar)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def check_sweep(objects: list[dict], sweep_values: dict, run: str) -> None:
    """The Indexed Job has one index per configuration: completions is the product of the
    number of values of every sweep.vary entry. Every index runs `sim sweep` on the mounted
    scenario with every --vary, its own index as --point, and the run's folder of the shared
    claim as --out; the gather Job gathers that same folder."""
    sweep, sweep_c, gather, gather_c = sweep_jobs(objects, run)
    counts = [len(v["values"]) for v in sweep_values["vary"]]
    configurations = 1
    for n in counts:
        configurations *= n
    spec = sweep["spec"]
    product = " x ".join(map(str, counts))
    assert spec["completions"] == configurations, f"{where(sweep)}: completions {spec['completions']}, but sweep.vary makes {product} = {configurations} configurations"
    assert spec["completionMode"] == "Indexed", where(sweep)
    assert spec["template"]["spec"]["restartPolicy"] == "Never", where(sweep)
    cmd, rest = subcommand_of(sweep_c)
    assert cmd == "sim sweep", where(sweep)
    want_vary = [f"--vary={v['path']}=" + ",".join(vary_text(x) for x in v["values"]) for v in sweep_values["vary"]]
    assert [a for a in rest if a.startswith("--vary=")] == want_vary, f"{where(sweep)}: the --vary arguments are not sweep.vary"
    assert flag_values(sweep_c, "--point") == ["$(JOB_COMPLETION_INDEX)"], where(sweep)
    out = f"/results/{run}"
    assert flag_values(sweep_c, "--out") == [out], where(sweep)
    assert args_of(gather_c)[:3] == ["sim", "gather", out], f"{where(gather)} gathers {args_of(gather_c)[2:3]}, not {out}"
    assert gather["spec"].get("completionMode", "NonIndexed") == "NonIndexed" and gather["spec"].get("completions", 1) == 1
    # The scenario argument is the ConfigMap's scenario, at its mounted path.
    (scenario,) = [a for a in rest if not a.startswith("-")]
    files = mounted_files(objects, sweep)
    assert scenario in files, f"{where(sweep)}: {scenario} is not a mounted file ({sorted(files)})"
    # Both Jobs write to the same claim, mounted where --out points.
    for job, c in ((sweep, sweep_c), (gather, gather_c)):
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if out.startswith(m["mountPath"].rstrip("/") + "/")]
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": sweep_values["resultsClaim"]}, where(job)
        assert not mount.get("readOnly"), f"{where(job)}: the results folder is read-only"
        # CPU only: a sweep takes no GPU from the engines.
        assert "nvidia.com/gpu" not in json.dumps(c["resources"]), where(job)


def mounted_files(objects: list[dict], job: dict) -> dict[str, str]:
    """Path in the container -> text, of every ConfigMap file a Job's container mounts."""
    spec = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    files = {}
    for mount in spec["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = data[item["key"]]
    return files


def run_sweep_index(binary: pathlib.Path, objects: list[dict], run: str, index: int, root: pathlib.Path) -> subprocess.CompletedProcess:
    """Index `index` of the sweep's Job, run here by the binary: the Job's own arguments, with
    $(JOB_COMPLETION_INDEX) expanded as the kubelet does, its mounted files and the results
    claim under `root`."""
    sweep, sweep_c, _, _ = sweep_jobs(objects, run)
    for path, text in mounted_files(objects, sweep).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    args = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in args_of(sweep_c)]
    args = [re.sub(r"(^|=)/", lambda m: m.group(1) + str(root) + "/", a) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, env=env)


def check_sweep_against_binary(binary: pathlib.Path, objects: list[dict], run: str, root: pathlib.Path) -> None:
    """The simulator agrees with the Job's arithmetic: it refuses --point completions (and
    says it has exactly `completions` configurations) and runs the last index, whose part
    the gather step counts against the same number."""
    sweep, sweep_c, _, gather_c = sweep_jobs(objects, run)
    completions = sweep["spec"]["completions"]
    beyond = run_sweep_index(binary, objects, run, completions, root)
    assert beyond.returncode != 0, f"the simulator accepted --point {completions}, so the sweep has more than the Job's {completions} configurations"
    said = re.search(r"this sweep has (\d+) configurations", beyond.stderr)
    assert said, beyond.stderr
    assert int(said.group(1)) == completions, f"the simulator says {said.group(0)}; the Job has completions {completions}"
    last = run_sweep_index(binary, objects, run, completions - 1, root)
    assert last.returncode == 0, last.stderr
    out = root / flag_values(sweep_c, "--out")[0].lstrip("/")
    part = json.loads((out / f"point-{completions - 1:05d}.json").read_text())
    assert {k: part["point"][k] for k in ("index", "of")} == {"index": completions - 1, "of": completions}
    # The last index is the last value of every --vary: the simulator read them as the chart wrote them.
    varies = [a.removeprefix("--vary=").partition("=") for a in args_of(sweep_c) if a.startswith("--vary=")]
    assert part["rows"][0]["params"] == [[path, values.split(",")[-1]] for path, _, values in varies]
    # The gather step (its own arguments, without the wait) counts the parts against the same number.
    gather_args = [re.sub(r"^/", str(root) + "/", a) for a in args_of(gather_c) if not a.startswith("--wait")]
    gathered = subprocess.run([str(binary), *gather_args], capture_output=True, text=True, timeout=60)
    assert gathered.returncode != 0
    missing = ", ".join(str(i) for i in range(completions - 1))
    assert f"{completions - 1} of {completions} configurations have no result yet (indexes {missing})" in gathered.stderr, gathered.stderr


def test_the_sweep_runs_one_configuration_per_index():
    values = load_values(SWEEP_CASE)["sweep"]
    objects = rendered(SWEEP_CASE)
    check_sweep(objects, values, "h100-pool-size")
    sweep, sweep_c, gather, gather_c = sweep_jobs(objects, "h100-pool-size")
    assert sweep["spec"]["completions"] == 6
    assert sweep["spec"]["parallelism"] == 3
    assert sweep["spec"]["backoffLimitPerIndex"] == 2
    assert sweep["spec"]["podReplacementPolicy"] == "Failed", "never two pods writing one index's part"
    assert args_of(sweep_c) == [
        "sim", "sweep", "/scenario/scenario.yaml",
        "--vary=pools[0].nodes=1,2,3",
        "--vary=deployments[0].window=64,128",
        "--sla=0.99",
        "--seed=7",
        "--point=$(JOB_COMPLETION_INDEX)",
        "--out=/results/h100-pool-size",
    ]
    assert args_of(gather_c) == ["sim", "gather", "/results/h100-pool-size", "--wait=30m"]
    # The deadline ends the wait; retries cover the time before the results folder exists.
    assert gather["spec"]["activeDeadlineSeconds"] == 30 * 60
    assert gather["spec"]["backoffLimit"] == 30
    for job in (sweep, gather):
        assert job["spec"]["ttlSecondsAfterFinished"] == 86400
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["nodeSelector"] == {"node-role.example.com/batch-cpu": "true"}
        assert pod["tolerations"] == [{"key": "batch-only", "operator": "Exists", "effect": "NoSchedule"}]
        assert "runtimeClassName" not in pod
        assert pod["securityContext"] == control_plane(objects)[0]["spec"]["template"]["spec"]["securityContext"]
        # A Job's pod template cannot change: no label that a chart upgrade changes.
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, where(job)
    # The same image as the control plane, from the mirror.
    assert sweep_c["image"] == gather_c["image"] == control_plane(objects)[1]["image"] == "mirror.example.internal/tokenfab/tokenfab:0.1.0"
    check_registry(objects, "mirror.example.internal", "mirror-credentials")
    # The scenario, and the file beside it at its relative path.
    files = mounted_files(objects, sweep)
    assert files == {
        "/scenario/scenario.yaml": values["scenario"],
        "/scenario/profiles/notes.txt": values["files"]["profiles/notes.txt"],
    }
    notes = notes_of(SWEEP_CASE)
    assert f"kubectl -n {NAMESPACE} logs -f job/h100-pool-size-sweep-gather" in notes
    assert f"kubectl -n {NAMESPACE} get job h100-pool-size-sweep" in notes
    assert "6 configurations, 3 at once" in notes


def test_the_sweep_is_off_by_default_and_named_like_the_release():
    assert [where(o) for o in rendered("defaults") if o["kind"] == "Job" or o["metadata"]["name"].endswith("-sweep")] == []
    assert "sweep" not in notes_of("defaults").lower()
    values = load_values(SWEEP_CASE)
    del values["sweep"]["name"], values["sweep"]["seed"], values["sweep"]["ttlSecondsAfterFinished"]
    objects, notes = render_chart(CHART, values)
    check_sweep(objects, values["sweep"], FULLNAME)
    sweep, sweep_c, gather, _ = sweep_jobs(objects, FULLNAME)
    assert flag_values(sweep_c, "--seed") == [], "no --seed: the scenario's own"
    assert "ttlSecondsAfterFinished" not in sweep["spec"] and "ttlSecondsAfterFinished" not in gather["spec"]
    assert f"job/{FULLNAME}-sweep-gather" in notes


def test_sweep_values_reach_the_simulator_as_written():
    """Helm reads every number of a values file as a float: whole numbers must still reach
    the simulator as integers (1000000, not 1e+06), and each changed scenario changes the
    pods' checksum, so a changed sweep under the same name cannot half-run."""
    values = load_values(SWEEP_CASE)
    values["sweep"]["vary"] = [
        {"path": "workload.tenants[0].batch_size.max", "values": [1000000, 6000]},
        {"path": "site.pue", "values": [1.0, 1.25]},
        {"path": "policies.admission", "values": [True, False]},
        {"path": "workload.tenants[0].completion_window", "values": ["30m", "1h"]},
    ]
    objects, _ = render_chart(CHART, values)
    check_sweep(objects, values["sweep"], "h100-pool-size")
    sweep, sweep_c, _, _ = sweep_jobs(objects, "h100-pool-size")
    assert sweep["spec"]["completions"] == 16
    assert [a for a in args_of(sweep_c) if a.startswith("--vary")] == [
        "--vary=workload.tenants[0].batch_size.max=1000000,6000",
        "--vary=site.pue=1,1.25",
        "--vary=policies.admission=true,false",
        "--vary=workload.tenants[0].completion_window=30m,1h",
    ]
    checksum = sweep["spec"]["template"]["metadata"]["annotations"]["checksum/scenario"]
    values["sweep"]["scenario"] = values["sweep"]["scenario"].replace("duration: 10m", "duration: 20m")
    changed, _ = render_chart(CHART, values)
    assert sweep_jobs(changed, "h100-pool-size")[0]["spec"]["template"]["metadata"]["annotations"]["checksum/scenario"] != checksum


@pytest.mark.parametrize("wait, seconds", [("2h", 7200), ("1h30m", 5400), ("90s", 90), ("1d", 86400), ("1w", 604800), ("1500ms", 2)])
def test_the_gather_deadline_is_its_wait(wait, seconds):
    values = load_values(SWEEP_CASE)
    values["sweep"]["gather"]["wait"] = wait
    objects, _ = render_chart(CHART, values)
    _, _, gather, gather_c = sweep_jobs(objects, "h100-pool-size")
    assert flag_values(gather_c, "--wait") == [wait]
    assert gather["spec"]["activeDeadlineSeconds"] == seconds


@needs_binary
def test_the_sweep_job_agrees_with_the_simulator(tmp_path):
    check_sweep_against_binary(tokenfab_binary(), rendered(SWEEP_CASE), "h100-pool-size", tmp_path)


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"resultsClaim": ""}, r"sweep.resultsClaim: an existing PersistentVolumeClaim .* ReadWriteMany"),
        ({"scenario": ""}, r"sweep.enabled needs sweep.scenario"),
        ({"vary": []}, r"at least one sweep.vary entry"),
        ({"vary": [{"path": "pools[0].nodes", "values": [1, 2]}, {"path": "pools[0].nodes", "values": [4]}]}, r"names pools\[0\].nodes twice"),
        ({"vary": [{"path": f"pools[{i}].nodes", "values": list(range(1, 11))} for i in range(6)]}, r"1000000 configurations; .* at most 100000"),
        ({"files": {"scenario.yaml": "x"}}, r'"scenario.yaml" collides with the scenario'),
        ({"files": {"a/b.toml": "x", "a_b.toml": "y"}}, r'"a_b.toml" collides with "a/b.toml"'),
    ],
)
def test_a_sweep_that_could_not_run_is_refused(change, complaint):
    values = load_values(SWEEP_CASE)
    values["sweep"].update(change)
    with pytest.raises(helm.HelmRenderError, match=complaint):
        render_chart(CHART, values)


def test_a_sweep_name_too_long_for_its_jobs_is_refused():
    values = load_values(SWEEP_CASE)
    del values["sweep"]["name"]
    release = "capacity-planning-for-the-h100-pools-in-2027"  # its base name: + "-tokenfab"
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmRenderError, match=r"longer than 50 characters.*set sweep.name"):
            chart.render(values, name=release, namespace=NAMESPACE, is_install=True)


# ---------------------------------------------------------------------------------------
# Planted mistakes: a broken copy of the chart must fail the checks above.


def planted(tmp_path: pathlib.Path, file: str, old: str, new: str) -> pathlib.Path:
    copy = tmp_path / "tokenfab"
    shutil.copytree(CHART, copy, symlinks=False)
    target = copy / file
    text = target.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {file}: the planted mistake needs updating"
    target.write_text(text.replace(old, new, 1))
    return copy


def test_planted_misspelled_field_fails_strict_validation(tmp_path):
    chart = planted(tmp_path, "templates/control-plane-statefulset.yaml", "imagePullPolicy:", "imagePulPolicy:")
    objects, _ = render_chart(chart, {})
    with pytest.raises(AssertionError, match=r"Additional properties are not allowed \('imagePulPolicy' was unexpected\)"):
        check_strict(objects)


def test_planted_port_as_a_string_fails_strict_validation(tmp_path):
    chart = planted(
        tmp_path,
        "templates/control-plane-statefulset.yaml",
        "containerPort: {{ $cp.ports.grpc }}",
        "containerPort: {{ $cp.ports.grpc | quote }}",
    )
    objects, _ = render_chart(chart, {})
    with pytest.raises(AssertionError, match=r"containerPort: '7443' is not of type 'integer'"):
        check_strict(objects)


def test_planted_wildcard_verb_fails_the_rbac_check(tmp_path):
    chart = planted(tmp_path, "templates/rbac.yaml", 'verbs: ["list", "watch"]', 'verbs: ["*"]')
    objects, _ = render_chart(chart, load_values("operator-on.yaml"))
    check_strict(objects)  # valid Kubernetes, so only the RBAC check can catch it
    with pytest.raises(AssertionError, match=r"wildcard in verbs"):
        check_rbac(objects, node_patch=True)


def test_planted_cluster_wide_write_fails_the_rbac_check(tmp_path):
    chart = planted(tmp_path, "templates/rbac.yaml", 'verbs: ["list", "watch"]', 'verbs: ["list", "watch", "delete"]')
    objects, _ = render_chart(chart, load_values("operator-on.yaml"))
    with pytest.raises(AssertionError, match=r"cluster-wide verbs .*delete.* are not read-only"):
        check_rbac(objects, node_patch=True)


def test_planted_node_patch_without_follow_drain_fails_the_rbac_check(tmp_path):
    """Patching nodes is allowed only for the drain marks: not with followDrain=false."""
    chart = planted(tmp_path, "templates/rbac.yaml", "{{- if .Values.operator.followDrain }}", "{{- if true }}")
    objects, _ = render_chart(chart, operator_without_drain())
    with pytest.raises(AssertionError, match=r"cluster-wide verbs \['patch'\] are not read-only"):
        check_rbac(objects, node_patch=False)


def test_planted_agent_selector_that_misses_the_daemon_set_fails_the_operator_check(tmp_path):
    """An --agent-selector that does not match the agent pods would make the operator see no
    agent anywhere, and mark every cordoned node drained at once, while its agent still runs."""
    chart = planted(
        tmp_path,
        "templates/operator.yaml",
        '(dict "root" $ "component" "agent")',
        '(dict "root" $ "component" "node-agent")',
    )
    objects, _ = render_chart(chart, load_values("operator-on.yaml"))
    check_strict([one(objects, "Deployment", f"{FULLNAME}-operator")])  # any string is a valid argument
    with pytest.raises(AssertionError, match=r"--agent-selector .*component=node-agent.* does not select the agent DaemonSet's pods"):
        check_operator(objects)


def test_planted_probe_on_a_missing_port_fails_the_probe_check(tmp_path):
    chart = planted(tmp_path, "templates/control-plane-statefulset.yaml", '(dict "path" "/healthz" "port" "http"', '(dict "path" "/healthz" "port" "htp"')
    objects, _ = render_chart(chart, {})
    check_strict(objects)  # a port name is a valid string: strict validation cannot see it
    with pytest.raises(AssertionError, match=r"startupProbe port 'htp' is not a container port"):
        check_probes(objects)


def test_planted_writable_root_filesystem_fails_the_security_check(tmp_path):
    chart = planted(tmp_path, "values.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    objects, _ = render_chart(chart, {})
    with pytest.raises(AssertionError, match=r"root filesystem is writable"):
        check_security(objects)


def test_planted_hard_coded_image_fails_the_registry_check(tmp_path):
    chart = planted(
        tmp_path,
        "templates/engines-vllm.yaml",
        '{{ include "tokenfab.image" (dict "root" $ "image" $.Values.images.vllm "defaultTag" "latest") | quote }}',
        '"docker.io/vllm/vllm-openai:v0.11.0"',
    )
    objects, _ = render_chart(chart, load_values("airgapped.yaml"))
    with pytest.raises(AssertionError, match=r"container vllm pulls docker.io/vllm/vllm-openai:v0.11.0"):
        check_registry(objects, "registry.airgap.internal:5000", "mirror-credentials")


def test_planted_loose_schema_lets_a_typo_through(tmp_path):
    """The schema's strictness is what refuses a typo'd key: without it, it would pass."""
    chart = tmp_path / "tokenfab"
    shutil.copytree(CHART, chart)
    schema = json.loads((chart / "values.schema.json").read_text())
    schema["additionalProperties"] = True
    schema["properties"]["controlPlane"]["additionalProperties"] = True
    (chart / "values.schema.json").write_text(json.dumps(schema))
    with helm.Chart.load(str(chart)) as loose:
        loose.validate_schema({"controlPlane": {"replicaCount": 3}})  # passes: nothing catches it
    with helm.Chart.load(str(CHART)) as strict:
        with pytest.raises(helm.HelmValuesError, match="replicaCount"):
            strict.validate_schema({"controlPlane": {"replicaCount": 3}})


@needs_binary
def test_planted_misspelled_flag_fails_the_flag_check(tmp_path):
    chart = planted(tmp_path, "templates/control-plane-statefulset.yaml", "- --placement=", "- --placment=")
    objects, _ = render_chart(chart, {})
    check_strict(objects)  # any string is a valid argument
    assert unknown_flags(tokenfab_binary(), [objects]) == [("server", "--placment", "")]


def test_planted_product_that_forgets_a_vary_fails_the_sweep_checks(tmp_path):
    """A template that takes the largest value count instead of multiplying (3, not 3 x 2)
    renders a valid Job that silently never runs half of the sweep."""
    chart = planted(tmp_path, "templates/_helpers.tpl", "mul $count (len .values)", "max $count (len .values)")
    objects, _ = render_chart(chart, load_values(SWEEP_CASE))
    check_strict(objects)  # a valid Job: only the arithmetic can catch it
    with pytest.raises(AssertionError, match=r"completions 3, but sweep.vary makes 3 x 2 = 6 configurations"):
        check_sweep(objects, load_values(SWEEP_CASE)["sweep"], "h100-pool-size")
    if tokenfab_binary() is not None:
        with pytest.raises(AssertionError, match=r"the simulator accepted --point 3, so the sweep has more than the Job's 3 configurations"):
            check_sweep_against_binary(tokenfab_binary(), objects, "h100-pool-size", tmp_path / "run")


def test_planted_whole_number_as_a_float_fails_the_sweep_check(tmp_path):
    """Without the integer formatting, Helm's float 1000000 reaches the simulator as 1e+06."""
    chart = planted(tmp_path, "templates/_helpers.tpl", '{{- if and (kindIs "float64" .) (eq . (floor .)) -}}', "{{- if false -}}")
    values = load_values(SWEEP_CASE)
    values["sweep"]["vary"][0] = {"path": "workload.tenants[0].batch_size.max", "values": [1000000, 6000]}
    objects, _ = render_chart(chart, values)
    with pytest.raises(AssertionError, match=r"the --vary arguments are not sweep.vary"):
        check_sweep(objects, values["sweep"], "h100-pool-size")

