"""engram's synchronous ``Client`` and asyncio ``AsyncClient``.

Both take the same arguments and have the same methods, named as the RPCs are; the asyncio
client's methods are coroutines (``list`` and ``converse`` are async iterators).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

import grpc

from . import _plans
from ._plans import Plan
from ._proto import memory_pb2_grpc as rpc
from .errors import EngramError, from_rpc_error
from .types import ConverseEvent, Memory, Page, converse_event

# Worth another attempt: the server (or the way to it) was briefly unavailable, or it asked the
# client to slow down and said for how long.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE}
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_THROTTLED = {grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that failed transiently is retried, within its timeout.

    UNAVAILABLE is retried with exponential backoff and full jitter; RESOURCE_EXHAUSTED only
    when the server said how long to wait (a rate limit), after that long. Reads and Remember
    are retried (a retried Remember whose first attempt was stored answers DUPLICATE with the
    stored id); Update, Forget and Converse never are.
    """

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0

    def delay(self, attempt: int, error: EngramError) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``; None: give up."""
        if attempt >= self.attempts:
            return None
        if error.code in _THROTTLED and error.retry_after is not None:
            return error.retry_after
        if error.code in _TRANSIENT:
            return random.uniform(0, min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))
        return None


class _Methods:
    """The calls, shared by both clients: each builds its plan and hands it to ``_run``."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        """Connect to an engram gateway at ``target`` (``host:port``).

        ``api_key`` is sent as ``authorization: Bearer <key>``; ``timeout`` is each call's
        deadline in seconds, retries included; ``credentials`` (``grpc.ssl_channel_credentials()``)
        switch to TLS.
        """
        self._target = target
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout
        self._retry = retry
        self._credentials = credentials
        # The gateway answers up to 64 MiB (a List page of large memories); gRPC's default
        # receive limit is 4 MiB.
        self._options = [
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            *options,
        ]

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self._target!r})"

    def _run(self, plan: Plan, timeout: float | None):
        raise NotImplementedError

    def _delay(self, plan: Plan, attempt: int, error: EngramError, deadline: float) -> float | None:
        delay = self._retry.delay(attempt, error) if plan.retry else None
        if delay is None or time.monotonic() + delay >= deadline:
            return None
        return delay

    def remember(self, user, memories, *, agent="", session="", wait=False, extract=False,
                 privacy=None, timeout=None):
        """Store one memory or a list (texts or ``MemoryInput``) for a scope → ``RememberResult``.

        ``wait=True`` acknowledges only once the memories are searchable (a SYNC write); by
        default the write is acknowledged once durable. Inputs without an idempotency key get
        one, so a retried call never stores a memory twice (the retry answers DUPLICATE with
        the stored id).
        """
        plan = _plans.remember(user, memories, agent=agent, session=session, wait=wait,
                               extract=extract, privacy=privacy)
        return self._run(plan, timeout)

    def recall(self, user, query, *, top_k=10, mode=None, agent="", session="", filter=None,
               min_score=None, recency_half_life=None, explain=False, after_write_token="",
               bypass_cache=False, request_time=None, timeout=None):
        """The memories of a scope most relevant to ``query`` → ``RecallResult`` (a sequence of
        ``Hit``: ``.memory``, ``.score``, ``.relevance``)."""
        plan = _plans.recall(user, query, top_k=top_k, mode=mode, agent=agent, session=session,
                             filter=filter, min_score=min_score,
                             recency_half_life=recency_half_life, explain=explain,
                             after_write_token=after_write_token, bypass_cache=bypass_cache,
                             request_time=request_time)
        return self._run(plan, timeout)

    def get(self, ids, *, after_write_token="", timeout=None):
        """Memories by id → ``GetResult`` (``.memories`` in request order, ``.missing_ids``)."""
        return self._run(_plans.get(ids, after_write_token=after_write_token), timeout)

    def list_page(self, user, *, agent="", session="", filter=None, page_size=0, page_token="",
                  after_write_token="", timeout=None):
        """One page of a scope's memories, oldest first → ``Page``."""
        plan = _plans.list_page(user, agent=agent, session=session, filter=filter,
                                page_size=page_size, page_token=page_token,
                                after_write_token=after_write_token)
        return self._run(plan, timeout)

    def update(self, id, *, text=None, kind=None, role=None, metadata=None, tags=None,
               event_time=None, importance=None, wait=False, timeout=None):
        """Change the given fields of one memory → ``UpdateResult``; a new text is re-embedded.
        Not retried."""
        plan = _plans.update(id, text=text, kind=kind, role=role, metadata=metadata, tags=tags,
                             event_time=event_time, importance=importance, wait=wait)
        return self._run(plan, timeout)

    def forget(self, ids=None, *, user=None, agent="", session="", timeout=None):
        """Remove memories by id, or — with ``user=`` instead — every memory of that scope
        (empty agent/session match any) → ``ForgetResult`` (``.forgotten``). Not retried."""
        return self._run(_plans.forget(ids, user=user, agent=agent, session=session), timeout)

    def build_context(self, user, query, *, agent="", session="", token_budget=0,
                      max_memories=0, max_turns=0, request_time=None, timeout=None):
        """A prompt's context within a token budget → ``Context`` (``str()`` is the text)."""
        plan = _plans.build_context(user, query, agent=agent, session=session,
                                    token_budget=token_budget, max_memories=max_memories,
                                    max_turns=max_turns, request_time=request_time)
        return self._run(plan, timeout)


class Client(_Methods):
    """A synchronous engram client; thread-safe, one channel. Use it as a context manager or
    ``close()`` it."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, **kwargs):
        super().__init__(target, api_key, **kwargs)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(target, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(target, self._options)
        self._memory = rpc.MemoryServiceStub(self._channel)
        self._chat = rpc.ChatServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _run(self, plan: Plan, timeout: float | None):
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        call = getattr(self._memory, plan.method)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = call(plan.request, timeout=max(deadline - time.monotonic(), 0.001),
                                metadata=self._metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e, e.trailing_metadata())  # type: ignore[attr-defined]
                delay = self._delay(plan, attempt, error, deadline)
                if delay is None:
                    raise error from None
                time.sleep(delay)
                continue
            return plan.convert(response)

    def list(self, user, *, agent="", session="", filter=None, page_size=0,
             after_write_token="", timeout=None) -> Iterator[Memory]:
        """Every memory of a scope, oldest first, fetched a page at a time as you iterate."""
        for page in self.pages(user, agent=agent, session=session, filter=filter,
                               page_size=page_size, after_write_token=after_write_token,
                               timeout=timeout):
            yield from page.memories

    def pages(self, user, *, agent="", session="", filter=None, page_size=0,
              after_write_token="", timeout=None) -> Iterator[Page]:
        """The pages of ``list``, each fetched when the iteration reaches it."""
        token = ""
        while True:
            page = self.list_page(user, agent=agent, session=session, filter=filter,
                                  page_size=page_size, page_token=token,
                                  after_write_token=after_write_token, timeout=timeout)
            yield page
            if not page.next_page_token:
                return
            token = page.next_page_token

    def converse(self, user, session, message, *, timeout: float = 120.0,
                 **options) -> Iterator[ConverseEvent]:
        """Chat with memory: ``ContextEvent``, then ``Delta``s, then ``Done`` — or a
        ``Fallback`` carrying the context when the model fails. Not retried."""
        request = _plans.converse(user, session, message, **options)
        stream = self._chat.Converse(request, timeout=timeout, metadata=self._metadata)
        try:
            for message_ in stream:
                event = converse_event(message_)
                if event is not None:
                    yield event
        except grpc.RpcError as e:
            raise from_rpc_error(e, e.trailing_metadata()) from None  # type: ignore[attr-defined]
        finally:
            stream.cancel()


class AsyncClient(_Methods):
    """The asyncio engram client: the same methods as ``Client``, as coroutines. Use it with
    ``async with`` or ``await close()``."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, **kwargs):
        super().__init__(target, api_key, **kwargs)
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self._credentials, self._options)
        else:
            self._channel = grpc.aio.insecure_channel(target, self._options)
        self._memory = rpc.MemoryServiceStub(self._channel)
        self._chat = rpc.ChatServiceStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, plan: Plan, timeout: float | None):
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        call = getattr(self._memory, plan.method)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await call(plan.request,
                                      timeout=max(deadline - time.monotonic(), 0.001),
                                      metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e, e.trailing_metadata())
                delay = self._delay(plan, attempt, error, deadline)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
                continue
            return plan.convert(response)

    async def list(self, user, *, agent="", session="", filter=None, page_size=0,
                   after_write_token="", timeout=None) -> AsyncIterator[Memory]:
        """Every memory of a scope, oldest first, fetched a page at a time as you iterate."""
        async for page in self.pages(user, agent=agent, session=session, filter=filter,
                                     page_size=page_size, after_write_token=after_write_token,
                                     timeout=timeout):
            for memory in page.memories:
                yield memory

    async def pages(self, user, *, agent="", session="", filter=None, page_size=0,
                    after_write_token="", timeout=None) -> AsyncIterator[Page]:
        """The pages of ``list``, each fetched when the iteration reaches it."""
        token = ""
        while True:
            page = await self.list_page(user, agent=agent, session=session, filter=filter,
                                        page_size=page_size, page_token=token,
                                        after_write_token=after_write_token, timeout=timeout)
            yield page
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def converse(self, user, session, message, *, timeout: float = 120.0,
                       **options) -> AsyncIterator[ConverseEvent]:
        """Chat with memory, as ``Client.converse``: an async iterator of events."""
        request = _plans.converse(user, session, message, **options)
        stream = self._chat.Converse(request, timeout=timeout, metadata=self._metadata)
        try:
            async for message_ in stream:
                event = converse_event(message_)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, e.trailing_metadata()) from None
        finally:
            stream.cancel()
