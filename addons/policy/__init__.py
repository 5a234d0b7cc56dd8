"""The pure policy core: config and rule models, host normalisation, matching, decisions.

Nothing in this package touches mitmproxy, sockets, the clock or logging.
"""

from addons.policy.evaluate import Policy
from addons.policy.hosts import HostError, classify_address, is_ip, normalize_host, registered_domain
from addons.policy.load import LoadedConfig, PolicyError, load_config, load_policy

__all__ = [
    "HostError", "LoadedConfig", "Policy", "PolicyError", "classify_address", "is_ip", "load_config",
    "load_policy", "normalize_host", "registered_domain",
]
