"""deploy/kubernetes/: every manifest validates against the Kubernetes schemas (kubernetes-validate,
offline, strict: unknown fields are errors), the pieces refer to each other correctly, the embedded
config validates with `portcullis validate`, and `podman kube play` runs the Deployment: both
replicas, the CA from the Secret, the token from the Secret, the rules from the ConfigMap, and
approvals shared through Valkey.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.deploy import podman_support as ps
from tests.harness import REPO

K8S = REPO / "deploy" / "kubernetes"
VERSIONS = ["1.30.0", "1.37.0"]  # the oldest release still common in managed clusters, the newest shipped


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in YAML(typ="safe").load_all((K8S / name).read_text()) if d]


def all_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            out += [(f.name, d) for d in docs(f.name)]
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    for _, d in all_docs():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name} in deploy/kubernetes/")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    import kubernetes_validate

    found = all_docs()
    kinds = {d["kind"] for _, d in found}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "StatefulSet",
        "Pod",
    } <= kinds
    for fname, d in found:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{fname}: {d['kind']}/{d['metadata']['name']}: {e.message}") from e


def test_kustomization_lists_every_resource_file() -> None:
    k = docs("kustomization.yaml")[0]
    listed = set(k["resources"])
    on_disk = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml", "agent-example.yaml"}
    assert listed == on_disk
    assert k["images"][0]["name"] == "portcullis"


def test_the_pieces_fit_together() -> None:
    dep = find("Deployment", "portcullis")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["replicas"] >= 2
    # Services and the PDB select the proxy pods.
    for svc in ("portcullis", "portcullis-admin"):
        assert find("Service", svc)["spec"]["selector"].items() <= labels.items()
    pdb = find("PodDisruptionBudget", "portcullis")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["minAvailable"] < spec["replicas"]
    # Probes on the admin port: liveness /healthz, readiness /readyz.
    (main,) = [c for c in pod["containers"] if c["name"] == "portcullis"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"proxy": 8080, "admin": 9090}
    assert (main["livenessProbe"]["httpGet"]["path"], main["livenessProbe"]["httpGet"]["port"]) == (
        "/healthz",
        "admin",
    )
    assert (main["readinessProbe"]["httpGet"]["path"], main["readinessProbe"]["httpGet"]["port"]) == (
        "/readyz",
        "admin",
    )
    # Tokens come from Secrets, never from the manifest.
    env = {e["name"]: e for e in main["env"]}
    assert env["PORTCULLIS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "portcullis-secrets",
        "key": "admin-token",
    }
    assert env["PORTCULLIS_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all("value" not in e for e in main["env"])
    # Every volume a container mounts exists; ConfigMaps it names are defined here.
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
    for v in volumes.values():
        if "configMap" in v:
            find("ConfigMap", v["configMap"]["name"])
    # Non-root as the image's numeric user (Containerfile: USER 10001:10001).
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (REPO / "Containerfile").read_text()
    # The store every replica shares is the Valkey Service.
    config = YAML(typ="safe").load(find("ConfigMap", "portcullis-config")["data"]["portcullis.yaml"])
    valkey = find("Service", "valkey")
    assert (
        config["approvals"]["store"]
        == f"redis://{valkey['metadata']['name']}:{valkey['spec']['ports'][0]['port']}/0"
    )


def test_network_policies_confine_agents_to_the_proxy() -> None:
    agents = find("NetworkPolicy", "agents-egress")
    assert agents["metadata"]["namespace"] == "agents" and agents["spec"]["podSelector"] == {}
    assert set(agents["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    rules = agents["spec"]["egress"]
    proxy_rule, dns_rule = rules
    assert proxy_rule["to"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "portcullis"}
    assert proxy_rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert all("ipBlock" not in peer for r in rules for peer in r["to"])  # no way around the proxy
    assert {p["port"] for p in dns_rule["ports"]} == {53}
    proxy = find("NetworkPolicy", "portcullis")
    internet = [peer["ipBlock"] for r in proxy["spec"]["egress"] for peer in r["to"] if "ipBlock" in peer]
    v4 = next(b for b in internet if b["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"} <= set(
        v4["except"]
    )
    v6 = next(b for b in internet if b["cidr"] == "::/0")
    assert {"fc00::/7", "fe80::/10"} <= set(v6["except"])
    ingress_ports = {p["port"] for r in proxy["spec"]["ingress"] for p in r["ports"]}
    assert ingress_ports == {8080, 9090}
    valkey = find("NetworkPolicy", "valkey")
    assert valkey["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "portcullis"}}}
    ]


def test_the_configmap_config_and_rules_validate(tmp_path: Path) -> None:
    """The ConfigMaps laid out as the Deployment mounts them pass `portcullis validate`."""
    (tmp_path / "config").mkdir()
    (tmp_path / "rules").mkdir()
    (tmp_path / "config" / "portcullis.yaml").write_text(
        find("ConfigMap", "portcullis-config")["data"]["portcullis.yaml"]
    )
    for name, text in find("ConfigMap", "portcullis-rules")["data"].items():
        (tmp_path / "rules" / name).write_text(text)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "addons.cli",
            "validate",
            "--config",
            str(tmp_path / "config" / "portcullis.yaml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_agent_example_matches_portcullis_env_k8s() -> None:
    pod = find("Pod", "agent-example")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    p = subprocess.run(
        [sys.executable, "-m", "addons.cli", "env", "--k8s"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    printed = {e["name"]: e["value"] for e in YAML(typ="safe").load(p.stdout)["env"]}
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "NODE_USE_ENV_PROXY",
    ):
        assert env[name] == printed[name], name


# ------------------------------------------------------------------------------ podman kube play


TOKEN = "kube-play-admin-token-0123456789"
HELD_IP = "1.1.1.1"  # public, so the default action (approval) applies; never connected to


def _transform(suffix: str, image: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Deployment and its ConfigMaps with every name suffixed (podman's secrets, volumes and
    pods are global on the machine) and the image set, as kustomize's nameSuffix and images do."""
    dep = copy.deepcopy(find("Deployment", "portcullis"))
    dep["metadata"]["name"] += suffix
    pod = dep["spec"]["template"]["spec"]
    for c in [*pod["initContainers"], *pod["containers"]]:
        c["image"] = image
        for e in c.get("env", []):
            if "valueFrom" in e:
                e["valueFrom"]["secretKeyRef"]["name"] += suffix
    # podman 4.3 applies the pod's restart policy (Always, as Deployments must have) to init
    # containers too: it restarts the finished one, then fails to remove it while it runs again.
    pod["restartPolicy"] = "OnFailure"
    # podman 4.3 also publishes every containerPort on the host, where two replicas collide (and
    # a test must not bind host ports it did not choose): the pods keep their own addresses only.
    for c in pod["containers"]:
        named = {p["name"]: p["containerPort"] for p in c.pop("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in c and "httpGet" in c[probe]:
                c[probe]["httpGet"]["port"] = named.get(
                    c[probe]["httpGet"]["port"], c[probe]["httpGet"]["port"]
                )
    maps = []
    for v in pod["volumes"]:
        if "configMap" in v:
            cm = copy.deepcopy(find("ConfigMap", v["configMap"]["name"]))
            v["configMap"]["name"] = cm["metadata"]["name"] = cm["metadata"]["name"] + suffix
            maps.append(cm)
        if "secret" in v:
            v["secret"]["secretName"] += suffix
    return dep, maps


@pytest.fixture
def kube_play(portcullis_image: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    suffix = f"-pct{uuid.uuid4().hex[:6]}"
    net = f"pct-kube{suffix}"
    dep, maps = _transform(suffix, portcullis_image)
    (tmp_path / "deployment.json").write_text(json.dumps(dep))
    cm_args = []
    for cm in maps:
        path = tmp_path / f"{cm['metadata']['name']}.json"
        path.write_text(json.dumps(cm))
        cm_args += ["--configmap", str(path)]
    # The CA, made as README says (`portcullis ca`), as the Secret portcullis-ca.
    ca = tmp_path / "ca"
    subprocess.run(
        [sys.executable, "-m", "addons.cli", "ca", "--dir", str(ca)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    # podman 4.3 reads Secrets from its own store: an env secret as a flat JSON map of base64 values,
    # a volume secret as a Secret document whose `data` values it writes out as they are.
    secrets = {
        f"portcullis-secrets{suffix}": {"admin-token": base64.b64encode(TOKEN.encode()).decode()},
        f"portcullis-ca{suffix}": {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "ca"},
            "data": {n: (ca / n).read_text() for n in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem")},
        },
    }
    valkey = f"pct-valkey{suffix}"
    pods = [f"{dep['metadata']['name']}-pod-{i}" for i in range(dep["spec"]["replicas"])]
    volumes_before = set(ps.podman("volume", "ls", "-q").stdout.split())
    try:
        # An internal network: the pods reach Valkey and each other, nothing beyond the machine.
        ps.podman("network", "create", "--internal", net)
        valkey_image = ps.build_image(
            "portcullis-test-valkey",
            Path(__file__).parent / "valkey.Containerfile",
            Path(__file__).parent,
            [],
            host_ca=False,
        )
        ps.podman(
            "run",
            "-d",
            "--name",
            valkey,
            "--network",
            net,
            "--network-alias",
            "valkey",
            valkey_image,
            "valkey-server",
            "--protected-mode",
            "no",
        )
        for name, doc in secrets.items():
            ps.podman("secret", "create", name, "-", input=json.dumps(doc).encode())
        play = ps.podman(
            "kube",
            "play",
            "--network",
            net,
            *cm_args,
            str(tmp_path / "deployment.json"),
            check=False,
            timeout=300,
        )
        assert play.returncode == 0, play.stderr[-3000:]
        yield {"pods": pods, "net": net, "ca": ca, "play": play, "dep": dep}
    finally:
        for pod_name in pods:
            ps.podman("pod", "rm", "-f", pod_name, check=False)
        # The image's VOLUMEs that the pod spec leaves unmounted become anonymous volumes, which
        # podman keeps when it removes a finished init container: remove the ones this test made.
        after = ps.podman("volume", "ls", "-q", "--filter", "dangling=true", check=False).stdout.split()
        for vol in set(after) - volumes_before:
            if len(vol) == 64:
                ps.podman("volume", "rm", vol, check=False)
        for cm in maps:
            ps.podman("volume", "rm", "-f", cm["metadata"]["name"], check=False)
        for name in secrets:
            ps.podman("volume", "rm", "-f", name, check=False)
            ps.podman("secret", "rm", name, check=False)
        ps.podman("rm", "-f", "-v", "-t", "0", valkey, check=False)
        ps.podman("network", "rm", "-f", net, check=False)


def _exec(container: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return ps.podman("exec", container, *cmd, check=False, timeout=60)


def _admin(
    container: str, path: str, method: str = "GET", body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """A call to a replica's admin API from inside it (the image has Python, not curl)."""
    code = (
        "import json, sys, urllib.request, urllib.error\n"
        "req = urllib.request.Request('http://127.0.0.1:9090' + sys.argv[1], method=sys.argv[2],\n"
        "    data=sys.argv[3].encode() or None, headers={'Authorization': 'Bearer ' + sys.argv[4],\n"
        "    'Content-Type': 'application/json'})\n"
        "try:\n    r = urllib.request.urlopen(req, timeout=10); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
    )
    p = _exec(container, "python", "-c", code, path, method, json.dumps(body) if body else "", TOKEN)
    status, _, text = p.stdout.partition("\n")
    assert status.strip().isdigit(), p.stderr
    return int(status), json.loads(text) if text.strip() else None


def _wait_ready(container: str) -> None:
    deadline = time.monotonic() + 60
    while (
        _exec(container, "portcullis", "healthcheck", "--url", "http://127.0.0.1:9090", "--ready").returncode
        != 0
    ):
        if time.monotonic() > deadline:
            logs = ps.podman("logs", container, check=False)
            listing = ps.podman("ps", "-a", "--format", "{{.Names}} {{.Status}}", check=False).stdout
            raise AssertionError(
                f"{container} not ready:\n{listing}\n{logs.stdout[-1500:]}\n{logs.stderr[-1500:]}"
            )
        time.sleep(0.5)


@pytest.mark.container
@pytest.mark.e2e
def test_podman_kube_play_runs_the_deployment(kube_play: dict[str, Any]) -> None:
    pods = kube_play["pods"]
    assert len(pods) == 2  # podman plays every replica as its own pod
    containers = [f"{p}-portcullis" for p in pods]
    for c in containers:
        _wait_ready(c)
        # The pod's security context: the image's non-root user, a read-only root filesystem.
        assert _exec(c, "id", "-u").stdout.strip() == "10001"
        assert _exec(c, "touch", "/app/written").returncode != 0
        # The init container copied the CA from the Secret: the same certificate on every replica, key 600.
        cert = _exec(c, "cat", "/app/certs/mitmproxy-ca-cert.pem").stdout
        assert cert == (kube_play["ca"] / "mitmproxy-ca-cert.pem").read_text()
        assert _exec(c, "stat", "-c", "%a", "/app/certs/mitmproxy-ca.pem").stdout.strip() == "600"
        # The admin token came from the Secret (a wrong one is refused).
        assert _admin(c, "/approvals")[0] == 200
    # The rules came from the ConfigMap: a deny rule answers for a name it never resolves.
    client = (
        "import sys, urllib.request, urllib.error\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({'http': sys.argv[1]}))\n"
        "try:\n    opener.open(sys.argv[2], timeout=float(sys.argv[3]))\n    print(200)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code, e.headers.get('X-Portcullis-Reason'))\n"
        "except OSError as e:\n    print('error', e)\n"
    )
    first, second = containers
    denied = _exec(first, "python", "-c", client, "http://127.0.0.1:8080", "http://pastebin.com/x", "10")
    assert denied.stdout.split() == ["403", "rule"], denied.stdout + denied.stderr
    # Shared state: a request held on one replica (a public IP literal, so nothing is resolved; the
    # network is internal, so nothing could leave) is a pending approval that the other replica
    # lists and decides.
    held = _exec(first, "python", "-c", client, "http://127.0.0.1:8080", f"http://{HELD_IP}/held", "3")
    assert held.stdout.startswith("error"), held.stdout  # the client gave up while it was held
    deadline = time.monotonic() + 20
    while True:
        status, listing = _admin(second, "/approvals")
        pending = [a for a in listing["approvals"] if a["host"] == HELD_IP] if status == 200 else []
        if pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pending, listing
    status, decided = _admin(
        second, f"/approvals/{pending[0]['id']}", "POST", {"decision": "deny", "by": "test"}
    )
    assert status == 200, decided
    assert _admin(first, f"/approvals/{pending[0]['id']}")[1]["state"] == "denied"
