"""The loader: the config file and the rule files, read (ruamel, or the strict fast reader), checked
(pydantic models, every error as `path:line:col: message`) and compiled into a `policy.Policy`."""
