"""Rejection-predictor models in the JetStream object store, and the edge's side of a swap.

The predictor service stores each model it accepts as ``predictor-v{n}.onnx`` in the bucket
`PREDICTOR_BUCKET` (n: a sequence number, newest + 1) and announces it on `PREDICTOR_UPDATED`
(`PredictorUpdated`: n, the object's name, the sha256 of its bytes, the model's own version
and threshold). The announcement is also kept as the object's description, so a process that
starts later finds the newest model and what was announced for it (`fetch_newest`).

`PredictorFollower` keeps a `PredictorSlot` on the newest model: the newest stored one at
start, then each newer announcement. Nothing here trusts the bytes: the sha256 is checked
against the announcement and the slot refuses a model that does not load or does not fit this
build, so a corrupt, missing or incompatible model leaves the last good one serving.

One writer per bucket is assumed (one predictor service a stack). Two writers racing for the
same n would overwrite each other's object; the loser's announcement then names bytes with
another sha256, which followers refuse (they keep their model), so a race costs an update,
never a wrong model.
"""

from __future__ import annotations

import asyncio
import hashlib
import re

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import ObjectMeta
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from common.engine.predictor.runtime import PredictorSlot
from common.errors import WispError
from common.protocol import PredictorUpdated, decode, encode
from common.subjects import PREDICTOR_BUCKET, PREDICTOR_UPDATED

__all__ = ["PredictorFollower", "PredictorStoreError", "fetch", "fetch_newest",
           "newest_version", "object_name", "publish_model"]

log = structlog.get_logger(__name__)

STORE_TIMEOUT_S = 10.0  # one store call: nats-py's object reads wait on chunks unbounded
_OBJECT_RE = re.compile(r"predictor-v(\d+)\.onnx")


class PredictorStoreError(RuntimeError):
    """A model that could not be read from the store as announced."""


def object_name(version: int) -> str:
    return f"predictor-v{version}.onnx"


async def _bucket(nc: NATS, bucket: str, create: bool) -> ObjectStore | None:
    js = nc.jetstream(timeout=STORE_TIMEOUT_S)
    try:
        return await js.object_store(bucket)
    except BucketNotFoundError:
        if not create:
            return None
    # create_object_store is idempotent for the same config (JetStream returns the stream).
    return await js.create_object_store(bucket, description="wisp rejection predictor models")


async def _versions(store: ObjectStore) -> dict[int, str]:
    """Stored sequence numbers -> object names (deleted objects and other names left out)."""
    try:
        infos = await asyncio.wait_for(store.list(ignore_deletes=True), STORE_TIMEOUT_S)
    except NotFoundError:  # an empty bucket
        return {}
    out = {}
    for info in infos:
        match = _OBJECT_RE.fullmatch(info.name or "")
        if match:
            out[int(match.group(1))] = info.name
    return out


async def newest_version(nc: NATS, bucket: str = PREDICTOR_BUCKET) -> int:
    """The newest stored sequence number (0: none yet). Raises nats errors."""
    store = await _bucket(nc, bucket, create=False)
    return max(await _versions(store), default=0) if store is not None else 0


async def publish_model(nc: NATS, data: bytes, model_version: str, threshold: float, *,
                        bucket: str = PREDICTOR_BUCKET, version: int | None = None,
                        keep: int = 16) -> PredictorUpdated:
    """Store `data` (ONNX bytes) as the next version and announce it; the announcement.

    `version` pins the sequence number (it must be newer than every stored one); by default
    it is the newest + 1. Objects older than the newest `keep` are deleted: followers only
    ever fetch the newest. Raises nats errors, or ValueError for a stale `version` or an
    announcement the wire types refuse (a bad model_version or threshold)."""
    store = await _bucket(nc, bucket, create=True)
    stored = await _versions(store)
    newest = max(stored, default=0)
    if version is None:
        version = newest + 1
    elif version <= newest:
        raise ValueError(f"version {version} is not newer than the stored {newest}")
    name = object_name(version)
    ann = PredictorUpdated(version=version, object_name=name,
                           sha256=hashlib.sha256(data).hexdigest(),
                           model_version=model_version, threshold=float(threshold))
    try:
        payload = encode(ann)
        decode(PredictorUpdated, payload)  # the receivers' checks, before anything is stored
    except WispError as err:
        raise ValueError(f"cannot announce this model: {err.message}") from None
    meta = ObjectMeta(name=name, description=msgspec.json.encode(ann).decode())
    await asyncio.wait_for(store.put(name, data, meta=meta), STORE_TIMEOUT_S)
    await nc.publish(PREDICTOR_UPDATED, payload)
    await nc.flush(timeout=STORE_TIMEOUT_S)
    for old in sorted(stored)[:max(0, len(stored) + 1 - keep)]:
        try:
            await asyncio.wait_for(store.delete(stored[old]), STORE_TIMEOUT_S)
        except (NatsError, TimeoutError) as exc:  # pruning is housekeeping, never fatal
            log.warning("predictor_prune_failed", object=stored[old], error=repr(exc))
    log.info("predictor_published", version=version, object=name, model_version=model_version,
             threshold=threshold, sha256=ann.sha256, bytes=len(data))
    return ann


async def fetch(nc: NATS, ann: PredictorUpdated, bucket: str = PREDICTOR_BUCKET) -> bytes:
    """The bytes `ann` announced; PredictorStoreError when they are missing, unreadable or
    not the announced sha256."""
    try:
        store = await _bucket(nc, bucket, create=False)
        if store is None:
            raise PredictorStoreError(f"no bucket {bucket!r}")
        result = await asyncio.wait_for(store.get(ann.object_name), STORE_TIMEOUT_S)
    except (NatsError, TimeoutError) as exc:
        raise PredictorStoreError(f"{bucket}/{ann.object_name}: {exc!r}") from None
    data = result.data or b""
    digest = hashlib.sha256(data).hexdigest()
    if digest != ann.sha256:
        raise PredictorStoreError(f"{bucket}/{ann.object_name}: sha256 {digest[:12]}... is not "
                                  f"the announced {ann.sha256[:12]}...")
    return data


async def fetch_newest(nc: NATS, bucket: str = PREDICTOR_BUCKET
                       ) -> tuple[PredictorUpdated, bytes] | None:
    """The newest stored model and its announcement; None (logged) when there is none or it
    cannot be read: no bucket, an empty one, JetStream unavailable, a bad object."""
    try:
        store = await _bucket(nc, bucket, create=False)
        if store is None:
            log.info("predictor_store_empty", bucket=bucket)
            return None
        stored = await _versions(store)
        if not stored:
            log.info("predictor_store_empty", bucket=bucket)
            return None
        version = max(stored)
        info = await asyncio.wait_for(store.get_info(stored[version]), STORE_TIMEOUT_S)
    except (NatsError, TimeoutError) as exc:
        log.warning("predictor_store_unavailable", bucket=bucket, error=repr(exc))
        return None
    try:
        ann = msgspec.json.decode((info.description or "").encode(), type=PredictorUpdated)
    except (msgspec.DecodeError, ValueError) as exc:
        log.warning("predictor_store_bad_object", bucket=bucket, object=stored[version],
                    error=f"no valid announcement in its description ({exc})")
        return None
    if ann.version != version or ann.object_name != stored[version]:
        log.warning("predictor_store_bad_object", bucket=bucket, object=stored[version],
                    error=f"its description announces {ann.object_name} v{ann.version}")
        return None
    try:
        return ann, await fetch(nc, ann, bucket)
    except PredictorStoreError as err:
        log.warning("predictor_store_bad_object", bucket=bucket, object=ann.object_name,
                    error=str(err))
        return None


class PredictorFollower:
    """Keeps `slot` on the newest announced model (see the module's docstring).

    `version` is the sequence number of the model it installed (0: none from the store; the
    slot then holds what its owner installed, e.g. the shipped file). `counts` says what
    became of the announcements: installed, refused (sha256, fetch or the model's checks),
    stale (not newer) and malformed."""

    def __init__(self, nc: NATS, slot: PredictorSlot, bucket: str = PREDICTOR_BUCKET):
        self.nc = nc
        self.slot = slot
        self.bucket = bucket
        self.version = 0
        self.counts = {"installed": 0, "refused": 0, "stale": 0, "malformed": 0}
        self._sub: Subscription | None = None
        # Start-up and announcements both install: one at a time, and never an older model
        # after a newer one.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        # Subscribe before reading the store: an announcement made in between is then seen
        # (and one seen twice is stale), never lost.
        self._sub = await self.nc.subscribe(PREDICTOR_UPDATED, cb=self._on_msg)
        newest = await fetch_newest(self.nc, self.bucket)
        if newest is not None:
            await self.offer(*newest)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except NatsError as exc:  # a closed connection: nothing left to stop
                log.debug("predictor_unsubscribe_failed", error=repr(exc))

    async def _on_msg(self, msg: Msg) -> None:
        try:
            ann = decode(PredictorUpdated, msg.data)
        except WispError as err:
            self.counts["malformed"] += 1
            log.warning("bad_predictor_announcement", reason=err.message)
            return
        try:
            await self.offer(ann)
        except Exception:  # a bug here must not end the subscription's task
            self.counts["refused"] += 1
            log.exception("predictor_update_failed", version=ann.version)

    async def offer(self, ann: PredictorUpdated, data: bytes | None = None) -> bool:
        """Install the model `ann` announces (its bytes fetched unless given) if it is newer
        than the installed one; True when it now serves."""
        async with self._lock:
            if ann.version <= self.version:
                self.counts["stale"] += 1
                log.debug("predictor_announcement_stale", version=ann.version,
                          installed=self.version)
                return False
            keeps = self.slot.version or "fixed-k"
            if data is None:
                try:
                    data = await fetch(self.nc, ann, self.bucket)
                except PredictorStoreError as err:
                    self.counts["refused"] += 1
                    log.warning("predictor_update_refused", version=ann.version,
                                error=str(err), keeps=keeps)
                    return False
            elif hashlib.sha256(data).hexdigest() != ann.sha256:
                self.counts["refused"] += 1
                log.warning("predictor_update_refused", version=ann.version, keeps=keeps,
                            error="bytes are not the announced sha256")
                return False
            # Loading runs onnxruntime's graph checks: off the event loop.
            source = f"nats:{self.bucket}/{ann.object_name}"
            if not await asyncio.to_thread(self.slot.install, data, source):
                self.counts["refused"] += 1  # the slot logged why and what it keeps
                return False
            self.version = ann.version
            self.counts["installed"] += 1
            return True
