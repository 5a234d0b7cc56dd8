"""The pure policy core: host normalisation, authority parsing, rule matching and decisions.

Nothing in this package reads files or touches mitmproxy, sockets, the clock or logging; the loader
(`addons.config`) builds a `Policy` from the config and rule files.
"""
