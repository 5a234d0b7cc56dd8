"""The enforcing proxy: `portcullis run`, the mitmproxy addon and its helpers."""
