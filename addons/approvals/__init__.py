"""Human approvals: hold and coalesce requests, store, webhooks, admin API, page, CLI."""
