"""Requests built from the client's arguments, shared by the synchronous and asyncio clients.

A plan is what one unary call needs: the method, the request, how to turn the response into
the client's types, and whether the call may be retried.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

from google.protobuf import field_mask_pb2

from ._proto import memory_pb2 as pb
from .types import (
    Context,
    Filter,
    ForgetResult,
    GetResult,
    Kind,
    MemoryInput,
    MemoryLike,
    Page,
    Privacy,
    RecallResult,
    RememberResult,
    Scope,
    SearchMode,
    UpdateResult,
    duration,
    timestamp,
)


@dataclass(frozen=True)
class Plan:
    # The MemoryService method, e.g. "Remember".
    method: str
    request: Any
    convert: Callable[[Any], Any]
    # Reads, and Remember, whose every memory carries an idempotency key. Update and Forget are
    # not retried: a repeat after a lost answer could undo a later Update, or remove memories
    # written since the first Forget of a scope.
    retry: bool = True


def scope(user: "str | Scope", agent: str = "", session: str = "") -> pb.Scope:
    if isinstance(user, Scope):
        if agent or session:
            raise ValueError("give either a Scope or agent/session, not both")
        return user.to_proto()
    return pb.Scope(user_id=user, agent_id=agent, session_id=session)


def _strings(values: "str | Iterable[str]", name: str) -> list[str]:
    # A lone string is one value, not a sequence of characters.
    if isinstance(values, str):
        return [values]
    out = list(values)
    if not all(isinstance(v, str) for v in out):
        raise TypeError(f"{name} must be strings")
    return out


def _write_mode(wait: bool) -> int:
    # wait=True: acknowledged once indexed and searchable (SYNC); else the server's default.
    return pb.WRITE_MODE_SYNC if wait else pb.WRITE_MODE_UNSPECIFIED


def _privacy(privacy: "Privacy | str | None") -> int:
    value = Privacy.of(privacy)
    return value.value if value else pb.PRIVACY_MODE_UNSPECIFIED


def remember(
    user: "str | Scope",
    memories: "MemoryLike | Sequence[MemoryLike]",
    *,
    agent: str = "",
    session: str = "",
    wait: bool = False,
    extract: bool = False,
    privacy: "Privacy | str | None" = None,
) -> Plan:
    if isinstance(memories, (str, MemoryInput)):
        memories = [memories]
    inputs = []
    for m in memories:
        if isinstance(m, str):
            m = MemoryInput(m)
        elif not isinstance(m, MemoryInput):
            raise TypeError(f"a memory is a str or a MemoryInput, not {type(m).__name__}")
        inputs.append(m.to_proto(idempotency_key=str(uuid.uuid4())))
    request = pb.RememberRequest(
        scope=scope(user, agent, session),
        memories=inputs,
        mode=_write_mode(wait),
        extract=extract,
        privacy=_privacy(privacy),
    )
    return Plan("Remember", request, RememberResult.from_proto)


def recall(
    user: "str | Scope",
    query: str,
    *,
    top_k: int = 10,
    mode: "SearchMode | str | None" = None,
    agent: str = "",
    session: str = "",
    filter: Filter | None = None,
    min_score: float | None = None,
    recency_half_life: "float | timedelta | None" = None,
    explain: bool = False,
    after_write_token: str = "",
    bypass_cache: bool = False,
    request_time: datetime | None = None,
) -> Plan:
    search = SearchMode.of(mode)
    request = pb.RecallRequest(
        scope=scope(user, agent, session),
        query=query,
        top_k=top_k,
        mode=search.value if search else pb.SEARCH_MODE_UNSPECIFIED,
        explain=explain,
        after_write_token=after_write_token,
        bypass_cache=bypass_cache,
    )
    if filter is not None:
        request.filter.CopyFrom(filter.to_proto())
    if min_score is not None:
        request.min_score = min_score
    if recency_half_life is not None:
        request.recency_half_life.CopyFrom(duration(recency_half_life))
    if request_time is not None:
        request.request_time.CopyFrom(timestamp(request_time))
    return Plan("Recall", request, RecallResult.from_proto)


def get(ids: "str | Iterable[str]", *, after_write_token: str = "") -> Plan:
    request = pb.GetRequest(ids=_strings(ids, "ids"), after_write_token=after_write_token)
    return Plan("Get", request, GetResult.from_proto)


def list_page(
    user: "str | Scope",
    *,
    agent: str = "",
    session: str = "",
    filter: Filter | None = None,
    page_size: int = 0,
    page_token: str = "",
    after_write_token: str = "",
) -> Plan:
    request = pb.ListRequest(
        scope=scope(user, agent, session),
        page_size=page_size,
        page_token=page_token,
        after_write_token=after_write_token,
    )
    if filter is not None:
        request.filter.CopyFrom(filter.to_proto())
    return Plan("List", request, Page.from_proto)


def update(
    id: str,
    *,
    text: str | None = None,
    kind: "Kind | str | None" = None,
    role: str | None = None,
    metadata: Mapping[str, str] | None = None,
    tags: Sequence[str] | None = None,
    event_time: datetime | None = None,
    importance: float | None = None,
    wait: bool = False,
) -> Plan:
    given = {
        "text": text,
        "kind": kind,
        "role": role,
        "metadata": metadata,
        "tags": tags,
        "event_time": event_time,
        "importance": importance,
    }
    paths = [name for name, value in given.items() if value is not None]
    if not paths:
        raise ValueError("update needs at least one of: " + ", ".join(given))
    memory = MemoryInput(
        text=text or "",
        kind=kind,
        role=role or "",
        metadata=metadata or {},
        tags=_strings(tags, "tags") if tags is not None else (),
        event_time=event_time,
        importance=importance or 0.0,
    ).to_proto(idempotency_key="")
    request = pb.UpdateRequest(
        id=id,
        memory=memory,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        mode=_write_mode(wait),
    )
    return Plan("Update", request, UpdateResult.from_proto, retry=False)


def forget(
    ids: "str | Iterable[str] | None" = None,
    *,
    user: "str | Scope | None" = None,
    agent: str = "",
    session: str = "",
) -> Plan:
    if (ids is None) == (user is None):
        raise ValueError(
            "forget takes either ids, or user= (with optional agent=/session=) to remove a whole "
            "scope"
        )
    if ids is not None:
        request = pb.ForgetRequest(ids=pb.MemoryIds(ids=_strings(ids, "ids")))
    else:
        request = pb.ForgetRequest(scope=scope(user, agent, session))  # type: ignore[arg-type]
    return Plan("Forget", request, ForgetResult.from_proto, retry=False)


def build_context(
    user: "str | Scope",
    query: str,
    *,
    agent: str = "",
    session: str = "",
    token_budget: int = 0,
    max_memories: int = 0,
    max_turns: int = 0,
    request_time: datetime | None = None,
) -> Plan:
    request = pb.BuildContextRequest(
        scope=scope(user, agent, session),
        query=query,
        token_budget=token_budget,
        max_memories=max_memories,
        max_turns=max_turns,
    )
    if request_time is not None:
        request.request_time.CopyFrom(timestamp(request_time))
    return Plan("BuildContext", request, Context.from_proto)


def converse(
    user: "str | Scope",
    session: str,
    message: str,
    *,
    agent: str = "",
    token_budget: int = 0,
    system_prompt: str = "",
    privacy: "Privacy | str | None" = None,
    max_tokens: int = 0,
    extract: bool = False,
    ephemeral: bool = False,
    request_time: datetime | None = None,
) -> pb.ConverseRequest:
    if isinstance(user, Scope):
        user, agent, session = user.user_id, agent or user.agent_id, session or user.session_id
    request = pb.ConverseRequest(
        scope=scope(user, agent, session),
        message=message,
        token_budget=token_budget,
        system_prompt=system_prompt,
        privacy=_privacy(privacy),
        max_tokens=max_tokens,
        extract=extract,
        ephemeral=ephemeral,
    )
    if request_time is not None:
        request.request_time.CopyFrom(timestamp(request_time))
    return request
