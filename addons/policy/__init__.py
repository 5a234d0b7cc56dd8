"""The pure policy core: config and rule models, host normalisation, matching, decisions.

Nothing in this package touches mitmproxy, sockets, the clock or logging.
"""
