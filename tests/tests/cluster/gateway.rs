//! The gateway's edge: API keys and tenant isolation, roles, key reload, rate limits, load
//! shedding, deadlines that cancel the work behind them, and balancing over retrieval replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use engram_domain::api::{
    ApplyOutcome, DuplicateMatch, GetQuery, GetResult, Index, IndexStats, IndexWrites, ListPage,
    ListQuery, RecallQuery, RecallResult,
};
use engram_domain::model::{Scope, TenantId};
use engram_gateway::{EdgeArgs, Role};
use engram_proto::tonic::{Code, Request, Status};
use engram_proto::v1 as pb;
use engram_tests::{Extra, Options, Sandbox, client_at, metric};

type Client = engram_cli::Client;

pub(crate) fn scope(user: &str) -> Option<pb::Scope> {
    Some(pb::Scope {
        user_id: user.to_string(),
        ..Default::default()
    })
}

/// A key for `tenant` with `role`, and its key file entry (with `extra` lines appended).
pub(crate) fn key(name: &str, tenant: &str, role: Role, extra: &str) -> (String, String) {
    let (key, entry) = engram_gateway::new_key(name, &TenantId::parse(tenant).unwrap(), role);
    (key, format!("{entry}{extra}\n"))
}

pub(crate) fn keys_edge(entries: &[&str]) -> EdgeArgs {
    EdgeArgs {
        auth: Some(engram_gateway::AuthMode::Keys),
        api_keys: Some(entries.concat()),
        ..EdgeArgs::default()
    }
}

async fn remember(client: &mut Client, user: &str, text: &str, tags: &[&str]) -> String {
    let response = client
        .remember(pb::RememberRequest {
            scope: scope(user),
            memories: vec![pb::MemoryInput {
                text: text.to_string(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            }],
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.results[0].status(),
        pb::WriteStatus::Created,
        "{response:?}"
    );
    response.results[0].id.clone()
}

fn recall_request(user: &str, query: &str) -> pb::RecallRequest {
    pb::RecallRequest {
        scope: scope(user),
        query: query.to_string(),
        top_k: 10,
        bypass_cache: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn one_tenant_s_key_never_reaches_another_tenant_s_memories() {
    let (key_a, entry_a) = key("a", "tenant-a", Role::Write, "");
    let (key_b, entry_b) = key("b", "tenant-b", Role::Write, "");
    let options = Options {
        edge: keys_edge(&[&entry_a, &entry_b]),
        ..Options::default()
    };
    let sandbox = Sandbox::start_with(None, options).await;
    let mut a = sandbox.client_with_key(Some(&key_a)).await;
    let mut b = sandbox.client_with_key(Some(&key_b)).await;

    // Both tenants have a user called alice; only B has this memory.
    let secret = "alice's locker code at the climbing gym is 4417";
    let b_id = remember(&mut b, "alice", secret, &["secret"]).await;
    remember(&mut a, "alice", "alice likes green tea", &[]).await;

    // Get with B's id.
    let got = a
        .get(pb::GetRequest {
            ids: vec![b_id.clone()],
            ..Default::default()
        })
        .await;
    match got {
        Ok(response) => assert!(response.into_inner().memories.is_empty()),
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
    }
    // List and Recall of the same user id, plain and with filters crafted to match B's data.
    let listed = a
        .list(pb::ListRequest {
            scope: scope("alice"),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.memories.iter().all(|m| m.text != secret),
        "{listed:?}"
    );
    let mut crafted = recall_request("alice", "locker code climbing gym");
    crafted.filter = Some(pb::Filter {
        tags_any: vec!["secret".into()],
        ..Default::default()
    });
    for request in [recall_request("alice", "locker code climbing gym"), crafted] {
        let hits = a.recall(request).await.unwrap().into_inner().hits;
        assert!(
            hits.iter().all(|h| h
                .memory
                .as_ref()
                .is_none_or(|m| m.text != secret && m.id != b_id)),
            "{hits:?}"
        );
    }
    // Update and Forget of B's id.
    let updated = a
        .update(pb::UpdateRequest {
            id: b_id.clone(),
            memory: Some(pb::MemoryInput {
                text: "overwritten by A".into(),
                ..Default::default()
            }),
            update_mask: Some(engram_proto::prost_types::FieldMask {
                paths: vec!["text".into()],
            }),
            mode: pb::WriteMode::Sync.into(),
        })
        .await;
    assert!(
        matches!(&updated, Err(s) if s.code() == Code::NotFound || s.code() == Code::PermissionDenied),
        "{updated:?}"
    );
    let forgotten = a
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: vec![b_id.clone()],
            })),
        })
        .await;
    if let Ok(response) = &forgotten {
        assert_eq!(response.get_ref().forgotten, 0, "{response:?}");
    }

    // B's memory is intact.
    let mine = b
        .get(pb::GetRequest {
            ids: vec![b_id],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.memories[0].text, secret);
    sandbox.stop().await;
}

#[tokio::test]
async fn keys_are_required_roles_are_enforced_and_a_revoked_key_stops_working_after_reload() {
    let (reader, reader_entry) = key("reader", "acme", Role::Read, "");
    let (writer, writer_entry) = key("writer", "acme", Role::Write, "");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    std::fs::write(&file, format!("{reader_entry}{writer_entry}")).unwrap();
    let options = Options {
        edge: EdgeArgs {
            auth: Some(engram_gateway::AuthMode::Keys),
            api_keys_file: Some(file.clone()),
            api_keys_reload: Duration::from_millis(50),
            ..EdgeArgs::default()
        },
        ..Options::default()
    };
    let sandbox = Sandbox::start_with(None, options).await;

    for key in [None, Some("egk_not_a_key")] {
        let refused = sandbox
            .client_with_key(key)
            .await
            .recall(recall_request("u", "anything"))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{key:?}: {refused:?}"
        );
    }

    let mut read_only = sandbox.client_with_key(Some(&reader)).await;
    read_only
        .recall(recall_request("u", "anything"))
        .await
        .unwrap();
    let refused = read_only
        .remember(pb::RememberRequest {
            scope: scope("u"),
            memories: vec![pb::MemoryInput {
                text: "x".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("read"), "{refused:?}");
    let refused = read_only
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Scope(pb::Scope {
                user_id: "u".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let mut writer_client = sandbox.client_with_key(Some(&writer)).await;
    remember(&mut writer_client, "u", "the writer can write", &[]).await;

    // Revoke the writer: rewrite the file without it. No restart.
    std::fs::write(&file, &reader_entry).unwrap();
    let mut revoked = false;
    for _ in 0..200 {
        match writer_client.recall(recall_request("u", "anything")).await {
            Err(status) if status.code() == Code::Unauthenticated => {
                revoked = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    assert!(
        revoked,
        "the revoked key still works after the file changed"
    );
    read_only
        .recall(recall_request("u", "anything"))
        .await
        .unwrap();
    sandbox.stop().await;
}

#[tokio::test]
async fn a_tenant_over_its_rate_is_refused_with_a_retry_hint_and_another_is_not() {
    let (slow, slow_entry) = key("slow", "slow-tenant", Role::Read, "rate = 1\nburst = 3");
    let (other, other_entry) = key("other", "other-tenant", Role::Read, "");
    let options = Options {
        edge: keys_edge(&[&slow_entry, &other_entry]),
        ..Options::default()
    };
    let sandbox = Sandbox::start_with(None, options).await;
    let mut limited = sandbox.client_with_key(Some(&slow)).await;
    let mut unaffected = sandbox.client_with_key(Some(&other)).await;

    let mut refusals = Vec::new();
    for _ in 0..10 {
        if let Err(status) = limited.list(list_request()).await {
            refusals.push(status);
        }
        unaffected.list(list_request()).await.unwrap();
    }
    // A burst of 3 at 1/s: of 10 quick calls, most are refused.
    assert!(refusals.len() >= 5, "{} refused", refusals.len());
    for status in &refusals {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("slow-tenant"), "{status:?}");
        let hint: u64 = status
            .metadata()
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no retry-after-ms: {status:?}"));
        assert!(hint > 0 && hint <= 1000, "{hint}");
    }
    sandbox.stop().await;
}

fn list_request() -> pb::ListRequest {
    pb::ListRequest {
        scope: scope("u"),
        page_size: 10,
        ..Default::default()
    }
}

/// The real retrieval, reached over gRPC, with every Recall slowed by `delay`; it counts the
/// searches running at once and those dropped before they finished (cancelled).
struct Slowed {
    inner: engram_runtime::rpc::IndexClient,
    delay: Duration,
    running: AtomicUsize,
    most_running: AtomicUsize,
    cancelled: AtomicUsize,
}

struct Running<'a> {
    index: &'a Slowed,
    finished: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.index.running.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.index.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl Index for Slowed {
    async fn search(
        &self,
        tenant: &TenantId,
        query: RecallQuery,
    ) -> engram_domain::Result<RecallResult> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        let mut running = Running {
            index: self,
            finished: false,
        };
        tokio::time::sleep(self.delay).await;
        let result = self.inner.search(tenant, query).await;
        running.finished = true;
        result
    }
    async fn get(&self, tenant: &TenantId, query: GetQuery) -> engram_domain::Result<GetResult> {
        self.inner.get(tenant, query).await
    }
    async fn list(&self, tenant: &TenantId, query: ListQuery) -> engram_domain::Result<ListPage> {
        self.inner.list(tenant, query).await
    }
    async fn apply(
        &self,
        tenant: &TenantId,
        writes: IndexWrites,
    ) -> engram_domain::Result<ApplyOutcome> {
        self.inner.apply(tenant, writes).await
    }
    async fn find_duplicates(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        content_hashes: Vec<String>,
        idempotency_keys: Vec<String>,
    ) -> engram_domain::Result<Vec<DuplicateMatch>> {
        self.inner
            .find_duplicates(tenant, scope, content_hashes, idempotency_keys)
            .await
    }
    async fn stats(&self, tenant: Option<&TenantId>) -> engram_domain::Result<IndexStats> {
        self.inner.stats(tenant).await
    }
}

/// Serve the sandbox's retrieval slowed by `delay`, like any engram service.
async fn slowed_retrieval(sandbox: &Sandbox, delay: Duration) -> (Arc<Slowed>, Extra) {
    let inner = sandbox.index();
    let slowed = Arc::new(Slowed {
        inner,
        delay,
        running: AtomicUsize::new(0),
        most_running: AtomicUsize::new(0),
        cancelled: AtomicUsize::new(0),
    });
    let index: Arc<dyn Index> = slowed.clone();
    let common = sandbox.common().clone();
    let extra = Extra::start(|listeners, shutdown| async move {
        let runtime =
            engram_runtime::server::ServiceRuntime::start("slowed-retrieval", listeners.admin);
        let routes = engram_proto::tonic::service::Routes::new(engram_runtime::rpc::index_server(
            index,
            engram_domain::Limits::default(),
        ));
        runtime
            .serve(routes, &[], listeners.grpc, &common, shutdown)
            .await
    })
    .await;
    (slowed, extra)
}

#[tokio::test]
async fn overload_is_refused_at_once_and_what_is_admitted_succeeds() {
    let sandbox = Sandbox::start().await;
    let (slowed, retrieval) = slowed_retrieval(&sandbox, Duration::from_millis(300)).await;
    let limit = 4;
    let gateway = sandbox
        .gateway(
            EdgeArgs {
                max_in_flight: limit,
                ..EdgeArgs::default()
            },
            Some(retrieval.url()),
        )
        .await;
    let client = client_at(gateway.addr, None).await;

    let offered = 64;
    let calls = (0..offered).map(|i| {
        let mut client = client.clone();
        async move {
            client
                .recall(recall_request("u", &format!("question {i}")))
                .await
                .map(|_| ())
        }
    });
    let outcomes: Vec<Result<(), Status>> = futures::future::join_all(calls).await;
    let admitted = outcomes.iter().filter(|o| o.is_ok()).count();
    let shed: Vec<&Status> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(admitted >= limit, "{admitted} admitted");
    assert!(!shed.is_empty(), "nothing was shed");
    for status in &shed {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.metadata().get("retry-after-ms").is_some());
    }
    // The work admitted never exceeded the limit: memory is bounded by it.
    assert!(slowed.most_running.load(Ordering::SeqCst) <= limit);
    let counted = metric(
        gateway.admin.unwrap(),
        r#"engram_gateway_rejected_total{reason="overloaded"}"#,
    )
    .await;
    assert_eq!(counted, Some(shed.len() as f64));
    gateway.stop().await;
    retrieval.stop().await;
    sandbox.stop().await;
}

#[tokio::test]
async fn a_client_deadline_ends_the_call_and_cancels_the_retrieval_work_behind_it() {
    let sandbox = Sandbox::start().await;
    let (slowed, retrieval) = slowed_retrieval(&sandbox, Duration::from_secs(5)).await;
    let gateway = sandbox
        .gateway(EdgeArgs::default(), Some(retrieval.url()))
        .await;
    let mut client = client_at(gateway.addr, None).await;

    let mut request = Request::new(recall_request("u", "slow question"));
    request.set_timeout(Duration::from_millis(50));
    let refused = client.recall(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");

    // The slowed search was dropped on the retrieval side, not left running.
    let mut cancelled = 0;
    for _ in 0..100 {
        cancelled = slowed.cancelled.load(Ordering::SeqCst);
        if cancelled == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cancelled, 1, "the retrieval work was not cancelled");
    assert_eq!(slowed.running.load(Ordering::SeqCst), 0);

    // A method's default deadline applies when the client sends none.
    let strict = sandbox
        .gateway(
            EdgeArgs {
                rpc_deadlines: "Recall=100ms".into(),
                ..EdgeArgs::default()
            },
            Some(retrieval.url()),
        )
        .await;
    let refused = client_at(strict.addr, None)
        .await
        .recall(recall_request("u", "slow question"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    strict.stop().await;
    gateway.stop().await;
    retrieval.stop().await;
    sandbox.stop().await;
}

async fn searches(replica: &Extra) -> f64 {
    metric(
        replica.admin.unwrap(),
        r#"grpc_server_handled_total{grpc_service="engram.internal.v1.Index",grpc_method="Search",grpc_code="OK"}"#,
    )
    .await
    .unwrap_or(0.0)
}

#[tokio::test]
async fn traffic_reaches_both_retrieval_replicas_and_survives_one_stopping() {
    let sandbox = Sandbox::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let one = sandbox.retrieval_replica(dirs[0].path()).await;
    let two = sandbox.retrieval_replica(dirs[1].path()).await;
    let gateway = sandbox
        .gateway(
            EdgeArgs::default(),
            Some(format!("{},{}", one.url(), two.url())),
        )
        .await;
    let mut client = client_at(gateway.addr, None).await;

    for i in 0..20 {
        client
            .recall(recall_request("u", &format!("question {i}")))
            .await
            .unwrap();
    }
    let (first, second) = (searches(&one).await, searches(&two).await);
    assert!(first > 0.0 && second > 0.0, "{first} and {second}");
    assert_eq!(first + second, 20.0);

    // Stop one replica: with nothing in flight, no call fails.
    two.stop().await;
    for i in 0..20 {
        client
            .recall(recall_request("u", &format!("after {i}")))
            .await
            .unwrap_or_else(|e| panic!("call {i} failed after a replica stopped: {e:?}"));
    }
    assert_eq!(searches(&one).await, first + 20.0);
    // The gateway's client metrics count the calls that succeeded, on whichever replica.
    let client_ok = metric(
        gateway.admin.unwrap(),
        r#"grpc_client_handled_total{grpc_service="engram.internal.v1.Index",grpc_method="Search",grpc_code="OK"}"#,
    )
    .await;
    assert_eq!(client_ok, Some(40.0));
    gateway.stop().await;
    one.stop().await;
    sandbox.stop().await;
}

#[tokio::test]
async fn gzip_and_zstd_requests_are_accepted_and_answered_compressed() {
    use engram_proto::tonic::codec::CompressionEncoding;
    let sandbox = Sandbox::start().await;
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let mut client = sandbox
            .client()
            .await
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let text = format!("compressed on the wire with {encoding:?}");
        remember(&mut client, "u", &text, &[]).await;
        let response = client.recall(recall_request("u", "wire")).await.unwrap();
        assert!(!response.into_inner().hits.is_empty(), "{encoding:?}");
    }
    sandbox.stop().await;
}
