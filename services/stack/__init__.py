"""stack: `wisp up`'s machinery, not a service.

The embedded nats-server and redis-server (`embedded`) and the launcher that starts the
services as processes, waits until they are ready and stops them in order (`launcher`).
"""
