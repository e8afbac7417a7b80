"""engram-client: Python access to engram's public gRPC API.

    from engram_client import Client

    with Client("127.0.0.1:50051") as client:
        client.remember("alice", ["I adopted a cat named Miso"], wait=True)
        for hit in client.recall("alice", "what pet do I have", top_k=5):
            print(f"{hit.score:.3f}  {hit.memory.text}")

``AsyncClient`` has the same methods as coroutines. Failures raise ``EngramError`` with the
gRPC ``code`` and the request ``field`` the server named.
"""

from .client import AsyncClient, Client, RetryPolicy
from .errors import EngramError, FieldViolation
from .types import (
    Context,
    ContextEvent,
    ConverseEvent,
    Delta,
    Done,
    ErasureReceipt,
    Explanation,
    Fallback,
    Filter,
    ForgetResult,
    GetResult,
    Hit,
    Kind,
    Memory,
    MemoryInput,
    MemoryState,
    Page,
    Privacy,
    RecallResult,
    RememberResult,
    Scope,
    SearchMode,
    Timings,
    UpdateResult,
    WriteResult,
    WriteStatus,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Context",
    "ContextEvent",
    "ConverseEvent",
    "Delta",
    "Done",
    "EngramError",
    "ErasureReceipt",
    "Explanation",
    "Fallback",
    "FieldViolation",
    "Filter",
    "ForgetResult",
    "GetResult",
    "Hit",
    "Kind",
    "Memory",
    "MemoryInput",
    "MemoryState",
    "Page",
    "Privacy",
    "RecallResult",
    "RememberResult",
    "RetryPolicy",
    "Scope",
    "SearchMode",
    "Timings",
    "UpdateResult",
    "WriteResult",
    "WriteStatus",
]
