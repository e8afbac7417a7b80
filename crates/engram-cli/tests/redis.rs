//! The local Redis of `engram up` on a port where a Redis is already running: one left behind
//! for the same directory is shut down cleanly and replaced, with its data; one serving
//! anything else is refused with a message that says what to do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use engram_cli::redis::{Persistence, RedisProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` started the way an older `engram up` left one: not our child, no
/// parent-death signal, append-only persistence in `dir`.
async fn stray_redis(dir: &Path, port: u16) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "yes", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    until(|| async { send(port, "PING").await.as_deref() == Some("+PONG") }).await;
    child
}

/// Poll `ready` until it holds; a test failure if that takes over a minute.
async fn until<F, Fut>(mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polled = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while !ready().await {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    polled.await.expect("the condition never held");
}

/// One inline command; the first line of the reply.
async fn send(port: u16, command: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("{command}\r\n").as_bytes())
        .await
        .ok()?;
    let mut reply = vec![0u8; 256];
    let n = stream.read(&mut reply).await.ok()?;
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    reply.lines().next().map(str::to_string)
}

#[tokio::test]
async fn a_redis_left_running_for_the_same_directory_is_taken_over_with_its_data() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("redis");
    let port = free_port();
    let mut stray = stray_redis(&dir, port).await;
    assert_eq!(send(port, "SET kept yes").await.as_deref(), Some("+OK"));

    let mut redis = RedisProcess::start(&dir, Some(port), Persistence::AppendOnly)
        .await
        .expect("taking over the stray Redis");
    // The stray one was shut down (it wrote its append-only file first) ...
    let exited = tokio::task::spawn_blocking(move || stray.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exited.success(),
        "the stray Redis was not shut down cleanly: {exited}"
    );
    // ... and the new one serves its data.
    assert_eq!(send(port, "GET kept").await.as_deref(), Some("$3"));
    redis.stop().await;
}

#[tokio::test]
async fn a_redis_of_another_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut other = stray_redis(&data.path().join("someone-else"), port).await;

    let refused = RedisProcess::start(&data.path().join("redis"), Some(port), Persistence::None)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains(&format!("port {port} is already in use"))
            && refused.contains("ENGRAM_REDIS_URL"),
        "{refused}"
    );
    // It was left alone.
    assert_eq!(send(port, "PING").await.as_deref(), Some("+PONG"));
    other.kill().unwrap();
    let _ = other.wait();
}

#[tokio::test]
async fn the_redis_of_a_killed_parent_stops_with_it() {
    // `engram up`, SIGKILLed once its Redis answers (before the cluster is even up).
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut parent = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(["up", "--redis-port", &port.to_string(), "--log", "warn"])
        .args(["--data-dir"])
        .arg(data.path())
        .args([
            "--gateway-listen",
            "127.0.0.1:0",
            "--gateway-admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--retrieval-listen",
            "127.0.0.1:0",
            "--retrieval-admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--ingestion-listen",
            "127.0.0.1:0",
            "--ingestion-admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--embedding-listen",
            "127.0.0.1:0",
            "--embedding-admin-listen",
            "127.0.0.1:0",
        ])
        .env_remove("ENGRAM_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until(|| async { send(port, "PING").await.as_deref() == Some("+PONG") }).await;
    parent.kill().unwrap();
    let _ = parent.wait();
    // The kernel sends the orphan SIGTERM; it writes its files and exits.
    until(|| async { send(port, "PING").await.is_none() }).await;
}
