"""Transport-free cores: the draft and verify cores, draft-length policies, the edge session
core (the one round loop) and the in-process engine. No NATS, no Redis: services wrap these,
tests drive them directly. Model math lives in `common.models` and `common.sampling`."""
