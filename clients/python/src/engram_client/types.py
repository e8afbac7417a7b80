"""The values the client takes and returns: plain frozen dataclasses over the generated messages.

Enums accept their names in any case (``mode="keyword"``) as well as members; timestamps are
timezone-aware ``datetime`` values (naive ones are taken as UTC); durations are seconds or
``timedelta``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping, Sequence, Union

from google.protobuf import duration_pb2, timestamp_pb2

from ._proto import memory_pb2 as pb


class _Named(enum.Enum):
    """An enum whose members can also be given by name, in any case."""

    @classmethod
    def of(cls, value: "_Named | str | None"):
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        names = ", ".join(m.name.lower() for m in cls)
        raise ValueError(f"{value!r} is not a {cls.__name__} (one of {names})")


class Kind(_Named):
    FACT = pb.KIND_FACT
    MESSAGE = pb.KIND_MESSAGE
    DOCUMENT = pb.KIND_DOCUMENT


class SearchMode(_Named):
    HYBRID = pb.SEARCH_MODE_HYBRID
    SEMANTIC = pb.SEARCH_MODE_SEMANTIC
    KEYWORD = pb.SEARCH_MODE_KEYWORD


class Privacy(_Named):
    """A stricter privacy mode than the tenant's for one request (never a weaker one)."""

    OFF = pb.PRIVACY_MODE_OFF
    REDACT = pb.PRIVACY_MODE_REDACT
    BLOCK = pb.PRIVACY_MODE_BLOCK


class WriteStatus(_Named):
    UNSPECIFIED = pb.WRITE_STATUS_UNSPECIFIED
    CREATED = pb.WRITE_STATUS_CREATED
    DUPLICATE = pb.WRITE_STATUS_DUPLICATE
    REJECTED = pb.WRITE_STATUS_REJECTED


class MemoryState(_Named):
    UNSPECIFIED = pb.MEMORY_STATE_UNSPECIFIED
    PENDING = pb.MEMORY_STATE_PENDING
    INDEXED = pb.MEMORY_STATE_INDEXED


def _enum(cls, number: int):
    try:
        return cls(number)
    except ValueError:  # a value added to the API after this client was built
        return number


# --- time ---------------------------------------------------------------------------------


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(timezone.utc))
    return out


def duration(value: "float | timedelta") -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    if isinstance(value, timedelta):
        out.FromTimedelta(value)
    else:
        out.FromNanoseconds(int(value * 1e9))
    return out


def _time(message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    return getattr(message, name).ToDatetime(tzinfo=timezone.utc)


# --- what goes in -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Who memories belong to. On reads an empty agent or session matches any."""

    user_id: str
    agent_id: str = ""
    session_id: str = ""

    def to_proto(self) -> pb.Scope:
        return pb.Scope(user_id=self.user_id, agent_id=self.agent_id, session_id=self.session_id)

    @classmethod
    def from_proto(cls, message: pb.Scope) -> "Scope":
        return cls(message.user_id, message.agent_id, message.session_id)


@dataclass(frozen=True)
class MemoryInput:
    """One memory to remember; a plain string is a FACT with defaults."""

    text: str
    kind: "Kind | str | None" = None
    role: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()
    event_time: datetime | None = None
    importance: float = 0.0
    # A retried write with the same key in the same scope is a DUPLICATE. The client generates
    # one when it is empty, so that its own retries never store a memory twice.
    idempotency_key: str = ""

    def to_proto(self, idempotency_key: str) -> pb.MemoryInput:
        kind = Kind.of(self.kind)
        message = pb.MemoryInput(
            text=self.text,
            kind=kind.value if kind else pb.KIND_UNSPECIFIED,
            role=self.role,
            metadata=dict(self.metadata),
            tags=list(self.tags),
            importance=self.importance,
            idempotency_key=self.idempotency_key or idempotency_key,
        )
        if self.event_time is not None:
            message.event_time.CopyFrom(timestamp(self.event_time))
        return message


@dataclass(frozen=True)
class Filter:
    """Restricts Recall and List; every field that is set must match."""

    kinds: Sequence["Kind | str"] = ()
    tags_any: Sequence[str] = ()
    tags_all: Sequence[str] = ()
    entities_any: Sequence[str] = ()
    event_after: datetime | None = None  # inclusive
    event_before: datetime | None = None  # exclusive
    metadata_equals: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> pb.Filter:
        message = pb.Filter(
            kinds=[Kind.of(k).value for k in self.kinds],
            tags_any=list(self.tags_any),
            tags_all=list(self.tags_all),
            entities_any=list(self.entities_any),
            metadata_equals=dict(self.metadata_equals),
        )
        if self.event_after is not None:
            message.event_after.CopyFrom(timestamp(self.event_after))
        if self.event_before is not None:
            message.event_before.CopyFrom(timestamp(self.event_before))
        return message


MemoryLike = Union[str, MemoryInput]


# --- what comes back ----------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    id: str
    scope: Scope
    kind: "Kind | int"
    role: str
    text: str
    metadata: Mapping[str, str]
    tags: Sequence[str]
    entities: Sequence[str]
    created_at: datetime | None
    event_time: datetime | None
    importance: float
    content_hash: str
    state: "MemoryState | int"
    updated_at: datetime | None

    @classmethod
    def from_proto(cls, m: pb.Memory) -> "Memory":
        return cls(
            id=m.id,
            scope=Scope.from_proto(m.scope),
            kind=_enum(Kind, m.kind),
            role=m.role,
            text=m.text,
            metadata=dict(m.metadata),
            tags=tuple(m.tags),
            entities=tuple(m.entities),
            created_at=_time(m, "created_at"),
            event_time=_time(m, "event_time"),
            importance=m.importance,
            content_hash=m.content_hash,
            state=_enum(MemoryState, m.state),
            updated_at=_time(m, "updated_at"),
        )


@dataclass(frozen=True)
class WriteResult:
    id: str
    status: "WriteStatus | int"
    reason: str


@dataclass(frozen=True)
class RememberResult:
    """One result per input, in input order, and the token for read-your-writes."""

    results: Sequence[WriteResult]
    write_token: str

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.results]

    @classmethod
    def from_proto(cls, m: pb.RememberResponse) -> "RememberResult":
        results = tuple(WriteResult(r.id, _enum(WriteStatus, r.status), r.reason) for r in m.results)
        return cls(results, m.write_token)


@dataclass(frozen=True)
class Explanation:
    """How a hit was scored (``explain=True``): each strategy's 1-based rank (0: not returned)
    and raw score, the fused score and the recency and importance factors."""

    dense_rank: int
    dense_score: float
    keyword_rank: int
    keyword_score: float
    fused_score: float
    recency_factor: float
    importance_factor: float
    temporal_rank: int
    temporal_score: float
    entity_rank: int
    entity_score: float

    @classmethod
    def from_proto(cls, m: pb.Explanation) -> "Explanation":
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Hit:
    memory: Memory
    # Orders the hits of one query; not comparable across queries.
    score: float
    # How likely the memory is to be what the query asks about, 0..1, comparable across queries.
    relevance: float
    explanation: Explanation | None

    @classmethod
    def from_proto(cls, m: pb.Hit) -> "Hit":
        explanation = Explanation.from_proto(m.explanation) if m.HasField("explanation") else None
        return cls(Memory.from_proto(m.memory), m.score, m.relevance, explanation)


def _hits(hits) -> tuple[Hit, ...]:
    return tuple(Hit.from_proto(h) for h in hits)


def _memories(memories) -> tuple[Memory, ...]:
    return tuple(Memory.from_proto(m) for m in memories)


@dataclass(frozen=True)
class Timings:
    """Where a Recall's time went, in microseconds."""

    embed_us: int
    dense_us: int
    keyword_us: int
    fusion_us: int
    total_us: int
    cache_us: int

    @classmethod
    def from_proto(cls, m: pb.Timings) -> "Timings":
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RecallResult(Sequence[Hit]):
    """The hits, most relevant first; iterate or index it like a list of hits."""

    hits: tuple[Hit, ...]
    cache_hit: bool
    timings: Timings

    def __getitem__(self, index):  # type: ignore[override]
        return self.hits[index]

    def __len__(self) -> int:
        return len(self.hits)

    @classmethod
    def from_proto(cls, m: pb.RecallResponse) -> "RecallResult":
        return cls(_hits(m.hits), m.cache_hit, Timings.from_proto(m.timings))


@dataclass(frozen=True)
class GetResult:
    """Found memories in request order, and the ids that do not exist."""

    memories: tuple[Memory, ...]
    missing_ids: tuple[str, ...]

    @classmethod
    def from_proto(cls, m: pb.GetResponse) -> "GetResult":
        return cls(_memories(m.memories), tuple(m.missing_ids))


@dataclass(frozen=True)
class Page:
    memories: tuple[Memory, ...]
    # Empty on the last page.
    next_page_token: str

    @classmethod
    def from_proto(cls, m: pb.ListResponse) -> "Page":
        return cls(_memories(m.memories), m.next_page_token)


@dataclass(frozen=True)
class UpdateResult:
    memory: Memory
    write_token: str

    @classmethod
    def from_proto(cls, m: pb.UpdateResponse) -> "UpdateResult":
        return cls(Memory.from_proto(m.memory), m.write_token)


@dataclass(frozen=True)
class ErasureReceipt:
    """What a Forget removed: index points (extracted facts among them), cached embeddings,
    cached recent-turn lists, write-log keys and cached Recall results."""

    memories: int
    facts: int
    cached_embeddings: int
    history_lists: int
    log_keys: int
    cached_results: int

    @classmethod
    def from_proto(cls, m: pb.ErasureReceipt) -> "ErasureReceipt":
        return cls(
            m.memories,
            m.facts,
            m.cached_embeddings,
            m.history_lists,
            m.log_keys,
            m.cached_results,
        )


@dataclass(frozen=True)
class ForgetResult:
    forgotten: int
    write_token: str
    receipt: ErasureReceipt

    @classmethod
    def from_proto(cls, m: pb.ForgetResponse) -> "ForgetResult":
        return cls(m.forgotten, m.write_token, ErasureReceipt.from_proto(m.receipt))


@dataclass(frozen=True)
class Context:
    """A prompt's context: the text laid out by the server, and what it holds."""

    context: str
    memories: tuple[Hit, ...]
    turns: tuple[Memory, ...]
    token_count: int
    tokenizer: str
    dropped: int

    def __str__(self) -> str:
        return self.context

    @classmethod
    def from_proto(cls, m: pb.BuildContextResponse) -> "Context":
        return cls(
            m.context, _hits(m.memories), _memories(m.turns), m.token_count, m.tokenizer, m.dropped
        )


# --- Converse events ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConverseTimings:
    privacy_us: int
    recall_us: int
    history_us: int
    context_us: int
    first_token_us: int
    total_us: int

    @classmethod
    def from_proto(cls, m: pb.ConverseTimings) -> "ConverseTimings":
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reported_by_model: bool


@dataclass(frozen=True)
class ContextEvent:
    """Sent once, before the model's first token."""

    memories: tuple[Hit, ...]
    turns: tuple[Memory, ...]
    context_tokens: int
    redacted: tuple[str, ...]


@dataclass(frozen=True)
class Delta:
    """The next piece of the answer."""

    text: str


@dataclass(frozen=True)
class Done:
    usage: Usage
    timings: ConverseTimings
    model: str
    finish_reason: str


@dataclass(frozen=True)
class Fallback:
    """The model could not answer (or stopped); the context is still here."""

    reason: str
    code: str
    context: str
    memories: tuple[Hit, ...]
    partial: bool
    timings: ConverseTimings


ConverseEvent = Union[ContextEvent, Delta, Done, Fallback]


def converse_event(m: pb.ConverseEvent) -> ConverseEvent | None:
    """The event in a stream message; None for an event kind newer than this client."""
    which = m.WhichOneof("event")
    if which == "context":
        c = m.context
        return ContextEvent(_hits(c.memories), _memories(c.turns), c.context_tokens, tuple(c.redacted))
    if which == "delta":
        return Delta(m.delta.text)
    if which == "done":
        d = m.done
        usage = Usage(d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.reported_by_model)
        return Done(usage, ConverseTimings.from_proto(d.timings), d.model, d.finish_reason)
    if which == "fallback":
        f = m.fallback
        return Fallback(
            f.reason, f.code, f.context, _hits(f.memories), f.partial,
            ConverseTimings.from_proto(f.timings),
        )
    return None
