"""The starter: runs one engine lifecycle in real processes (``SPEC.md`` §2, §3, §5)."""
