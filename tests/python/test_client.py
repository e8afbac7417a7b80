"""engram_client against a running cluster: the synchronous Client, then the AsyncClient."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from conftest import ANSWER, OTHER_KEY, READ_KEY, SLOW_KEY, WRITE_KEY, free_ports

from engram_client import (
    AsyncClient,
    Client,
    ContextEvent,
    Delta,
    Done,
    EngramError,
    Filter,
    Kind,
    MemoryInput,
    RetryPolicy,
    WriteStatus,
)


def user() -> str:
    """A user of its own for each test, so tests do not see each other's memories."""
    return f"user-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(cluster):
    with Client(cluster.gateway, api_key=WRITE_KEY) as c:
        yield c


def test_the_readme_example(client):
    alice = user()
    written = client.remember(
        alice, ["I adopted a cat named Miso", "I work night shifts as a nurse"], wait=True
    )
    assert [r.status for r in written.results] == [WriteStatus.CREATED, WriteStatus.CREATED]
    assert written.write_token

    hits = client.recall(alice, "what pet do I have", top_k=5)
    assert [h.memory.text for h in hits] == [
        "I adopted a cat named Miso",
        "I work night shifts as a nurse",
    ]
    assert hits[0].score > hits[1].score
    assert 0 <= hits[1].relevance < hits[0].relevance <= 1
    assert hits[0].memory.id == written.ids[0]
    assert hits[0].memory.kind == Kind.FACT
    assert hits[0].memory.scope.user_id == alice
    assert hits.timings.total_us > 0


def test_a_write_is_readable_with_its_token(client):
    alice = user()
    written = client.remember(alice, MemoryInput("I moved to Lisbon", kind="message", role="user"))
    nowhere = str(uuid.uuid4())
    found = client.get(written.ids + [nowhere], after_write_token=written.write_token)
    assert [m.text for m in found.memories] == ["I moved to Lisbon"]
    assert found.memories[0].kind == Kind.MESSAGE and found.memories[0].role == "user"
    assert found.missing_ids == (nowhere,)
    hits = client.recall(alice, "where do I live", after_write_token=written.write_token)
    assert hits[0].memory.text == "I moved to Lisbon"


def test_recall_explains_and_filters(client):
    alice = user()
    client.remember(
        alice,
        [
            MemoryInput("I play the cello", tags=["music"]),
            MemoryInput("I play tennis on Sundays", tags=["sport"]),
        ],
        wait=True,
    )
    hits = client.recall(alice, "what do I play", explain=True, filter=Filter(tags_any=["sport"]))
    assert [h.memory.text for h in hits] == ["I play tennis on Sundays"]
    assert hits[0].explanation is not None and hits[0].explanation.keyword_rank == 1
    keyword = client.recall(alice, "cello", mode="keyword")
    assert [h.memory.text for h in keyword] == ["I play the cello"]


def test_an_idempotency_key_makes_a_repeat_a_duplicate(client):
    alice = user()
    memory = MemoryInput("I was born in Porto", idempotency_key="born-1")
    first = client.remember(alice, [memory], wait=True)
    again = client.remember(alice, [memory], wait=True)
    assert again.results[0].status == WriteStatus.DUPLICATE
    assert again.ids == first.ids


def test_list_walks_every_page_in_time_order(client):
    alice = user()
    texts = [f"note number {i}" for i in range(7)]
    written = client.remember(alice, texts, wait=True)
    pages = list(client.pages(alice, page_size=3))
    assert [len(p.memories) for p in pages] == [3, 3, 1]
    assert pages[-1].next_page_token == ""
    listed = list(client.list(alice, page_size=3))
    assert [m.text for m in listed] == texts
    assert [m.id for m in listed] == written.ids


def test_update_changes_the_text_and_recall_finds_the_new_one(client):
    alice = user()
    written = client.remember(alice, ["My favourite colour is green"], wait=True)
    updated = client.update(written.ids[0], text="My favourite colour is purple", tags=["x"],
                            wait=True)
    assert updated.memory.text == "My favourite colour is purple"
    assert updated.memory.tags == ("x",)
    hits = client.recall(alice, "favourite colour purple", mode="keyword")
    assert [h.memory.text for h in hits] == ["My favourite colour is purple"]
    with pytest.raises(ValueError, match="at least one"):
        client.update(written.ids[0])


def test_forget_by_id_and_by_scope(client):
    alice = user()
    written = client.remember(alice, ["one thing", "another thing", "a third thing"], wait=True)
    gone = client.forget(written.ids[0])
    assert gone.forgotten == 1
    assert client.get(written.ids[0], after_write_token=gone.write_token).missing_ids == (
        written.ids[0],
    )
    scope = client.forget(user=alice)
    assert scope.forgotten == 2
    # The erasure receipt: the memories, and the vectors cached for their texts.
    assert scope.receipt.memories == 2 and scope.receipt.facts == 0
    assert scope.receipt.cached_embeddings >= 2
    assert list(client.list(alice, after_write_token=scope.write_token)) == []
    with pytest.raises(ValueError, match="either ids"):
        client.forget()


def test_build_context_packs_memories_and_the_session(client):
    alice = user()
    client.remember(alice, ["I adopted a cat named Miso"], wait=True)
    client.remember(
        alice,
        [MemoryInput("Should I get a second cat?", kind="message", role="user")],
        session="s1",
        wait=True,
    )
    context = client.build_context(alice, "what pet do I have", session="s1", token_budget=200)
    assert "## Relevant memories" in context.context
    assert "I adopted a cat named Miso" in str(context)
    assert [t.text for t in context.turns] == ["Should I get a second cat?"]
    assert 0 < context.token_count <= 200
    assert context.tokenizer


def test_converse_streams_the_answer_after_the_context(client):
    alice = user()
    client.remember(alice, ["I adopted a cat named Miso"], wait=True)
    events = list(client.converse(alice, "chat-1", "what is my cat called?"))
    assert isinstance(events[0], ContextEvent)
    assert [h.memory.text for h in events[0].memories] == ["I adopted a cat named Miso"]
    assert [e.text for e in events if isinstance(e, Delta)] == ANSWER
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.usage.completion_tokens == 3 and done.usage.reported_by_model


def test_a_refused_request_names_the_code_and_the_field(client):
    with pytest.raises(EngramError) as refused:
        client.recall(user(), "anything", top_k=0)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.field == "top_k"
    assert "top_k" in str(refused.value)

    with pytest.raises(EngramError) as empty:
        client.remember(user(), ["fine", ""])
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert empty.value.field == "memories[1].text"

    with pytest.raises(ValueError, match="SearchMode"):
        client.recall(user(), "anything", mode="fuzzy")


def test_keys_roles_and_tenants(cluster):
    alice = user()
    with Client(cluster.gateway, api_key=WRITE_KEY) as writer:
        writer.remember(alice, ["acme's secret plan"], wait=True)
    with Client(cluster.gateway, api_key=READ_KEY) as reader:
        assert [h.memory.text for h in reader.recall(alice, "secret plan")] == [
            "acme's secret plan"
        ]
        with pytest.raises(EngramError) as denied:
            reader.remember(alice, ["not allowed"])
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    with Client(cluster.gateway, api_key=OTHER_KEY) as other:
        assert len(other.recall(alice, "secret plan")) == 0
    for key in (None, "not-a-key"):
        with Client(cluster.gateway, api_key=key) as stranger:
            with pytest.raises(EngramError) as refused:
                stranger.recall(alice, "secret plan")
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert WRITE_KEY not in repr(Client(cluster.gateway, api_key=WRITE_KEY))


def test_a_rate_limited_call_is_retried_after_the_servers_delay(cluster):
    alice = user()
    with Client(cluster.gateway, api_key=SLOW_KEY, retry=RetryPolicy(attempts=1)) as once:
        once.recall(alice, "first call takes the only token")
        with pytest.raises(EngramError) as limited:
            once.recall(alice, "second call in the same second")
        assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert limited.value.retry_after is not None and limited.value.retry_after > 0
    with Client(cluster.gateway, api_key=SLOW_KEY, retry=RetryPolicy(attempts=5)) as patient:
        patient.recall(alice, "takes the token")
        patient.recall(alice, "waits for the next one and succeeds")


def test_an_unreachable_server_is_unavailable_after_the_retries():
    (port,) = free_ports(1)
    with Client(f"127.0.0.1:{port}", timeout=5, retry=RetryPolicy(attempts=2)) as nowhere:
        with pytest.raises(EngramError) as down:
            nowhere.get(["x"])
    assert down.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_async_client(cluster):
    async def session() -> None:
        alice = user()
        async with AsyncClient(cluster.gateway, api_key=WRITE_KEY) as client:
            written = await client.remember(
                alice, ["I adopted a cat named Miso", "I work night shifts as a nurse"], wait=True
            )
            hits = await client.recall(alice, "what pet do I have", top_k=5)
            assert hits[0].memory.text == "I adopted a cat named Miso"
            assert hits[0].memory.id == written.ids[0]
            assert [m.text async for m in client.list(alice, page_size=1)] == [
                "I adopted a cat named Miso",
                "I work night shifts as a nurse",
            ]
            found = await client.get(written.ids)
            assert len(found.memories) == 2
            updated = await client.update(written.ids[1], importance=0.9)
            assert updated.memory.importance == pytest.approx(0.9)
            context = await client.build_context(alice, "pet")
            assert "Miso" in context.context
            # Ephemeral: the turn is not remembered, so the Forget below counts only the two.
            events = [e async for e in client.converse(alice, "chat-2", "my cat?", ephemeral=True)]
            assert isinstance(events[0], ContextEvent) and isinstance(events[-1], Done)
            with pytest.raises(EngramError) as refused:
                await client.recall(alice, "", top_k=3)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.field == "query"
            assert (await client.forget(user=alice)).forgotten == 2

    asyncio.run(session())
