"""The syslog sink against a real rsyslogd on loopback, for each transport (UDP, TCP with octet
counting, TLS): what rsyslog's RFC 5424 parser read from every message, a receiver restart (events
held, delivery resumes by itself), a bounded buffer with counted drops, and a whole proxy."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from addons.telemetry.events import Telemetry
from addons.telemetry.report import build as report_build
from tests.harness import PortcullisProc, base_config, upstreams  # noqa: F401 - fixture
from tests.telemetry.rsyslog_support import Rsyslog, free_port, make_syslog_pki, need_rsyslog
from tests.telemetry.tel_helpers import lines, make, record

pytestmark = pytest.mark.e2e

TRANSPORTS = ["udp", "tcp", "tls"]


def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def receiver(tmp_path: Path, transport: str, **kw: Any) -> Rsyslog:
    pki = make_syslog_pki(tmp_path / "pki") if transport == "tls" else None
    return Rsyslog(tmp_path / "rsyslog", transport, pki, **kw)


def sink_config(r: Rsyslog, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"address": r.address, "transport": r.transport, "facility": "local3",
                           "app_name": "portcullis-test", "hostname": "egress-gw.test"}
    if r.transport == "tls":
        assert r.pki is not None
        cfg["tls"] = {"ca": str(r.pki["server_ca"]), "server_name": "public.test"}
    cfg.update(over)
    return cfg


def telemetry(tmp_path: Path, r: Rsyslog, **over: Any) -> tuple[Telemetry, io.StringIO]:
    return make(tmp_path, syslog=sink_config(r, **over))


def dropped(t: Telemetry) -> float:
    return t.metrics.registry.get_sample_value("portcullis_events_dropped_total", {"sink": "syslog"}) or 0.0


def buffered(t: Telemetry) -> float:
    return t.metrics.registry.get_sample_value("portcullis_events_buffered", {"sink": "syslog"}) or 0.0


def close(t: Telemetry) -> None:
    th = threading.Thread(target=t.close)
    th.start()
    th.join(30)
    assert not th.is_alive(), "Telemetry.close() did not return"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rsyslog_parses_every_header_field_and_the_json_event(tmp_path: Path, transport: str) -> None:
    with receiver(tmp_path, transport) as r:
        t, out = telemetry(tmp_path, r)
        t.decision(record(decision="allow", reason="rule", host="pypi.org"))
        t.decision(record(decision="deny", reason="default", host="pastebin.com"))
        t.decision(record(decision="deny", reason="internal_error", host="api.build.corp"))
        t.emit("rules.reloaded", files=["rules/a.yaml"], rule_count=3, trigger="watch")
        got = r.wait_received(4)
        close(t)
    sent = lines(out)
    assert len(got) == 4 and dropped(t) == 0
    by_flow = {json.dumps(json.loads(g["msg"]), sort_keys=True): g for g in got}
    for doc, (severity, msgid) in zip(sent, [("6", "egress.decision"), ("4", "egress.decision"),
                                             ("3", "egress.decision"), ("6", "rules.reloaded")], strict=True):
        g = by_flow[json.dumps(doc, sort_keys=True)]   # MSG is exactly the JSON line of stdout
        assert g["version"] == "1" and g["sd"] == "-"
        assert g["facility"] == "19" and g["severity"] == severity   # local3; info / warning / err
        assert g["pri"] == str(19 * 8 + int(severity))
        assert g["app_name"] == "portcullis-test" and g["hostname"] == "egress-gw.test"
        assert g["procid"] == str(os.getpid()) and g["msgid"] == msgid
        assert g["timestamp"] == doc["timestamp"]    # the event's own time, to the millisecond
        assert g["from"] == "127.0.0.1" and g["input"] == ("imudp" if transport == "udp" else "imtcp")
    assert json.loads(by_flow[json.dumps(sent[2], sort_keys=True)]["msg"])["destination"]["host"] \
        == "api.build.corp"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_restart_events_are_held_and_delivery_resumes(tmp_path: Path, transport: str) -> None:
    r = receiver(tmp_path, transport).start()
    try:
        t, out = telemetry(tmp_path, r)
        for i in range(5):
            t.emit("rules.reloaded", trigger=f"before-{i}")
        r.wait_received(5)
        r.stop()
        for i in range(5):
            t.emit("rules.reloaded", trigger=f"outage-{i}")
        # Nothing is lost: the sink noticed the receiver is gone and holds every outage event.
        assert wait_for(lambda: buffered(t) == 5), f"buffered={buffered(t)}"
        r.start()
        for i in range(5):
            t.emit("rules.reloaded", trigger=f"after-{i}")
        got = r.wait_received(15, timeout=30)
        close(t)
    finally:
        r.stop()
    triggers = [json.loads(g["msg"])["trigger"] for g in got]
    want = [f"{p}-{i}" for p in ("before", "outage", "after") for i in range(5)]
    assert sorted(triggers) == sorted(want), triggers    # each exactly once: no loss, no duplicate
    assert dropped(t) == 0 and buffered(t) == 0 and len(lines(out)) == 15


def test_full_buffer_drops_new_events_and_counts_them(tmp_path: Path) -> None:
    r = receiver(tmp_path, "tcp").start()
    try:
        t, out = telemetry(tmp_path, r, buffer=3)
        t.emit("rules.reloaded", trigger="first")
        r.wait_received(1)
        r.stop()
        for i in range(10):
            t.emit("rules.reloaded", trigger=f"outage-{i}")
        assert wait_for(lambda: buffered(t) == 3)
        assert dropped(t) == 7 and t.healthy()          # a syslog outage never denies traffic
        assert len(lines(out)) == 11                    # stdout, the audit trail, has every event
        r.start()
        got = r.wait_received(4, timeout=30)
        close(t)
    finally:
        r.stop()
    assert [json.loads(g["msg"])["trigger"] for g in got] == ["first", "outage-0", "outage-1", "outage-2"]
    assert dropped(t) == 7


def test_tls_receiver_with_an_untrusted_certificate_gets_nothing(tmp_path: Path) -> None:
    with receiver(tmp_path, "tls") as r:
        other_ca = make_syslog_pki(tmp_path / "other-pki")["server_ca"]
        t, _ = telemetry(tmp_path, r, tls={"ca": str(other_ca), "server_name": "public.test"})
        for i in range(3):
            t.emit("rules.reloaded", trigger=f"secret-{i}")
        assert wait_for(lambda: buffered(t) == 3)
        time.sleep(0.5)  # give a wrongly trusting sink the chance to deliver (it must not)
        assert r.received() == []
        close(t)
    assert dropped(t) == 3  # held until shutdown, then counted


def test_tls_wrong_server_name_is_refused(tmp_path: Path) -> None:
    with receiver(tmp_path, "tls") as r:
        assert r.pki is not None
        t, _ = telemetry(tmp_path, r, tls={"ca": str(r.pki["server_ca"]), "server_name": "other.test"})
        t.emit("rules.reloaded", trigger="x")
        assert wait_for(lambda: buffered(t) == 1)
        time.sleep(0.5)
        assert r.received() == []
        close(t)


def test_tls_client_certificate_for_a_receiver_that_requires_one(tmp_path: Path) -> None:
    with receiver(tmp_path, "tls", client_auth=True) as r:
        assert r.pki is not None
        t, _ = telemetry(tmp_path, r, tls={"ca": str(r.pki["server_ca"]), "server_name": "public.test",
                                           "cert": str(r.pki["client_cert"]),
                                           "key": str(r.pki["client_key"])})
        t.emit("rules.reloaded", trigger="mutual")
        got = r.wait_received(1)
        close(t)
        assert json.loads(got[0]["msg"])["trigger"] == "mutual"
        # Without the client certificate the same receiver refuses the sink.
        t2, _ = telemetry(tmp_path, r)
        t2.emit("rules.reloaded", trigger="anonymous")
        assert wait_for(lambda: buffered(t2) == 1)
        time.sleep(0.5)
        assert [json.loads(g["msg"])["trigger"] for g in r.received()] == ["mutual"]
        close(t2)


def test_a_proxy_sends_its_events_to_rsyslog(tmp_path: Path, upstreams: Any) -> None:  # noqa: F811
    need_rsyslog("tcp")
    with receiver(tmp_path, "tcp") as r:
        cfg = base_config(upstreams, tmp_path)
        cfg["telemetry"] = {**cfg["telemetry"], "syslog": {"address": r.address, "transport": "tcp",
                                                           "facility": "auth", "app_name": "portcullis"}}
        with PortcullisProc(tmp_path, upstreams, config=cfg, rules=[
                {"name": "pub", "action": "allow", "hosts": ["public.test"]}]) as p:
            assert p.curl(f"http://public.test:{upstreams.http_port}/hello").status == 200
            assert p.curl(f"http://blocked.test:{upstreams.http_port}/x").status == 403
            p.wait_event("egress.decision", count=2)
        got = r.wait_received(len(p.events), timeout=30)   # proxy.stopped too: close() flushes
    assert [json.loads(g["msg"]) for g in got] == p.events
    by_event = {(g["msgid"], json.loads(g["msg"]).get("decision")): g for g in got}
    assert by_event[("egress.decision", "allow")]["severity"] == "6"
    assert by_event[("egress.decision", "deny")]["severity"] == "4"
    assert {g["facility"] for g in got} == {"4"} and {g["app_name"] for g in got} == {"portcullis"}
    assert by_event[("proxy.stopped", None)]["procid"] == str(p.events[0]["pid"])


def test_the_readme_rsyslog_snippet_works(tmp_path: Path) -> None:
    """The receiving config the README shows, run as written (paths and port swapped for the test's)."""
    binary = need_rsyslog("tls")
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    m = re.search(r"```\n(# /etc/rsyslog\.d/portcullis\.conf.*?)```", readme, re.DOTALL)
    assert m, "the rsyslog snippet is missing from the README"
    pki = make_syslog_pki(tmp_path / "pki")
    port = free_port(socket.SOCK_STREAM)
    out = tmp_path / "log" / "events.jsonl"
    out.parent.mkdir()
    conf = (m.group(1)
            .replace("/etc/rsyslog.d/portcullis-ca.pem", str(pki["server_ca"]))
            .replace("/etc/rsyslog.d/server.crt", str(pki["server_cert"]))
            .replace("/etc/rsyslog.d/server.key", str(pki["server_key"]))
            .replace('port="6514"', f'port="{port}"')
            .replace("/var/log/portcullis/events.jsonl", str(out)))
    assert str(port) in conf and str(out) in conf and '"/etc/' not in conf
    (tmp_path / "rsyslog.conf").write_text(conf)
    with open(tmp_path / "rsyslogd.log", "wb") as log:
        proc = subprocess.Popen([binary, "-n", "-f", str(tmp_path / "rsyslog.conf"), "-i",
                                 str(tmp_path / "rsyslogd.pid")], stdout=log, stderr=subprocess.STDOUT)
        try:
            tls = {"ca": str(pki["server_ca"]), "server_name": "public.test"}
            t, stdout = make(tmp_path, syslog={"address": f"127.0.0.1:{port}", "transport": "tls",
                                               "tls": tls})
            t.decision(record(decision="deny", reason="default", host="api.build.corp"))
            t.decision(record(decision="deny", reason="default", host="ci.build.corp"))
            t.emit("rules.reloaded", trigger="watch")
            assert wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 3, 30), \
                (tmp_path / "rsyslogd.log").read_text()
            close(t)
        finally:
            proc.terminate()
            proc.wait(15)
    assert out.read_text() == stdout.getvalue()     # the same JSON lines as stdout, byte for byte
    groups = {g["domain"]: g for g in report_build(out.read_text().splitlines()).as_dict()["candidates"]}
    assert groups["build.corp"]["denied"] == 2
