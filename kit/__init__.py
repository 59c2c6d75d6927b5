"""The kit: runs an engine's lifecycle in real processes and records it."""
