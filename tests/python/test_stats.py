"""`engram stats` against the running cluster: it reads the four admin ports while calls are
made, and reports them."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid

import grpc
from conftest import ENGRAM, WRITE_KEY, free_ports

from engram_client import Client, EngramError


def stats(cluster, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENGRAM), "stats", *args],
        env=env or cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_stats_reports_the_calls_made_during_its_interval(cluster):
    alice = f"stats-{uuid.uuid4().hex[:8]}"
    with Client(cluster.gateway, api_key=WRITE_KEY) as client:
        client.remember(alice, ["I adopted a cat named Miso"], wait=True)
        stop = threading.Event()
        unexpected: list[str] = []

        def load() -> None:
            while not stop.is_set():
                client.recall(alice, "what pet do I have")
                try:
                    client.recall(alice, "what pet do I have", top_k=0)
                    unexpected.append("top_k=0 was accepted")
                except EngramError as e:
                    if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                        unexpected.append(str(e))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            done = stats(cluster, "--json", "--interval", "2s")
        finally:
            stop.set()
            worker.join()
    assert not unexpected, unexpected
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    recall = next(r for r in report["rpcs"] if r["method"] == "Recall")
    assert recall["rate"] > 0 and recall["total"] > 0
    # One call in two was refused.
    assert 0.3 < recall["error_rate"] < 0.7
    assert 0 < recall["p50"] <= recall["p95"] <= recall["p99"]
    remember = next(r for r in report["rpcs"] if r["method"] == "Remember")
    assert remember["total"] >= 1
    caches = {(c["service"], c["cache"]) for c in report["caches"]}
    assert {("retrieval", "recall"), ("embedding", "embeddings")} <= caches, caches
    result = next(c for c in report["caches"] if c["cache"] == "recall")
    # The same query again and again: answered from the cache.
    assert result["hit_rate"] is not None and result["hit_rate"] > 0.5
    assert report["write_log"] is not None
    for service in report["services"]:
        assert service["error"] is None, service
        assert service["rss_bytes"] > 10 * 1024 * 1024, service

    text = stats(cluster, "--interval", "500ms")
    assert text.returncode == 0, text.stderr
    assert "Recall" in text.stdout and "rss" in text.stdout, text.stdout


def test_stats_says_which_service_it_cannot_reach(cluster):
    env = dict(cluster.env)
    for service, port in zip(["GATEWAY", "RETRIEVAL", "INGESTION", "EMBEDDING"], free_ports(4)):
        env[f"ENGRAM_{service}_ADMIN_LISTEN"] = f"127.0.0.1:{port}"
    done = stats(cluster, "--interval", "100ms", env=env)
    assert done.returncode == 1
    assert done.stdout.count("unreachable") == 4, done.stdout
