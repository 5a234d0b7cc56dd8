"""addons/proxy/responses.py: the answers the proxy writes itself (403/400/407 denials, 502 upstream
failures, the JSON pages that replace mitmproxy's own error pages)."""

from __future__ import annotations

import json

from addons.pipeline.model import Outcome, refusal
from addons.policy.model import Action, Client, Reason, Request, RuleRef
from addons.proxy.responses import deny_response, upstream_error_response


def test_deny_response_shape():
    req = Request("x.test", 443, Client("10.0.0.1"))
    rule = RuleRef("no-x", Action.DENY, "r.yaml", 3)
    r = deny_response(Outcome(req, Action.DENY, Reason.RULE, status=403, rule=rule, retry_after=30))
    assert r.status_code == 403 and r.reason == "Blocked by Portcullis: rule (no-x)"
    assert r.headers["X-Portcullis-Decision"] == "deny" and r.headers["X-Portcullis-Reason"] == "rule"
    assert r.headers["Retry-After"] == "30"
    body = json.loads(r.content or b"")
    assert set(body) == {"error", "host", "port", "reason", "rule", "approval_id", "message"}
    assert body["message"].endswith(".")
    r407 = deny_response(refusal(req, Reason.PROXY_AUTH))
    assert r407.status_code == 407 and r407.headers["Proxy-Authenticate"].startswith("Basic")
    r502 = upstream_error_response("x.test", 443, "refused")
    assert r502.status_code == 502 and r502.headers["X-Portcullis-Decision"] == "allow"
