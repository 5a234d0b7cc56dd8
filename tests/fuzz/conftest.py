"""The fuzz tests import their helpers by name (`from fuzz_support import ...`), like tests/policy."""
