"""The user-facing pipelines: optimize (with latency planning), inspection, and their reports."""
