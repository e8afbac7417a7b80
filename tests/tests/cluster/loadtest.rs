//! `engram bench`'s runner against a server whose behaviour is known: counts, status codes
//! and percentiles; every config in `loadtest/ghz/` accepted unchanged; and a stall at a fixed
//! rate charged to every request that waited for it (no coordinated omission).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use engram_cli::loadtest::{self, CallData, Config, Method, Plan, Stop};
use engram_proto::tonic::{Request, Response, Status};
use engram_proto::v1 as pb;
use engram_proto::v1::memory_service_server::{MemoryService, MemoryServiceServer};
use engram_tests::Extra;

/// A MemoryService that answers Recall after `delay`, refuses every `refuse_every`-th call
/// with RESOURCE_EXHAUSTED, and stalls for `stall` on call number `stall_at`.
struct Scripted {
    calls: AtomicU64,
    delay: Duration,
    refuse_every: u64,
    stall_at: u64,
    stall: Duration,
}

impl Scripted {
    async fn behave(&self) -> Result<(), Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let wait = if n == self.stall_at {
            self.stall
        } else {
            self.delay
        };
        tokio::time::sleep(wait).await;
        if self.refuse_every > 0 && n.is_multiple_of(self.refuse_every) {
            return Err(Status::resource_exhausted("scripted refusal"));
        }
        Ok(())
    }
}

#[async_trait]
impl MemoryService for Scripted {
    async fn remember(
        &self,
        _: Request<pb::RememberRequest>,
    ) -> Result<Response<pb::RememberResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }
    async fn recall(
        &self,
        _: Request<pb::RecallRequest>,
    ) -> Result<Response<pb::RecallResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }
    async fn update(
        &self,
        _: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }
    async fn forget(
        &self,
        _: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }

    async fn build_context(
        &self,
        _: Request<pb::BuildContextRequest>,
    ) -> Result<Response<pb::BuildContextResponse>, Status> {
        self.behave()
            .await
            .map(|()| Response::new(Default::default()))
    }
}

async fn scripted(delay: Duration, refuse_every: u64, stall_at: u64, stall: Duration) -> Extra {
    let service = Scripted {
        calls: AtomicU64::new(0),
        delay,
        refuse_every,
        stall_at,
        stall,
    };
    Extra::start(|listeners, shutdown| async move {
        let runtime = engram_runtime::server::ServiceRuntime::start("scripted", listeners.admin);
        let routes = engram_proto::tonic::service::Routes::new(MemoryServiceServer::new(service));
        runtime
            .serve(
                routes,
                &[],
                listeners.grpc,
                // A stand-in for a public gateway: no cluster credential to check.
                &engram_runtime::config::CommonArgs {
                    cluster_secret: None,
                    ..engram_runtime::config::CommonArgs::for_test()
                },
                shutdown,
            )
            .await
    })
    .await
}

fn plan(host: String, stop: Stop, concurrency: usize, rps: Option<f64>) -> Plan {
    Plan {
        call: "engram.v1.MemoryService.Recall".into(),
        host,
        stop,
        concurrency,
        connections: 1,
        rps,
        timeout: Some(Duration::from_secs(10)),
        data: vec![
            serde_json::json!({"scope": {"userId": "u"}, "query": "q {{.RequestNumber}}", "topK": 5}),
        ],
        metadata: Default::default(),
        name: None,
    }
}

#[tokio::test]
async fn the_report_has_the_counts_codes_and_percentiles_of_a_known_server() {
    let delay = Duration::from_millis(20);
    let server = scripted(delay, 4, 0, Duration::ZERO).await;
    let plan = plan(server.addr.to_string(), Stop::Total(40), 4, None);
    let method = Method::resolve(&plan.call, &plan.metadata).unwrap();
    let report = loadtest::run(&plan, &method, |_| {}).await.unwrap();

    assert_eq!(report.count, 40);
    assert_eq!(report.status_code_distribution.get("OK"), Some(&30));
    assert_eq!(
        report.status_code_distribution.get("ResourceExhausted"),
        Some(&10)
    );
    assert_eq!(
        report
            .error_distribution
            .get("rpc error: code = ResourceExhausted desc = scripted refusal"),
        Some(&10)
    );
    // No answer can come sooner than the server's delay; the distribution is ordered.
    let p = |q| report.percentile(q).unwrap();
    assert!(p(10) >= delay, "{:?}", p(10));
    assert!(Duration::from_nanos(report.fastest) >= delay);
    assert!(p(10) <= p(50) && p(50) <= p(90) && p(90) <= p(99));
    assert!(p(99) <= Duration::from_nanos(report.slowest));
    let in_histogram: u64 = report.histogram.iter().map(|b| b.count).sum();
    assert_eq!(in_histogram, 30, "the histogram holds the successful calls");
    // ghz's report shape.
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "count",
        "total",
        "average",
        "fastest",
        "slowest",
        "rps",
        "latencyDistribution",
        "statusCodeDistribution",
        "errorDistribution",
        "histogram",
        "date",
        "options",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert_eq!(json["latencyDistribution"][2]["percentage"], 50);
    server.stop().await;
}

#[tokio::test]
async fn at_a_fixed_rate_a_stall_shows_in_the_p99() {
    // One worker at 100 requests/s; the server stalls for a second on its 20th call. The
    // ~100 requests due during the stall are measured from when they were due.
    let server = scripted(Duration::from_millis(1), 0, 20, Duration::from_secs(1)).await;
    let plan = plan(server.addr.to_string(), Stop::Total(200), 1, Some(100.0));
    let method = Method::resolve(&plan.call, &plan.metadata).unwrap();
    let report = loadtest::run(&plan, &method, |_| {}).await.unwrap();
    assert_eq!(report.count, 200);
    let p99 = report.percentile(99).unwrap();
    assert!(
        p99 >= Duration::from_millis(500),
        "p99 {p99:?} hides the stall"
    );
    assert!(report.percentile(90).unwrap() >= Duration::from_millis(100));
    server.stop().await;
}

#[test]
fn every_ghz_config_in_loadtest_is_accepted_unchanged() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/ghz");
    let mut configs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") || name.ends_with("-data.json") {
            continue;
        }
        configs += 1;
        let (config, base) = Config::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let plan = config
            .plan(&base, None, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let method =
            Method::resolve(&plan.call, &plan.metadata).unwrap_or_else(|e| panic!("{name}: {e}"));
        for template in &plan.data {
            let sample = loadtest::render(
                template,
                &CallData {
                    request_number: 1,
                    worker_id: 1,
                    unix_nanos: 1,
                },
            );
            method
                .encode(&sample)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    assert!(configs >= 5, "{configs} configs in {}", dir.display());
}
