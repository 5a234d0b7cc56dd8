"""The decision pipeline, pure of mitmproxy: a Request in, one immutable Outcome out.

identify the client -> check the authority -> ask the policy -> resolve once and pin -> approvals.
The proxy's hooks (addons/proxy/addon.py) and `portcullis check` run this same code.
"""
