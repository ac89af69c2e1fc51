"""Redis as the owner of session state (docs/architecture.md, "Redis keys").

`wisp:sess:{sid}` (hash) holds a session's record, `wisp:sess:{sid}:tokens` (list) its committed
tokens (prompt + accepted output). Rounds are committed by one Lua script that appends only if
the round's base length equals the stored committed length, so a retried or duplicated round can
never be applied twice, and a round from a stale view is refused rather than silently applied.
The last round's result is stored beside the tokens so that any verifier — including one that
took over from a dead one — answers a retry of that round with the same result.

The hash is the record's fields, one hash field each: ``spec`` (the session's `SessionSpec` as
JSON: mode, SLO, device, sampling, seed, k_max) and ``vocab`` (JSON), then ``prompt_len``, ``verifier_id``,
``committed_len``, ``last_round``, ``state``, ``created_ms``, ``last_round_ms`` as text and
``last_result`` as the msgpack of the last `VerifyResult`. The field list is the struct's own:
`SessionRecord.to_hash` and `from_hash` walk it, nothing here repeats it.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Literal

import msgspec
import redis.asyncio as aioredis

from common.protocol import SessionSpec, VocabInfo
from common.subjects import session_key, session_tokens_key

SESSION_TTL_S = 3600  # refreshed every round; an abandoned session expires by itself


# Both touch a session only while it exists: a plain HSET on an expired or closed-and-gone
# session would leave a stray hash without a TTL (and without the fields `load` needs).
# KEYS[1] = session hash; ARGV = field, value, field, value...
_SET_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# KEYS[1] = session hash, KEYS[2] = token list; ARGV[1] = seconds until the keys expire
_CLOSE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'closed')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""
CLOSED_TTL_S = 60  # clients may still read a closed session's output this long


class CommitStatus(IntEnum):
    MISMATCH = 0  # base length disagrees with Redis and it is not a replay
    APPLIED = 1
    REPLAYED = 2  # this (sid, round) was already applied; the stored result stands
    MISSING = 3  # no such session


# KEYS[1] = session hash, KEYS[2] = token list
# ARGV = round, base_len, finished (0/1), result blob, ttl_s, now_ms, token ids...
_COMMIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {3, 0} end
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed_len'))
local last_round = tonumber(redis.call('HGET', KEYS[1], 'last_round') or '-1')
local round = tonumber(ARGV[1])
if round == last_round then return {2, committed} end
if committed ~= tonumber(ARGV[2]) then return {0, committed} end
local n = #ARGV - 6
if n > 0 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 7, #ARGV)) end
committed = committed + n
redis.call('HSET', KEYS[1], 'committed_len', committed, 'last_round', round,
           'last_result', ARGV[4], 'last_round_ms', ARGV[6])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'state', 'finished') end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {1, committed}
"""


class SessionRecord(msgspec.Struct, kw_only=True):
    spec: SessionSpec
    prompt_len: int
    vocab: VocabInfo | None = None  # the opener's vocabulary: a verifier taking over must share it
    verifier_id: str = ""
    committed_len: int = 0
    last_round: int = -1
    state: Literal["active", "finished", "closed"] = "active"
    created_ms: float = 0.0
    last_round_ms: float = 0.0
    last_result: bytes = b""  # msgpack of the last VerifyResult, for idempotent retries
    tokens: list[int] = []  # committed tokens (the list key, not a hash field)

    @property
    def sid(self) -> str:
        return self.spec.sid

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def to_hash(self) -> dict[str, str | bytes]:
        out: dict[str, str | bytes] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "tokens":
                continue
            if name in _JSON_FIELDS:
                out[name] = msgspec.json.encode(value)
            else:
                out[name] = value if isinstance(value, bytes) else str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes], tokens: list[bytes]) -> SessionRecord:
        """The record of a hash as Redis returns it (bytes); ValueError if it is not one."""
        fields: dict[str, object] = {}
        for key, value in raw.items():
            name = key.decode()
            if name in _JSON_FIELDS:
                fields[name] = msgspec.json.decode(value)
            elif name == "last_result":
                fields[name] = value
            elif name in cls.__struct_fields__:
                fields[name] = value.decode()
        fields["tokens"] = [int(t) for t in tokens]
        try:
            return msgspec.convert(fields, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"not a session record: {exc}") from None


_JSON_FIELDS = ("spec", "vocab")  # structured fields, stored as JSON (readable in redis-cli)


def now_ms() -> float:
    return time.time() * 1e3


class SessionStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int = SESSION_TTL_S):
        self.redis = client
        self.ttl_s = ttl_s
        self._commit = client.register_script(_COMMIT_LUA)
        self._set_if_exists = client.register_script(_SET_IF_EXISTS_LUA)
        self._close = client.register_script(_CLOSE_LUA)

    async def create(self, record: SessionRecord) -> None:
        """Write a new session; its `tokens` must be the prompt."""
        record.created_ms = record.created_ms or now_ms()
        record.committed_len = len(record.tokens)
        hkey, tkey = session_key(record.sid), session_tokens_key(record.sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(hkey, tkey)
            pipe.hset(hkey, mapping=record.to_hash())
            if record.tokens:
                pipe.rpush(tkey, *record.tokens)
            pipe.expire(hkey, self.ttl_s)
            pipe.expire(tkey, self.ttl_s)
            await pipe.execute()

    async def load(self, sid: str) -> SessionRecord | None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(session_key(sid))
            pipe.lrange(session_tokens_key(sid), 0, -1)
            raw, tokens = await pipe.execute()
        if not raw:
            return None
        return SessionRecord.from_hash(raw, tokens)

    async def commit_round(self, sid: str, round_no: int, base_len: int, new_tokens: list[int],
                           result: bytes, finished: bool) -> tuple[CommitStatus, int]:
        """Append a round's tokens atomically. Returns (status, committed length in Redis)."""
        status, committed = await self._commit(
            keys=[session_key(sid), session_tokens_key(sid)],
            args=[round_no, base_len, int(finished), result, self.ttl_s, int(now_ms()),
                  *new_tokens])
        return CommitStatus(int(status)), int(committed)

    async def set_fields(self, sid: str, **fields: str | int | float) -> bool:
        """Update fields of an existing session; False (and nothing written) if it is gone."""
        args = [str(x) for pair in fields.items() for x in pair]
        return bool(await self._set_if_exists(keys=[session_key(sid)], args=args))

    async def close(self, sid: str) -> bool:
        """Mark closed and let the keys expire soon; False if there is no such session."""
        return bool(await self._close(keys=[session_key(sid), session_tokens_key(sid)],
                                      args=[CLOSED_TTL_S]))
