"""stack: `wisp up`'s machinery, not a service.

The embedded nats-server and redis-server (`embedded`), the one place child processes are
spawned so that they die with their parent (`children`), and the launcher that starts the
services as processes, waits until they are ready and stops them in order (`launcher`).
"""
