"""`portcullis env`: every line it prints for curl, Python (requests, httpx), pip, git and npm is
proved by running that tool with nothing but those lines, through a real proxy, against an inspected
host (rules with methods: the proxy decrypts it with its CA) and a passthrough host (a plain allow
rule: the tunnel carries the server's own TLS).

The agent's "system store" is a bundle of the tool servers' CA (standing for the public roots) and
the proxy's CA, which is what `update-ca-certificates` makes of the printed system-store line.
The test names (public.test, other.test) resolve nowhere but in the proxy's `network.resolve`, so
a tool that skipped the proxy could not reach them at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.deploy import toolserver
from tests.deploy.toolserver import ToolServer
from tests.harness import REPO, PortcullisProc, Upstreams, base_config

pytestmark = pytest.mark.e2e

PUBLIC, OTHER = "public.test", "other.test"  # inspected, passthrough
RULES = [
    {"name": "tools-inspected", "action": "allow", "hosts": [PUBLIC], "methods": ["GET", "HEAD", "POST"]},
    {"name": "tools-passthrough", "action": "allow", "hosts": [OTHER]},
]


def env_text(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "addons.cli", "env", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def shell_sections(text: str) -> dict[str, list[str]]:
    """The --shell output split at its `# --- Title` headers: first word of the title -> lines."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# --- "):
            word = re.match(r"[A-Za-z]+", line[6:])
            assert word is not None, line
            current = out.setdefault(word.group().lower(), [])
        elif current is not None and line.strip():
            current.append(line)
    return out


@dataclass
class Rig:
    proxy: PortcullisProc
    tools: ToolServer
    sections: dict[str, list[str]]
    folder: Path

    def run(
        self, sections: list[str], cmd: list[str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`cmd` in a clean environment holding only PATH, HOME and the printed lines of `sections`
        (run by bash exactly as printed)."""
        lines = [line for s in ["proxy", *sections] for line in self.sections[s]]
        home = (cwd or self.folder) / "home"  # per test: no tool cache carries over (npm falls back on it)
        home.mkdir(exist_ok=True)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            # isolation from this machine's own configuration files, not settings for the tools:
            "PIP_CONFIG_FILE": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
        }
        script = "\n".join([*lines, 'exec "$@"'])
        return subprocess.run(
            ["bash", "-c", script, "bash", *cmd],
            env=env,
            cwd=cwd or self.folder,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def rig(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    folder = tmp_path_factory.mktemp("env")
    tools = toolserver.start(folder / "tools")
    cfg = base_config(
        upstreams,
        folder / "proxy",
        tls={"inspect": "auto", "ca_dir": "certs/", "upstream_ca": str(tools.ca_pem)},
    )
    proxy = PortcullisProc(folder / "proxy", upstreams, rules=RULES, config=cfg).start()
    try:
        bundle = folder / "system-bundle.pem"
        proxy_ca = folder / "proxy" / "certs" / "mitmproxy-ca-cert.pem"
        bundle.write_text(tools.ca_pem.read_text() + proxy_ca.read_text())
        text = env_text(
            "--shell", "--proxy-url", proxy.proxy_url, "--ca", str(proxy_ca), "--ca-bundle", str(bundle)
        )
        yield Rig(proxy, tools, shell_sections(text), folder)
    finally:
        proxy.stop()
        tools.stop()


def _site_url(rig: Rig, site: str, path: str) -> str:
    return rig.tools.base(site) + path


# Each tool: the sections whose lines it needs (besides the proxy), a command, and how to tell success.
PY = sys.executable
TOOLS = {
    "curl": (["curl"], lambda r, url, d: ["curl", "-sS", "-f", "--max-time", "20", url + "/curl/hello"]),
    "requests": (
        ["python"],
        lambda r, url, d: [
            PY,
            "-c",
            "import requests, sys; r = requests.get(sys.argv[1], timeout=20); r.raise_for_status()",
            url + "/requests/hello",
        ],
    ),
    "httpx": (
        ["curl"],
        lambda r, url, d: [
            PY,
            "-c",
            "import httpx, sys; httpx.get(sys.argv[1], timeout=20).raise_for_status()",
            url + "/httpx/hello",
        ],
    ),
    "pip": (
        ["pip"],
        lambda r, url, d: [
            PY,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--retries",
            "0",
            "--no-deps",
            "--target",
            str(d / "site"),
            "--index-url",
            url + "/simple/",
            "tinypkg",
        ],
    ),
    "git": (["git"], lambda r, url, d: ["git", "clone", "-q", url + "/repo.git", str(d / "clone")]),
    "npm": (
        ["npm"],
        lambda r, url, d: [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
            "--fetch-retries=0",
            "--registry",
            url + "/",
            "tinypkg",
        ],
    ),
}
FIRST_PATH = {
    "curl": "/curl/hello",
    "requests": "/requests/hello",
    "httpx": "/httpx/hello",
    "pip": "/simple/tinypkg",
    "git": "/repo.git/info/refs",
    "npm": "/tinypkg",
}


def _check_result(tool: str, d: Path) -> None:
    if tool == "pip":
        assert (d / "site" / "tinypkg" / "__init__.py").read_text() == "VALUE = 42\n"
    elif tool == "git":
        assert (d / "clone" / "README.txt").read_text() == "served by git http-backend\n"
    elif tool == "npm":
        assert json.loads((d / "node_modules" / "tinypkg" / "package.json").read_text())["version"] == "1.0.0"


def _need(tool: str) -> None:
    exe = {"requests": None, "httpx": None, "pip": None}.get(tool, tool)
    if exe and shutil.which(exe) is None:
        pytest.skip(f"{exe} is not installed")


@pytest.mark.parametrize("site", [PUBLIC, OTHER], ids=["inspected", "passthrough"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_printed_lines_are_enough_for_the_tool(rig: Rig, tool: str, site: str, tmp_path: Path) -> None:
    _need(tool)
    sections, make = TOOLS[tool]
    p = rig.run(sections, make(rig, rig.tools.base(site), tmp_path), cwd=tmp_path)
    assert p.returncode == 0, f"{tool} -> {site} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    _check_result(tool, tmp_path)
    assert rig.tools.saw(site, FIRST_PATH[tool])
    inspected = rig.proxy.decisions(**{"destination.host": site, "layer": "inspected"})
    paths = {e["request"]["path"] for e in inspected}
    if site == PUBLIC:  # decrypted: the proxy decided on the request's own method and path
        assert any(path.startswith(FIRST_PATH[tool]) for path in paths), paths
    else:  # a tunnel the proxy never opened
        assert not inspected
        assert rig.proxy.decisions(**{"destination.host": site, "layer": "connect", "decision": "allow"})


@pytest.mark.parametrize("tool", list(TOOLS))
def test_without_its_ca_line_the_tool_fails_on_the_inspected_host(
    rig: Rig, tool: str, tmp_path: Path
) -> None:
    """The control: the proxy lines alone are not enough once the proxy decrypts (so the CA lines matter)."""
    _need(tool)
    _, make = TOOLS[tool]
    p = rig.run([], make(rig, rig.tools.base(PUBLIC), tmp_path), cwd=tmp_path)
    assert p.returncode != 0, f"{tool} succeeded without trusting the proxy CA:\n{p.stdout[-1000:]}"
    said = (p.stdout + p.stderr).lower()
    assert "certificate" in said or "ssl" in said, said[-1500:]  # it failed for the reason under test


def _shell_exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line[7:].partition("=")
            out[name] = subprocess.run(
                ["bash", "-c", f"printf %s {value}"], capture_output=True, text=True, check=True
            ).stdout
    return out


def test_the_three_forms_set_the_same_variables(tmp_path: Path) -> None:
    args = [
        "--proxy-url",
        "http://egress.internal:3128",
        "--ca",
        "/etc/portcullis/ca.pem",
        "--no-proxy",
        "localhost,.svc,::1",
    ]
    shell = _shell_exports(env_text("--shell", *args))
    docker = {}
    for line in env_text("--dockerfile", *args).splitlines():
        if line.startswith("ENV "):
            name, _, value = line[4:].partition("=")
            docker[name] = json.loads(value)
    k8s_doc = YAML(typ="safe").load(env_text("--k8s", *args))
    k8s = {e["name"]: e["value"] for e in k8s_doc["env"]}
    assert shell == docker == k8s
    names = set(shell)
    assert {
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "NODE_EXTRA_CA_CERTS",
        "NODE_USE_ENV_PROXY",
        "npm_config_cafile",
        "GIT_SSL_CAINFO",
        "CARGO_HTTP_CAINFO",
        "JAVA_TOOL_OPTIONS",
    } <= names
    assert shell["JAVA_TOOL_OPTIONS"] == (
        "-Dhttp.proxyHost=egress.internal -Dhttp.proxyPort=3128 "
        "-Dhttps.proxyHost=egress.internal -Dhttps.proxyPort=3128 "
        "-Dhttp.nonProxyHosts=localhost|*.svc|[::1]"
    )
    assert shell["NODE_EXTRA_CA_CERTS"] == "/etc/portcullis/ca.pem"
    assert k8s_doc["volumeMounts"][0]["mountPath"] == "/etc/portcullis/ca.pem"
    assert k8s_doc["volumes"][0]["configMap"]["name"] == "portcullis-ca"
    text = env_text("--shell", *args)
    assert (
        "keytool -importcert -noprompt -cacerts -storepass changeit -alias portcullis "
        "-file /etc/portcullis/ca.pem" in text
    )
    assert "update-ca-certificates" in text


def test_k8s_form_fits_a_pod_spec() -> None:
    """Merged into a Pod as its comment says, the fragment validates against the Kubernetes schema."""
    import kubernetes_validate

    frag = YAML(typ="safe").load(env_text("--k8s"))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent"},
        "spec": {
            "containers": [
                {
                    "name": "agent",
                    "image": "agent:1",
                    "env": frag["env"],
                    "volumeMounts": frag["volumeMounts"],
                }
            ],
            "volumes": frag["volumes"],
        },
    }
    kubernetes_validate.validate(pod, "1.30", strict=True)
    assert frag["env"][0] == {"name": "HTTP_PROXY", "value": "http://portcullis.portcullis.svc:8080"}


@pytest.mark.parametrize(
    "bad",
    [
        ["--proxy-url", "portcullis:8080"],
        ["--proxy-url", "ftp://p:21"],
        ["--proxy-url", "http://p:99999"],
        ["--proxy-url", "http://p:8080/path"],
        ["--ca", "/x\nexport EVIL=1"],
    ],
)
def test_bad_options_are_refused_with_one_line(bad: list[str]) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "addons.cli", "env", *bad],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("portcullis env: ") and p.stderr.count("\n") == 1


@pytest.mark.container
def test_dockerfile_form_builds_an_image_that_goes_through_the_proxy(rig: Rig, tmp_path: Path) -> None:
    """The --dockerfile lines, appended to the slim Python base, make an image whose Python reaches
    the inspected and the passthrough host through the proxy (system store via update-ca-certificates)."""
    import uuid

    from tests.deploy import podman_support as ps

    ps.skip_if_unusable()
    base = ps.ensure_base_image()
    proxy_ca = rig.folder / "proxy" / "certs" / "mitmproxy-ca-cert.pem"
    shutil.copy(proxy_ca, tmp_path / "portcullis-ca.pem")
    shutil.copy(
        rig.tools.ca_pem, tmp_path / "public-roots.pem"
    )  # stands for the public roots of a real image
    generated = env_text("--dockerfile", "--proxy-url", rig.proxy.proxy_url)
    (tmp_path / "Containerfile").write_text(
        f"FROM {base}\nCOPY public-roots.pem /usr/local/share/ca-certificates/public-roots.crt\n{generated}"
    )
    tag = f"localhost/portcullis-test-agentenv:{uuid.uuid4().hex[:8]}"
    ps.podman(
        "build",
        *ps.build_flags(host_ca=False),
        "--layers=false",  # no intermediate images left behind
        "-t",
        tag,
        "-f",
        str(tmp_path / "Containerfile"),
        str(tmp_path),
        timeout=300,
    )
    try:
        fetch = (
            "import json, sys, urllib.request\n"
            "for url in sys.argv[1:]:\n"
            "    print(json.load(urllib.request.urlopen(url, timeout=20))['site'])\n"
        )
        urls = [
            rig.tools.base(PUBLIC) + "/dockerfile/inspected",
            rig.tools.base(OTHER) + "/dockerfile/passthrough",
        ]
        p = ps.podman("run", "--rm", "--network", "host", tag, "python", "-c", fetch, *urls, check=False)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.split() == [PUBLIC, OTHER]
        assert rig.proxy.decisions(
            **{"destination.host": PUBLIC, "layer": "inspected", "request.path": "/dockerfile/inspected"}
        )
        assert rig.tools.saw(OTHER, "/dockerfile/passthrough")
    finally:
        ps.podman("rmi", "-f", tag, check=False)
