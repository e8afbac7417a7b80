"""A real engram cluster for the Python suites: `engram up` on free ports in a temporary
directory, with its own Redis, the real local model and API keys switched on.

The binary is the checkout's release build (`target/release/engram`, built by scripts/test) or
`$ENGRAM_BIN`. Keys: `WRITE_KEY` (tenant acme, role write), `READ_KEY` (tenant acme, role read)
and `OTHER_KEY` (tenant globex, role write), and `SLOW_KEY` (tenant acme, role write, one call a
second: its second call in a row is rate-limited). The chat model is `ChatModel`, a local
OpenAI-compatible HTTP server (an outside API cannot run here) that streams `ANSWER`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGRAM = Path(os.environ.get("ENGRAM_BIN", ROOT / "target" / "release" / "engram"))
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30

WRITE_KEY = "engram-test-write-key-acme"
READ_KEY = "engram-test-read-key-acme"
OTHER_KEY = "engram-test-write-key-globex"
SLOW_KEY = "engram-test-slow-key-acme"
ANSWER = ["Your cat ", "is called ", "Miso."]


def _keys_toml() -> str:
    entries = [
        ("acme-write", "acme", "write", WRITE_KEY),
        ("acme-read", "acme", "read", READ_KEY),
        ("globex-write", "globex", "write", OTHER_KEY),
    ]
    keys = "".join(
        f'[[keys]]\nname = "{name}"\ntenant = "{tenant}"\nrole = "{role}"\n'
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n\n'
        for name, tenant, role, key in entries
    )
    slow = hashlib.sha256(SLOW_KEY.encode()).hexdigest()
    return keys + (
        f'[[keys]]\nname = "acme-slow"\ntenant = "acme"\nrole = "write"\nsha256 = "{slow}"\n'
        "rate = 1\nburst = 1\n"
    )


class ChatModel(BaseHTTPRequestHandler):
    """POST /v1/chat/completions with stream=true: ANSWER in chunks, then usage and [DONE]."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        ChatModel.requests.append(body)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunks = [{"choices": [{"delta": {"content": piece}}]} for piece in ANSWER]
        chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": 3}})
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Cluster:
    gateway: str
    # The MCP server `engram up` runs (ENGRAM_MCP_LISTEN), streamable HTTP.
    mcp_url: str
    admin: dict[str, str]
    env: dict[str, str]
    directory: Path
    process: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def metrics(self, service: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin[service]}/metrics", timeout=5) as r:
            return r.read().decode()


def _ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    if not ENGRAM.is_file():
        pytest.fail(f"{ENGRAM} is missing: build it first (cargo build --release --workspace)")
    directory = tmp_path_factory.mktemp("engram")
    chat = ThreadingHTTPServer(("127.0.0.1", 0), ChatModel)
    threading.Thread(target=chat.serve_forever, daemon=True).start()
    ports = free_ports(10)
    services = ["gateway", "retrieval", "ingestion", "embedding"]
    # Only what is set here: a developer's own ENGRAM_* settings must not change the cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_") or k == "ENGRAM_MODEL_DIR"}
    admin = {}
    for i, service in enumerate(services):
        env[f"ENGRAM_{service.upper()}_LISTEN"] = f"127.0.0.1:{ports[2 * i]}"
        admin[service] = f"127.0.0.1:{ports[2 * i + 1]}"
        env[f"ENGRAM_{service.upper()}_ADMIN_LISTEN"] = admin[service]
    env["ENGRAM_REDIS_PORT"] = str(ports[8])
    env["ENGRAM_MCP_LISTEN"] = f"127.0.0.1:{ports[9]}"
    env["ENGRAM_API_KEYS"] = _keys_toml()
    env["ENGRAM_CHAT_BASE_URL"] = f"http://127.0.0.1:{chat.server_address[1]}/v1"
    env["ENGRAM_LOG"] = "warn"
    # Relative ./data, as the README's run command uses it, inside the temporary directory.
    process = subprocess.Popen(
        [str(ENGRAM), "up"],
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    running = Cluster(
        gateway=env["ENGRAM_GATEWAY_LISTEN"],
        mcp_url=f"http://{env['ENGRAM_MCP_LISTEN']}/mcp",
        admin=admin,
        env=env,
        directory=directory,
        process=process,
    )

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            running.log.append(line.rstrip())

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(_ready(a) for a in admin.values()):
        if process.poll() is not None:
            pytest.fail("engram up exited early:\n" + "\n".join(running.log[-40:]))
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("engram up did not get ready:\n" + "\n".join(running.log[-40:]))
        time.sleep(0.2)
    yield running
    chat.shutdown()
    os.killpg(process.pid, signal.SIGTERM)
    try:
        code = process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("engram up did not stop on SIGTERM")
    assert code == 0, "engram up exited with %d:\n%s" % (code, "\n".join(running.log[-40:]))
