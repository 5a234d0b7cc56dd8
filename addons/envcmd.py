"""`portcullis env --shell|--dockerfile|--k8s`: what an agent container needs to use the proxy.

The proxy variables (both spellings), NO_PROXY, and CA trust for the system store and for every
common tool that keeps its own: curl/OpenSSL, Python (requests, httpx, pip), Node, npm, git, Go,
Java and cargo. One list of settings, rendered three ways, so the forms never disagree.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit


class Format(Enum):
    SHELL = "shell"
    DOCKERFILE = "dockerfile"
    K8S = "k8s"


DEFAULT_PROXY = {Format.SHELL: "http://portcullis:8080", Format.DOCKERFILE: "http://portcullis:8080",
                 Format.K8S: "http://portcullis.portcullis.svc:8080"}
DEFAULT_CA = "/usr/local/share/ca-certificates/portcullis.crt"
DEFAULT_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1"
K8S_CONFIGMAP = "portcullis-ca"  # deploy/kubernetes/ names it so; its key is the file name below
K8S_CA_KEY = "portcullis-ca.pem"


@dataclass(frozen=True)
class Env:
    name: str
    value: str


@dataclass(frozen=True)
class Run:
    """A command to run once as root (shell), at build time (Dockerfile), or at container start (k8s)."""

    command: str
    optional: bool = False  # only for images that have the tool (keytool): commented out in a Dockerfile


@dataclass(frozen=True)
class Note:
    text: str


@dataclass
class Section:
    title: str
    items: list[Env | Run | Note] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    proxy_url: str
    ca: str  # the Portcullis public certificate, inside the agent container
    bundle: str  # the system bundle once the CA was added to it
    no_proxy: str
    ca_source: str  # shell: where the certificate is when the commands run; Dockerfile: in the build context


class EnvError(ValueError):
    pass


def proxy_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnvError(f"--proxy-url {url!r}: expected http://HOST:PORT (the proxy as the agent reaches it)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise EnvError(f"--proxy-url {url!r}: {e}") from e
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EnvError(f"--proxy-url {url!r}: a proxy URL has no path, query or fragment")
    return parts.hostname, port


def _java_non_proxy(no_proxy: str) -> str:
    """NO_PROXY entries as Java's http.nonProxyHosts (| separated, * wildcards, IPv6 in brackets)."""
    out = []
    for entry in (e.strip() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry.startswith("."):
            entry = "*" + entry
        elif ":" in entry and not entry.startswith("["):
            entry = f"[{entry}]"
        out.append(entry)
    return "|".join(out)


def sections(s: Settings) -> list[Section]:
    host, port = proxy_host_port(s.proxy_url)
    url = s.proxy_url.rstrip("/")
    java_props = (f"-Dhttp.proxyHost={host} -Dhttp.proxyPort={port} -Dhttps.proxyHost={host} "
                  f"-Dhttps.proxyPort={port}")
    if s.no_proxy:
        java_props += f" -Dhttp.nonProxyHosts={_java_non_proxy(s.no_proxy)}"
    user_note = ([Note("Java's proxy properties cannot carry the user and password of the proxy URL: "
                       "set them in the application (an Authenticator)")]
                 if urlsplit(s.proxy_url).username else [])
    return [
        Section("Proxy: every tool below reads these (curl, wget and git only the lower-case names)", [
            Env("HTTP_PROXY", url), Env("HTTPS_PROXY", url), Env("http_proxy", url), Env("https_proxy", url),
            Env("NO_PROXY", s.no_proxy), Env("no_proxy", s.no_proxy),
        ]),
        Section("System CA store (Debian/Ubuntu/Alpine; needs the ca-certificates package; as root)", [
            Run(f"cp {shlex.quote(s.ca_source)} {shlex.quote(s.ca)} && update-ca-certificates"),
            Note("RHEL/Fedora: copy it to /etc/pki/ca-trust/source/anchors/ and run update-ca-trust; "
                 "then use /etc/pki/tls/certs/ca-bundle.crt as --ca-bundle"),
        ]),
        Section("curl and OpenSSL (also Python's ssl, urllib and httpx, Ruby, Go)", [
            Env("CURL_CA_BUNDLE", s.bundle), Env("SSL_CERT_FILE", s.bundle),
        ]),
        Section("Python requests (it trusts certifi's bundle, not the system store)", [
            Env("REQUESTS_CA_BUNDLE", s.bundle),
        ]),
        Section("pip", [Env("PIP_CERT", s.bundle)]),
        Section("Node", [
            Env("NODE_EXTRA_CA_CERTS", s.ca),
            Env("NODE_USE_ENV_PROXY", "1"),
            Note("NODE_USE_ENV_PROXY: Node >= 24 (and 22.21) route fetch and http(s) through HTTP(S)_PROXY; "
                 "older Node needs a proxy agent in the code"),
        ]),
        Section("npm", [
            Env("npm_config_cafile", s.bundle), Env("npm_config_proxy", url),
            Env("npm_config_https_proxy", url),
        ]),
        Section("git (it reads https_proxy above)", [Env("GIT_SSL_CAINFO", s.bundle)]),
        Section("Go", [Note("Go reads HTTPS_PROXY, NO_PROXY and SSL_CERT_FILE above; nothing else to set "
                            "(GOPROXY's hosts need allow rules)")]),
        Section("Java (the JDK keeps its own trust store)", [
            Run(f"keytool -importcert -noprompt -cacerts -storepass changeit -alias portcullis "
                f"-file {shlex.quote(s.ca)}", optional=True),
            Env("JAVA_TOOL_OPTIONS", java_props),
            *user_note,
        ]),
        Section("cargo", [Env("CARGO_HTTP_CAINFO", s.bundle), Env("CARGO_HTTP_PROXY", url)]),
    ]


def render_shell(secs: list[Section], s: Settings) -> str:
    out = ["# Portcullis: what an agent container needs (portcullis env --shell).",
           f"# Proxy: {s.proxy_url}; CA certificate at {s.ca_source} (public part only, never the key).", ""]
    for sec in secs:
        out.append(f"# --- {sec.title}")
        for it in sec.items:
            if isinstance(it, Env):
                out.append(f"export {it.name}={shlex.quote(it.value)}")
            elif isinstance(it, Run):
                out.append(it.command)
            else:
                out.append(f"# {it.text}")
        out.append("")
    return "\n".join(out)


def _docker_quote(value: str) -> str:
    return json.dumps(value).replace("$", "\\$")


def render_dockerfile(secs: list[Section], s: Settings) -> str:
    out = ["# Portcullis: what an agent image needs (portcullis env --dockerfile).",
           f"# Put the CA certificate in the build context as {s.ca_source} (portcullis ca prints its path;",
           "# the public part only, never the key). The proxy variables come last so that the build's own",
           "# package installs above them do not go through the proxy.", ""]
    env_lines: list[str] = []
    for sec in secs:
        has_run = any(isinstance(it, Run) for it in sec.items)
        # Commands (and the notes of their sections) go first; variables and their notes last.
        runs = [it for it in sec.items if isinstance(it, Run) or (has_run and isinstance(it, Note))]
        envs = [it for it in sec.items if it not in runs]
        if runs:
            out.append(f"# --- {sec.title}")
            for it in runs:
                if isinstance(it, Run) and it.command.endswith("update-ca-certificates"):
                    out.append(f"COPY {s.ca_source} {s.ca}")
                    out.append("RUN update-ca-certificates")
                elif isinstance(it, Run):
                    out.append(("# (images with a JDK) " if it.optional else "") + f"RUN {it.command}")
                else:
                    out.append(f"# {it.text}")
            out.append("")
        if envs:
            env_lines.append(f"# --- {sec.title}")
            env_lines.extend(f"ENV {it.name}={_docker_quote(it.value)}" if isinstance(it, Env)
                             else f"# {it.text}" for it in envs if not isinstance(it, Run))
            env_lines.append("")
    return "\n".join(out + env_lines)


def render_k8s(secs: list[Section], s: Settings) -> str:
    out = ["# Portcullis: what an agent pod needs (portcullis env --k8s). Merge `env` and `volumeMounts`",
           "# into the agent's container and `volumes` into the pod spec. The ConfigMap holds the public",
           "# certificate only: kubectl create configmap portcullis-ca --from-file=portcullis-ca.pem=CERT",
           f"# Tools below that read {s.bundle} need the CA in it: run update-ca-certificates at start",
           "# (as root), or build the image with `portcullis env --dockerfile`.",
           "env:"]
    for sec in secs:
        out.append(f"  # --- {sec.title}")
        for it in sec.items:
            if isinstance(it, Env):
                out.append(f"  - name: {it.name}")
                out.append(f"    value: {json.dumps(it.value)}")
            elif isinstance(it, Run):
                out.append(f"  # at start or build time: {it.command}")
            else:
                out.append(f"  # {it.text}")
    out += ["volumeMounts:",
            f"  - name: {K8S_CONFIGMAP}",
            f"    mountPath: {json.dumps(s.ca)}",
            f"    subPath: {K8S_CA_KEY}",
            "    readOnly: true",
            "volumes:",
            f"  - name: {K8S_CONFIGMAP}",
            f"    configMap: {{name: {K8S_CONFIGMAP}}}",
            ""]
    return "\n".join(out)


RENDER = {Format.SHELL: render_shell, Format.DOCKERFILE: render_dockerfile, Format.K8S: render_k8s}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = sub.add_parser("env", help="print the settings an agent container needs (proxy, CA trust)")
    fmt = env.add_mutually_exclusive_group()
    for f in Format:
        fmt.add_argument(f"--{f.value}", dest="format", action="store_const", const=f.value,
                         help=f"as {'shell exports' if f is Format.SHELL else f.value + ' lines'}"
                              + (" (the default)" if f is Format.SHELL else ""))
    env.add_argument("--proxy-url", metavar="URL",
                     help="the proxy as the agent reaches it (default: http://portcullis:8080; "
                          "--k8s: http://portcullis.portcullis.svc:8080)")
    env.add_argument("--ca", metavar="PATH", default=DEFAULT_CA,
                     help=f"the Portcullis CA certificate inside the agent container (default: {DEFAULT_CA})")
    env.add_argument("--ca-bundle", metavar="PATH", default=DEFAULT_BUNDLE,
                     help=f"the system CA bundle once the CA is in it (default: {DEFAULT_BUNDLE})")
    env.add_argument("--ca-source", metavar="PATH", default="portcullis-ca.pem",
                     help="where the certificate is when the commands run (--shell) or in the build context "
                          "(--dockerfile); default: portcullis-ca.pem")
    env.add_argument("--no-proxy", metavar="LIST", default=DEFAULT_NO_PROXY,
                     help=f"hosts the agent reaches directly (default: {DEFAULT_NO_PROXY})")


def env_command(args: argparse.Namespace) -> int:
    fmt = Format(args.format or Format.SHELL.value)
    s = Settings(proxy_url=args.proxy_url or DEFAULT_PROXY[fmt], ca=args.ca, bundle=args.ca_bundle,
                 no_proxy=args.no_proxy, ca_source=args.ca_source)
    try:
        for name, value in (("--proxy-url", s.proxy_url), ("--ca", s.ca), ("--ca-bundle", s.bundle),
                            ("--no-proxy", s.no_proxy), ("--ca-source", s.ca_source)):
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise EnvError(f"{name}: control characters are not allowed")
        text = RENDER[fmt](sections(s), s)
    except EnvError as e:
        print(f"portcullis env: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
