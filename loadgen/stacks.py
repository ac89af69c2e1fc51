"""The stacks a multi-mode run (`loadgen capacity`, `loadgen sweep`) sends its load to.

Given a NATS URL, every mode goes to that one stack, as it is (not ours: never pinned).
Without one, the run starts one NATS + Redis for itself (:func:`embedded_infra`) and a fresh set
of services per mode (:func:`stack_for`: 1 verifier, 1 edge-drafter, the scheduler's batch
policy by mode as `wisp up` sets it), so no mode inherits another's warm caches or queues; its
server side and its edges are pinned to the disjoint CPU sets of a
:class:`~loadgen.partition.Partition`, with this process on the edges' side.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

from loadgen.partition import Partition, apply, pin_self

__all__ = ["embedded_infra", "stack_for"]


@contextlib.contextmanager
def embedded_infra(nats_url: str | None) -> Iterator[Any]:
    """One NATS + Redis (an ``EmbeddedInfra``) for the whole run, stopped at the end; None
    when the run was given a stack's `nats_url`."""
    if nats_url:
        yield None
        return
    from services.stack.embedded import EmbeddedInfra

    with tempfile.TemporaryDirectory() as tmp, EmbeddedInfra(os.path.join(tmp, "infra")) as infra:
        yield infra


@contextlib.contextmanager
def stack_for(nats_url: str | None, infra: Any, part: Partition | None,
              say: Callable[[str], None], tag: str, *,
              extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, dict | None]]:
    """(NATS URL, CPU partition report): the given stack (`infra` None; not partitioned: it is
    not ours), or a fresh embedded one on `infra` pinned to `part` (None: not pinned), its
    services started with `extra_env` (e.g. ``loadgen.fleet.edge_env``). `tag` prefixes the
    line `say` gets about the pinning (``[capacity]``)."""
    if infra is None:
        yield nats_url, None
        return
    from services.stack.launcher import stack_options, start_stack, stop_stack

    env = dict(extra_env or {})
    if part is not None:
        env["OMP_NUM_THREADS"] = str(max(1, min(len(part.server), len(part.edges))))
    with tempfile.TemporaryDirectory() as state:
        stack = start_stack(stack_options(
            nats_url=infra.nats_url, redis_url=infra.redis_url, verifiers=1, device="cpu",
            state_dir=os.path.join(state, ".wisp"), extra_env=env))
        try:
            pinned = None
            if part is not None:
                # The servers were started before the stack: pin them too (by pid).
                pinned = apply(SimpleNamespace(services=stack.services, infra=infra), part)
                pinned["self"] = pin_self(part)
                say(f"{tag} CPUs: server side {sorted(part.server)}, edges and loadgen "
                    f"{sorted(part.edges)}" + (f" ({part.reason})" if part.shared else ""))
            yield stack.nats_url, pinned
        finally:
            stop_stack(stack)
