//! `engram up` as a user runs it: a real process, stopped with SIGTERM while requests are in
//! flight. They must complete, and the process must exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use engram_proto::v1 as pb;
use engram_proto::v1::memory_service_client::MemoryServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

struct Banner {
    gateway: SocketAddr,
    gateway_admin: SocketAddr,
}

/// Read `engram up`'s stderr until its banner, then keep draining it in the background.
fn read_banner(stderr: std::process::ChildStderr) -> Banner {
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let mut gateway = None;
    for line in lines.by_ref() {
        let line = line.expect("reading engram up's output");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"gateway") && fields.len() == 3 {
            let admin = fields[2].trim_start_matches("http://");
            gateway = Some(Banner {
                gateway: fields[1].parse().expect("gateway address"),
                gateway_admin: admin.parse().expect("gateway admin address"),
            });
        }
        let done = line.starts_with("Ctrl-C stops the cluster");
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    gateway.unwrap_or_else(|| panic!("no banner from engram up:\n{}", seen.join("\n")))
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin port");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    response
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
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_engram"))
        .arg("up")
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--gateway-listen",
            LOOPBACK_ANY_PORT,
            "--gateway-admin-listen",
            LOOPBACK_ANY_PORT,
        ])
        .args([
            "--retrieval-listen",
            LOOPBACK_ANY_PORT,
            "--retrieval-admin-listen",
            LOOPBACK_ANY_PORT,
        ])
        .args([
            "--ingestion-listen",
            LOOPBACK_ANY_PORT,
            "--ingestion-admin-listen",
            LOOPBACK_ANY_PORT,
        ])
        .args([
            "--embedding-listen",
            LOOPBACK_ANY_PORT,
            "--embedding-admin-listen",
            LOOPBACK_ANY_PORT,
        ])
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting engram up");
    let stderr = child.stderr.take().expect("stderr");
    let banner = tokio::task::spawn_blocking(move || read_banner(stderr))
        .await
        .unwrap();

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
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

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
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "engram up exited with {status}");

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
}
