"""admission-scheduler: opens sessions on verifiers, batches verify requests for them, detects
dead verifiers and moves their work, and serves the server-side modes (docs/architecture.md)."""
