"""Task credentials: minted by the orchestrator for one agent task (its profile, its labels), checked
on every request that presents one, revoked at once on every process."""
