"""NATS and Redis plumbing shared by several services: the service process life cycle
(`service`) and the client-facing side of a generation (`generation`: open or resume a session,
stream tokens, submit rounds over NATS), which the edge-drafter and the admission-scheduler's
server-side modes both serve. Below it: `common.engine` (no transport) and the wire types."""
