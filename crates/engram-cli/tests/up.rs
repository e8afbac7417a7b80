//! `engram up` as a user runs it: a real process in a working directory of its own, with the
//! README's default `./data`. Stopped with SIGTERM while requests are in flight, they complete
//! and it exits 0; killed with SIGKILL, it starts again on the same directory with every
//! acknowledged write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use engram_proto::v1 as pb;
use engram_proto::v1::memory_service_client::MemoryServiceClient;

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

struct Banner {
    gateway: SocketAddr,
    gateway_admin: SocketAddr,
    data: Option<String>,
}

/// Read `engram up`'s stderr until its banner, then keep draining it in the background.
fn read_banner(stderr: std::process::ChildStderr) -> Banner {
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let mut gateway = None;
    let mut data = None;
    for line in lines.by_ref() {
        let line = line.expect("reading engram up's output");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"gateway") && fields.len() == 3 {
            let admin = fields[2].trim_start_matches("http://");
            gateway = Some((
                fields[1].parse().expect("gateway address"),
                admin.parse().expect("gateway admin address"),
            ));
        }
        if fields.first() == Some(&"data") && fields.len() == 2 {
            data = Some(fields[1].to_string());
        }
        let done = line.starts_with("Ctrl-C stops the cluster");
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (gateway, gateway_admin) =
        gateway.unwrap_or_else(|| panic!("no banner from engram up:\n{}", seen.join("\n")));
    Banner {
        gateway,
        gateway_admin,
        data,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `engram up` in `cwd` with no `--data-dir` (so `./data` there), every service on a free
/// port, and neither ENGRAM_DATA_DIR nor ENGRAM_REDIS_URL from this environment.
fn up_command(cwd: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_engram"));
    command.current_dir(cwd).arg("up");
    for service in ["gateway", "retrieval", "ingestion", "embedding"] {
        command
            .arg(format!("--{service}-listen"))
            .arg(LOOPBACK_ANY_PORT)
            .arg(format!("--{service}-admin-listen"))
            .arg(LOOPBACK_ANY_PORT);
    }
    command
        .env_remove("ENGRAM_DATA_DIR")
        .env_remove("ENGRAM_REDIS_URL");
    command
}

/// Ask `child` to stop, as an operator or Kubernetes would (SIGTERM).
fn sigterm(child: &std::process::Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Wait for `child` to exit and expect exit code 0.
async fn exits_zero(mut child: std::process::Child) {
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "engram up exited with {status}");
}

/// [`up_command`] with its Redis on `redis_port`; returns once the banner says it serves.
async fn engram_up(cwd: &std::path::Path, redis_port: u16) -> (std::process::Child, Banner) {
    let mut child = up_command(cwd)
        .args(["--redis-port", &redis_port.to_string(), "--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting engram up");
    let stderr = child.stderr.take().expect("stderr");
    let banner = tokio::task::spawn_blocking(move || read_banner(stderr))
        .await
        .unwrap();
    (child, banner)
}

async fn port_is_free(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    engram_telemetry::admin::fetch(addr, path, Duration::from_secs(10))
        .await
        .expect("admin port")
        .1
}

/// `grpc_server_started_total` of one method, from the gateway's metrics.
async fn started(admin: SocketAddr, method: &str) -> u64 {
    let metrics = http_get(admin, "/metrics").await;
    metrics
        .lines()
        .find(|l| {
            l.starts_with("grpc_server_started_total")
                && l.contains(&format!("grpc_method=\"{method}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let cwd = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let (child, banner) = engram_up(cwd.path(), redis_port).await;
    // The relative default was resolved once, against the working directory.
    let data = std::fs::canonicalize(cwd.path()).unwrap().join("data");
    assert_eq!(banner.data.as_deref(), data.to_str());
    assert!(data.join("redis").is_dir() && data.join("index").is_dir());

    let client = MemoryServiceClient::connect(format!("http://{}", banner.gateway))
        .await
        .unwrap();
    const REQUESTS: u64 = 3;
    const PER_REQUEST: usize = 200;
    let in_flight: Vec<_> = (0..REQUESTS)
        .map(|r| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let memories = (0..PER_REQUEST)
                    .map(|i| pb::MemoryInput {
                        text: format!("request {r} memory {i}: a sentence long enough to take the model a moment"),
                        ..Default::default()
                    })
                    .collect();
                client
                    .remember(pb::RememberRequest {
                        scope: Some(pb::Scope { user_id: format!("user-{r}"), ..Default::default() }),
                        memories,
                        mode: pb::WriteMode::Sync.into(),
                        extract: false,
                        privacy: 0,
                    })
                    .await
            })
        })
        .collect();

    // Signal only once the gateway has all of them in hand.
    while started(banner.gateway_admin, "Remember").await < REQUESTS {
        tokio::task::yield_now().await;
    }
    sigterm(&child);

    for request in in_flight {
        let response = request
            .await
            .unwrap()
            .expect("an in-flight request failed during the drain");
        let results = response.into_inner().results;
        assert_eq!(results.len(), PER_REQUEST);
        assert!(
            results
                .iter()
                .all(|r| r.status() == pb::WriteStatus::Created)
        );
    }
    exits_zero(child).await;

    // The drained process left a consistent store behind.
    assert!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(banner.gateway)
        )
        .await
        .map_or(true, |connected| connected.is_err()),
        "the gateway still accepts connections after exiting"
    );
    // Its Redis stopped with it.
    assert!(
        port_is_free(redis_port).await,
        "engram up left its Redis running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_it_starts_again_on_the_same_directory_with_every_acknowledged_write() {
    let cwd = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let (mut child, banner) = engram_up(cwd.path(), redis_port).await;
    let mut client = MemoryServiceClient::connect(format!("http://{}", banner.gateway))
        .await
        .unwrap();
    // Acknowledged writes of both kinds: indexed before the answer, and only logged.
    let mut acknowledged = Vec::new();
    for (user, mode) in [
        ("sync", pb::WriteMode::Sync),
        ("async", pb::WriteMode::Async),
    ] {
        for batch in 0..3 {
            let memories = (0..20)
                .map(|i| pb::MemoryInput {
                    text: format!("{user} batch {batch} memory {i} about the garden"),
                    ..Default::default()
                })
                .collect();
            let response = client
                .remember(pb::RememberRequest {
                    scope: Some(pb::Scope {
                        user_id: user.into(),
                        ..Default::default()
                    }),
                    memories,
                    mode: mode.into(),
                    extract: false,
                    privacy: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let ids: Vec<String> = response.results.into_iter().map(|r| r.id).collect();
            acknowledged.push((ids, response.write_token));
        }
    }
    drop(client);

    // SIGKILL engram up alone (not its process group), as the OOM killer would.
    child.kill().unwrap();
    let _ = child.wait();

    let (child, banner) = engram_up(cwd.path(), redis_port).await;
    let mut client = MemoryServiceClient::connect(format!("http://{}", banner.gateway))
        .await
        .unwrap();
    for (ids, write_token) in &acknowledged {
        let found = client
            .get(pb::GetRequest {
                ids: ids.clone(),
                after_write_token: write_token.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .memories;
        let found: Vec<&str> = found.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(found, *ids, "acknowledged writes missing after the restart");
    }
    drop(client);
    sigterm(&child);
    exits_zero(child).await;
    assert!(
        port_is_free(redis_port).await,
        "engram up left its Redis running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engram_up_on_the_same_directory_is_refused_and_the_first_serves_on() {
    let cwd = tempfile::tempdir().unwrap();
    let redis_port = free_port();
    let (first, banner) = engram_up(cwd.path(), redis_port).await;
    let mut client = MemoryServiceClient::connect(format!("http://{}", banner.gateway))
        .await
        .unwrap();
    let remembered = client
        .remember(pb::RememberRequest {
            scope: Some(pb::Scope {
                user_id: "first".into(),
                ..Default::default()
            }),
            memories: vec![pb::MemoryInput {
                text: "the first one keeps serving".into(),
                ..Default::default()
            }],
            mode: pb::WriteMode::Sync.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Same directory, its own ports: refused before it touches the Redis or the index.
    let refused = up_command(cwd.path())
        .args(["--redis-port", &redis_port.to_string()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("another engram up serves"), "{said}");

    let found = client
        .get(pb::GetRequest {
            ids: vec![remembered.results[0].id.clone()],
            after_write_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .memories;
    assert_eq!(found.len(), 1);
    drop(client);
    sigterm(&first);
    exits_zero(first).await;
}

#[test]
fn a_password_in_the_redis_url_is_never_printed() {
    let cwd = tempfile::tempdir().unwrap();
    let secret_url = "redis://:hunter2@127.0.0.1:notaport/0";
    let help = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(["up", "--help"])
        .env("ENGRAM_REDIS_URL", secret_url)
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("ENGRAM_REDIS_URL"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");

    // A URL the Redis client refuses: the error names the setting and shows the URL redacted.
    let failed = up_command(cwd.path())
        .env("ENGRAM_REDIS_URL", secret_url)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(printed.contains("ENGRAM_REDIS_URL"), "{printed}");
    assert!(printed.contains("\"redis://***\""), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}
