"""engram's MCP server driven by the official Python MCP client (`mcp` from PyPI): over stdio
(`engram mcp`, as an agent launches it) and over streamable HTTP (the server `engram up` runs
with ENGRAM_MCP_LISTEN), against the running cluster."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx2
from conftest import ENGRAM, OTHER_KEY, READ_KEY, WRITE_KEY
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

TOOLS = {"remember", "recall", "build_context", "list", "forget"}


def user() -> str:
    return f"mcp-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def over_stdio(cluster, *args: str, key: str | None = WRITE_KEY):
    env = {"ENGRAM_LOG": "warn"}
    if key:
        env["ENGRAM_API_KEY"] = key
    server = StdioServerParameters(
        command=str(ENGRAM),
        args=["mcp", "--addr", f"http://{cluster.gateway}", *args],
        env=env,
    )
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            yield session


@contextlib.asynccontextmanager
async def over_http(cluster, key: str | None = WRITE_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(cluster.mcp_url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                yield session


def text(result) -> str:
    return "\n".join(block.text for block in result.content if hasattr(block, "text"))


async def call(session, tool: str, **arguments):
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {text(result)}"
    return result


async def refused(session, tool: str, **arguments) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool} should have been refused: {text(result)}"
    return text(result)


async def a_session_of_memory(session, alice: str | None) -> None:
    """What an agent does: remember, recall finds it, build the context, list, forget."""
    who = {"user": alice} if alice else {}
    remembered = await call(session, "remember", text="I adopted a cat named Miso", **who)
    [result] = remembered.structured_content["results"]
    assert result["status"] == "created"
    await call(session, "remember", text="I work night shifts as a nurse", tags=["work"], **who)

    found = await call(session, "recall", query="what pet do I have", top_k=2, **who)
    hits = found.structured_content["hits"]
    assert [h["memory"]["text"] for h in hits][0] == "I adopted a cat named Miso"
    assert hits[0]["memory"]["id"] == result["id"]
    assert 0 <= hits[1]["relevance"] < hits[0]["relevance"] <= 1
    work = await call(session, "recall", query="job", tags_any=["work"], **who)
    assert [h["memory"]["text"] for h in work.structured_content["hits"]] == [
        "I work night shifts as a nurse"
    ]

    context = await call(session, "build_context", query="what pet do I have", **who)
    assert "## Relevant memories" in text(context)
    assert "I adopted a cat named Miso" in text(context)

    listed = await call(session, "list", page_size=1, **who)
    assert len(listed.structured_content["memories"]) == 1
    token = listed.structured_content["next_page_token"]
    assert token
    second = await call(session, "list", page_size=1, page_token=token, **who)
    assert second.structured_content["memories"][0]["text"] == "I work night shifts as a nurse"

    message = await refused(session, "forget", **who)
    assert message.startswith("INVALID_ARGUMENT (ids)"), message
    gone = await call(session, "forget", ids=[result["id"]], **who)
    assert gone.structured_content["forgotten"] == 1
    after = await call(session, "recall", query="what pet do I have", mode="keyword", **who)
    assert "Miso" not in str(after.structured_content)
    everything = await call(session, "forget", all_in_scope=True, **who)
    assert everything.structured_content["forgotten"] == 1


def test_stdio_tools_schemas_and_a_session(cluster):
    async def run() -> None:
        alice = user()
        async with over_stdio(cluster, "--user", alice) as session:
            info = await session.initialize()
            assert info.server_info.name == "engram"
            assert "recall" in (info.instructions or "")
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == TOOLS
            recall = tools["recall"].input_schema
            assert recall["required"] == ["query"]
            assert "natural language" in recall["properties"]["query"]["description"]
            assert recall["$defs"]["ModeArg"]["enum"] == ["hybrid", "semantic", "keyword"]
            for tool in tools.values():
                assert tool.description and len(tool.description) > 40

            await a_session_of_memory(session, None)

            message = await refused(session, "recall", query="anything", top_k=0)
            assert message.startswith("INVALID_ARGUMENT (top_k)"), message
            message = await refused(session, "recall", query="anything", user="mallory")
            assert message.startswith("PERMISSION_DENIED (user)"), message
            # Fields are named as the tools' arguments are.
            message = await refused(session, "remember", text="")
            assert message.startswith("INVALID_ARGUMENT (text): "), message
            message = await refused(session, "recall", query="x", min_relevance=2.0)
            assert message.startswith("INVALID_ARGUMENT (min_relevance): "), message

            # Another user's memory cannot be forgotten by id through a server bound to alice.
            async with over_stdio(cluster, "--user", "bob") as bob:
                await bob.initialize()
                written = await call(bob, "remember", text="bob's own note")
                [result] = written.structured_content["results"]
            message = await refused(session, "forget", ids=[result["id"]])
            assert message.startswith("PERMISSION_DENIED (ids)"), message
            message = await refused(session, "forget", ids=[result["id"]], user="bob")
            assert message.startswith("PERMISSION_DENIED (user)"), message

    asyncio.run(run())


def test_stdio_without_a_user_takes_it_from_each_call(cluster):
    async def run() -> None:
        async with over_stdio(cluster) as session:
            await session.initialize()
            message = await refused(session, "recall", query="anything")
            assert message.startswith("INVALID_ARGUMENT (user)"), message
            await a_session_of_memory(session, user())

    asyncio.run(run())


def test_stdio_with_a_read_key_cannot_write(cluster):
    async def run() -> None:
        async with over_stdio(cluster, "--user", user(), key=READ_KEY) as session:
            await session.initialize()
            message = await refused(session, "remember", text="not allowed")
            assert message.startswith("PERMISSION_DENIED"), message
            await call(session, "recall", query="anything")

    asyncio.run(run())


def test_http_passes_the_bearer_token_on_as_the_engram_key(cluster):
    async def run() -> None:
        alice = user()
        async with over_http(cluster) as session:
            await session.initialize()
            assert {t.name for t in (await session.list_tools()).tools} == TOOLS
            await a_session_of_memory(session, alice)
            await call(session, "remember", text="acme's launch is in May", user=alice)

        # Another tenant's key sees nothing of acme's.
        async with over_http(cluster, key=OTHER_KEY) as session:
            await session.initialize()
            found = await call(session, "recall", query="launch", user=alice)
            assert found.structured_content["hits"] == []

        for key in (None, "not-a-key"):
            async with over_http(cluster, key=key) as session:
                await session.initialize()
                message = await refused(session, "recall", query="launch", user=alice)
                assert message.startswith("UNAUTHENTICATED"), message

        async with over_http(cluster, key=READ_KEY) as session:
            await session.initialize()
            message = await refused(session, "remember", text="no", user=alice)
            assert message.startswith("PERMISSION_DENIED"), message

    asyncio.run(run())


def test_http_refuses_browsers_foreign_hosts_and_oversized_bodies(cluster):
    async def run() -> None:
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        headers = {
            "Authorization": f"Bearer {WRITE_KEY}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        async with httpx2.AsyncClient(timeout=30) as http:
            # A web page's request (DNS rebinding, or a page on localhost).
            page = await http.post(
                cluster.mcp_url, json=ping, headers={**headers, "Origin": "http://evil.example"}
            )
            assert page.status_code == 403, page.text
            foreign = await http.post(
                cluster.mcp_url, json=ping, headers={**headers, "Host": "evil.example"}
            )
            assert foreign.status_code in (400, 403), foreign.text
            big = await http.post(
                cluster.mcp_url,
                content=b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "x": "'
                + b"a" * (2 << 20)
                + b'"}',
                headers=headers,
            )
            assert big.status_code == 413, big.status_code

    asyncio.run(run())
