//! The durable write log: acknowledgement before indexing, read-your-writes, restarts, and the
//! synchronous fallback when Redis is away — with a real redis-server and the real local model.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use engram_domain::api::{WriteState, WriteToken};
use engram_ingestion::LogArgs;
use engram_proto::internal::v1 as ipb;
use engram_proto::tonic::Code;
use engram_telemetry::Metrics;
use engram_tests::{FakeProvider, Options, Sandbox, eventually, fast_policy, pb};
use parking_lot::Mutex;

const DIM: usize = 8;

type Client = engram_cli::Client;

fn scope(user: &str) -> Option<pb::Scope> {
    Some(pb::Scope {
        user_id: user.into(),
        ..Default::default()
    })
}

async fn remember(client: &mut Client, user: &str, texts: &[String]) -> pb::RememberResponse {
    try_remember(client, user, texts)
        .await
        .unwrap_or_else(|status| panic!("remember for {user}: {status:?}"))
}

async fn try_remember(
    client: &mut Client,
    user: &str,
    texts: &[String],
) -> Result<pb::RememberResponse, engram_proto::tonic::Status> {
    client
        .remember(pb::RememberRequest {
            scope: scope(user),
            memories: texts
                .iter()
                .map(|t| pb::MemoryInput {
                    text: t.clone(),
                    ..Default::default()
                })
                .collect(),
            mode: pb::WriteMode::Async.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .map(|r| r.into_inner())
}

/// The ids of the CREATED results of a write.
fn created(written: &pb::RememberResponse) -> Vec<String> {
    written
        .results
        .iter()
        .filter(|r| r.status() == pb::WriteStatus::Created)
        .map(|r| r.id.clone())
        .collect()
}

/// Per scope, the memories stored are exactly the CREATED acknowledgements: none lost, none
/// twice. Waits first for every write to be indexed.
async fn assert_exactly_once(
    sandbox: &Sandbox,
    acknowledged: &HashMap<String, Vec<String>>,
    tokens: &[String],
) {
    for encoded in tokens {
        if let t @ WriteToken::Logged { .. } = sandbox.write_token(encoded) {
            let state = sandbox
                .settled(t, Duration::from_secs(120))
                .await
                .unwrap_or_else(|e| panic!("{encoded}: {e}"));
            assert_eq!(state, WriteState::Indexed, "{encoded}");
        }
    }
    let mut client = sandbox.client().await;
    for (user, ids) in acknowledged {
        let stored = listed(&mut client, user, "").await;
        let stored_ids: HashSet<String> = stored.iter().map(|m| m.id.clone()).collect();
        assert_eq!(
            stored_ids.len(),
            stored.len(),
            "{user}: a memory stored twice"
        );
        let acknowledged_ids: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(
            acknowledged_ids.len(),
            ids.len(),
            "{user}: an id acknowledged twice"
        );
        let lost: Vec<_> = acknowledged_ids.difference(&stored_ids).collect();
        assert!(lost.is_empty(), "{user}: acknowledged and lost: {lost:?}");
        assert_eq!(
            stored.len(),
            ids.len(),
            "{user}: stored but not acknowledged"
        );
    }
}

async fn listed(client: &mut Client, user: &str, after_write_token: &str) -> Vec<pb::Memory> {
    client
        .list(pb::ListRequest {
            scope: scope(user),
            page_size: 1000,
            after_write_token: after_write_token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .memories
}

#[tokio::test]
async fn an_async_write_is_acknowledged_with_a_token_that_recall_can_wait_for() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let written = remember(
        &mut client,
        "ada",
        &["My sister Grace lives in Lisbon".into()],
    )
    .await;
    assert!(
        sandbox.write_token(&written.write_token) != WriteToken::Indexed,
        "{}",
        written.write_token
    );
    assert_eq!(written.results[0].status(), pb::WriteStatus::Created);
    let hits = client
        .recall(pb::RecallRequest {
            scope: scope("ada"),
            query: "where does my sister live".into(),
            top_k: 3,
            after_write_token: written.write_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].memory.as_ref().unwrap().id, written.results[0].id);

    // The same text again, while or after it is indexed: a duplicate of the first.
    let again = remember(
        &mut client,
        "ada",
        &["My sister Grace lives in Lisbon".into()],
    )
    .await;
    assert_eq!(again.results[0].status(), pb::WriteStatus::Duplicate);
    assert_eq!(again.results[0].id, written.results[0].id);

    // Update and Forget go through the same log, in order with the writes.
    let forgotten = client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: vec![written.results[0].id.clone()],
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.forgotten, 1);
    assert!(
        listed(&mut client, "ada", &forgotten.write_token)
            .await
            .is_empty()
    );

    // Forgotten, the same text is new again — its de-duplication reservation is stale.
    let anew = remember(
        &mut client,
        "ada",
        &["My sister Grace lives in Lisbon".into()],
    )
    .await;
    assert_eq!(anew.results[0].status(), pb::WriteStatus::Created);
    assert_ne!(anew.results[0].id, written.results[0].id);
    assert_eq!(listed(&mut client, "ada", &anew.write_token).await.len(), 1);
    sandbox.stop().await;
}

#[tokio::test]
async fn acknowledged_writes_survive_a_stop_before_indexing_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let options = || Options {
        persistent_redis: true,
        ..Options::default()
    };
    let users: Vec<String> = (0..10).map(|u| format!("user-{u}")).collect();
    let mut created = std::collections::HashMap::new();
    let mut tokens = Vec::new();
    {
        let sandbox = Sandbox::start_with(Some(dir.path()), options()).await;
        let mut client = sandbox.client().await;
        for round in 0..3 {
            for user in &users {
                let texts: Vec<String> = (0..10)
                    .map(|i| format!("{user} note {round}-{i}: the meeting moved to room {i}"))
                    .collect();
                let written = remember(&mut client, user, &texts).await;
                let n = written
                    .results
                    .iter()
                    .filter(|r| r.status() == pb::WriteStatus::Created)
                    .count();
                *created.entry(user.clone()).or_insert(0) += n;
                tokens.push((user.clone(), written.write_token));
            }
        }
        // Stop at once: much of the log is not indexed yet.
        sandbox.stop().await;
    }
    let sandbox = Sandbox::start_with(Some(dir.path()), options()).await;
    let mut client = sandbox.client().await;
    for (user, token) in tokens.iter().rev().take(users.len()) {
        let memories = listed(&mut client, user, token).await;
        let ids: std::collections::HashSet<_> = memories.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids.len(), memories.len(), "{user}: no duplicates");
        assert_eq!(
            memories.len(),
            created[user],
            "{user}: every acknowledged write"
        );
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn with_redis_down_writes_are_indexed_synchronously() {
    let mut sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    sandbox.redis().kill().await;
    let written = remember(&mut client, "bo", &["I keep bees on the roof".into()]).await;
    assert_eq!(
        sandbox.write_token(&written.write_token),
        WriteToken::Indexed
    );
    assert_eq!(listed(&mut client, "bo", "").await.len(), 1);
    sandbox.redis().restart().await.unwrap();
    sandbox.stop().await;
}

/// Counter `name` as a registry exposes it.
fn counter(metrics: &Metrics, name: &str) -> u64 {
    metrics
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn ten_thousand_writes_survive_crashing_workers_exactly_once() {
    const SCOPES: usize = 50;
    const PER_CALL: usize = 10;
    const CALLS_PER_SCOPE: usize = 20; // 50 × 20 × 10 = 10,000 writes
    const WRITERS: usize = 5;
    let fake = FakeProvider::start(DIM).await;
    // Slow enough that a worker is caught with a batch in hand.
    fake.set_latency(Duration::from_millis(40));
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    // The sandbox's ingestion service only accepts writes; the test runs (and crashes) the
    // workers itself.
    options.write_log.workers = false;
    let sandbox = Sandbox::start_with(None, options).await;
    let config = sandbox.ingestion_config(LogArgs {
        claim_idle: Duration::from_secs(1),
        ..LogArgs::default()
    });

    let acknowledged: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let tokens: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut client = sandbox.client().await;
        let acknowledged = acknowledged.clone();
        let tokens = tokens.clone();
        writers.spawn(async move {
            for call in 0..CALLS_PER_SCOPE {
                for scope in (w..SCOPES).step_by(WRITERS) {
                    let user = format!("user-{scope}");
                    let texts: Vec<String> = (0..PER_CALL)
                        .map(|i| {
                            format!(
                                "{user} wrote note {call}-{i} about errand {}",
                                call * PER_CALL + i
                            )
                        })
                        .collect();
                    let written = remember(&mut client, &user, &texts).await;
                    acknowledged
                        .lock()
                        .entry(user)
                        .or_default()
                        .extend(created(&written));
                    tokens.lock().push(written.write_token);
                }
                // Spread the writes over the crashes.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    let mut kills = 0;
    let mut reclaimed = 0;
    let mut registries = Vec::new();
    while kills < 5 {
        let metrics = Metrics::new();
        let workers = engram_ingestion::start_workers(&config, &metrics)
            .unwrap()
            .expect("the sandbox has Redis");
        // Wait until a batch is with the provider, then crash the workers holding it.
        let mut waited = Duration::ZERO;
        while fake.in_flight() == 0 {
            assert!(
                waited < Duration::from_secs(30),
                "the workers never took a batch"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
            waited += Duration::from_millis(2);
        }
        tokio::time::sleep(Duration::from_millis(kills * 7 % 20)).await;
        if fake.in_flight() > 0 {
            workers.abort().await;
            kills += 1;
        } else {
            workers.abort().await;
        }
        registries.push(metrics);
    }
    let metrics = Metrics::new();
    let workers = engram_ingestion::start_workers(&config, &metrics)
        .unwrap()
        .expect("the sandbox has Redis");
    while let Some(written) = writers.join_next().await {
        written.unwrap();
    }
    let acknowledged = acknowledged.lock().clone();
    assert_eq!(acknowledged.len(), SCOPES);
    let total: usize = acknowledged.values().map(Vec::len).sum();
    assert_eq!(total, SCOPES * CALLS_PER_SCOPE * PER_CALL);
    let tokens = tokens.lock().clone();
    assert_exactly_once(&sandbox, &acknowledged, &tokens).await;
    registries.push(metrics);
    for metrics in &registries {
        reclaimed += counter(metrics, "engram_log_reclaimed_entries_total");
    }
    // The crashed workers' batches were taken over by their successors.
    assert!(
        reclaimed > 0,
        "no entry was reclaimed after {kills} crashes"
    );
    workers.stop().await;
    sandbox.stop().await;
}

/// How many of `tokens` are for writes that went to the log.
fn logged(tokens: &Mutex<Vec<String>>) -> usize {
    tokens
        .lock()
        .iter()
        .filter(|t| t.starts_with("wt2.l"))
        .count()
}

#[tokio::test]
async fn redis_killed_during_writes_loses_no_acknowledged_write() {
    let fake = FakeProvider::start(DIM).await;
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    options.persistent_redis = true;
    let mut sandbox = Sandbox::start_with(None, options).await;
    let acknowledged: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let tokens: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut client = sandbox.client().await;
        let acknowledged = acknowledged.clone();
        let tokens = tokens.clone();
        let stop = stop.clone();
        writers.spawn(async move {
            let user = format!("writer-{w}");
            let mut call = 0;
            while !stop.load(Ordering::Relaxed) {
                let texts: Vec<String> = (0..5)
                    .map(|i| format!("{user} remembers item {call}-{i}"))
                    .collect();
                let written = remember(&mut client, &user, &texts).await;
                acknowledged
                    .lock()
                    .entry(user.clone())
                    .or_default()
                    .extend(created(&written));
                tokens.lock().push(written.write_token);
                call += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    // Some writes go to the log, then Redis dies; writes carry on (indexed synchronously)
    // until some were acknowledged during the outage, then it comes back.
    eventually("writes to the log", || {
        let tokens = tokens.clone();
        async move { (logged(&tokens) >= 20).then_some(()) }
    })
    .await;
    sandbox.redis().kill().await;
    eventually("writes during the outage", || {
        let tokens = tokens.clone();
        async move {
            (tokens
                .lock()
                .iter()
                .filter(|t| t.starts_with("wt2.i."))
                .count()
                >= 20)
                .then_some(())
        }
    })
    .await;
    sandbox.redis().restart().await.unwrap();
    // Once Redis is back, writes go to the log again.
    let mut client = sandbox.client().await;
    let mut back = false;
    for attempt in 0..100 {
        let user = "after-restart";
        let written = remember(
            &mut client,
            user,
            &[format!("written after the restart, try {attempt}")],
        )
        .await;
        acknowledged
            .lock()
            .entry(user.into())
            .or_default()
            .extend(created(&written));
        tokens.lock().push(written.write_token.clone());
        if sandbox.write_token(&written.write_token) != WriteToken::Indexed {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "writes did not return to the log after Redis restarted"
    );
    let before = logged(&tokens);
    eventually("writers back on the log", || {
        let tokens = tokens.clone();
        async move { (logged(&tokens) >= before + 20).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while let Some(written) = writers.join_next().await {
        written.unwrap();
    }
    let tokens = tokens.lock().clone();
    // Some writes were logged before the crash, some indexed synchronously during it.
    assert!(
        tokens.iter().any(|t| t.starts_with("wt2.i.")),
        "no write during the outage"
    );
    let acknowledged = acknowledged.lock().clone();
    assert_exactly_once(&sandbox, &acknowledged, &tokens).await;
    sandbox.stop().await;
}

#[tokio::test]
async fn a_poison_write_is_dead_lettered_while_the_writes_around_it_are_indexed() {
    let fake = FakeProvider::start(DIM).await;
    fake.poison("POISON: the provider fails on this text every time");
    let mut policy = fast_policy();
    // The poison trips the circuit; it must still be told from an outage once it closes.
    policy.breaker.cooldown = Duration::from_millis(200);
    let mut options = Options::with_fake(&fake, DIM, policy);
    options.write_log.max_deliveries = 3;
    let sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let mut acknowledged = Vec::new();
    let mut poison_token = String::new();
    let mut last_token = String::new();
    for text in [
        "before one",
        "before two",
        "POISON: the provider fails on this text every time",
        "after one",
        "after two",
    ] {
        let written = remember(&mut client, "pia", &[text.into()]).await;
        if text.starts_with("POISON") {
            poison_token = written.write_token.clone();
        } else {
            acknowledged.extend(created(&written));
        }
        last_token = written.write_token;
    }
    let state = sandbox
        .settled(sandbox.write_token(&last_token), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(state, WriteState::Indexed);

    let mut status = ipb::ingestion_client::IngestionClient::new(
        sandbox.internal_channel(sandbox.addrs.ingestion).await,
    );
    let poison = status
        .status(ipb::StatusRequest {
            write_token: sandbox.write_token(&poison_token).encode(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(poison.state(), ipb::WriteState::Failed);
    assert!(
        poison.reason.contains("fake-embedding"),
        "{}",
        poison.reason
    );
    let dead = sandbox.write_log().dead_lettered(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, poison.reason);

    let stored: HashSet<String> = listed(&mut client, "pia", "")
        .await
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(stored, acknowledged.into_iter().collect());
    sandbox.stop().await;
}

#[tokio::test]
async fn a_partition_too_far_behind_refuses_writes_until_it_catches_up() {
    let fake = FakeProvider::start(DIM).await;
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    options.write_log.workers = false;
    options.write_log.partitions = 1;
    options.write_log.max_lag = 5;
    let sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let texts: Vec<String> = (0..5).map(|i| format!("errand number {i}")).collect();
    let accepted = remember(&mut client, "lee", &texts).await;
    let refused = try_remember(&mut client, "lee", &["one errand too many".into()])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("5 writes behind"),
        "{}",
        refused.message()
    );
    assert!(refused.metadata().get("retry-after-ms").is_some());

    // Nothing is indexed yet: a read that waits for the write gives up at the caller's
    // deadline, saying why.
    let mut waiting = engram_proto::tonic::Request::new(pb::ListRequest {
        scope: scope("lee"),
        after_write_token: accepted.write_token.clone(),
        ..Default::default()
    });
    waiting.set_timeout(Duration::from_millis(500));
    let late = client.list(waiting).await.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    assert!(
        late.message().contains("stays in the write log"),
        "{}",
        late.message()
    );

    // Workers catch up; the same write is then accepted.
    let workers = engram_ingestion::start_workers(
        &sandbox.ingestion_config(LogArgs {
            partitions: 1,
            ..LogArgs::default()
        }),
        &Metrics::new(),
    )
    .unwrap()
    .expect("the sandbox has Redis");
    assert_eq!(
        listed(&mut client, "lee", &accepted.write_token)
            .await
            .len(),
        5
    );
    let again = remember(&mut client, "lee", &["one errand too many".into()]).await;
    assert_eq!(
        listed(&mut client, "lee", &again.write_token).await.len(),
        6
    );
    workers.stop().await;
    sandbox.stop().await;
}

#[tokio::test]
async fn recall_after_an_update_finds_the_new_text_and_after_a_forget_nothing() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let written = remember(
        &mut client,
        "ivy",
        &["I drive a red sports car to work".into()],
    )
    .await;
    let id = written.results[0].id.clone();
    let recall = |client: &mut Client, token: String| {
        let mut client = client.clone();
        async move {
            client
                .recall(pb::RecallRequest {
                    scope: scope("ivy"),
                    query: "how do I get to work".into(),
                    top_k: 5,
                    after_write_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .hits
                .into_iter()
                .filter_map(|h| h.memory)
                .collect::<Vec<_>>()
        }
    };
    let hits = recall(&mut client, written.write_token.clone()).await;
    assert_eq!(hits.len(), 1);

    let updated = client
        .update(pb::UpdateRequest {
            id: id.clone(),
            memory: Some(pb::MemoryInput {
                text: "I cycle to work on a blue bicycle".into(),
                ..Default::default()
            }),
            update_mask: Some(engram_proto::prost_types::FieldMask {
                paths: vec!["text".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let hits = recall(&mut client, updated.write_token.clone()).await;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, id);
    assert_eq!(hits[0].text, "I cycle to work on a blue bicycle");

    let forgotten = client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: vec![id],
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.forgotten, 1);
    assert!(recall(&mut client, forgotten.write_token).await.is_empty());
    sandbox.stop().await;
}

/// A worker that stalls past its lease (here: its lease is broken while it holds an entry)
/// resumes after a successor took the partition, applied the entry and then forgot its scope.
/// The stalled worker's late apply is refused by retrieval, its finish and dead letter by the
/// write log, so the forgotten memory does not come back and the watermark never goes back.
#[tokio::test]
async fn a_worker_whose_lease_moved_on_can_neither_apply_nor_finish() {
    use engram_domain::api::{
        Fence, GetQuery, Index as _, IndexOp, IndexWrites, IndexedMemory, LogKind,
    };
    use engram_domain::model::{Memory, MemoryId, NewMemory, Scope, TenantId, Timestamp};
    use engram_writelog::{Append, Appended, Done, Read};

    let fake = FakeProvider::start(DIM).await;
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    // The test plays both workers itself.
    options.write_log.workers = false;
    let mut sandbox = Sandbox::start_with(None, options).await;
    let log = sandbox.write_log();
    let index = sandbox.index();
    let tenant = TenantId::parse("default").unwrap();
    let memory = Memory::from_input(
        MemoryId::new_time_ordered(),
        tenant.clone(),
        Scope::user("u"),
        NewMemory::text("held by a worker that stalls"),
        Timestamp::now(),
    );
    let upsert = |epoch| IndexWrites {
        ops: vec![IndexOp::Upsert(Box::new(IndexedMemory {
            memory: memory.clone(),
            dense: vec![0.5; DIM],
        }))],
        fence: Some(Fence {
            log: LogKind::Write,
            partition: 0,
            epoch,
        }),
    };
    let append = |id: &str| Append {
        key_reservation: String::new(),
        content_reservation: String::new(),
        id: id.to_string(),
        payload: b"entry".to_vec(),
        force: false,
        pending_key: String::new(),
    };
    let entry = match log.append(0, &[append("first")], 1000).await.unwrap()[..] {
        [Appended::Logged(entry)] => entry,
        ref other => panic!("{other:?}"),
    };

    // Worker A takes the partition and reads the entry; then it stalls, and its lease lapses.
    let first = log
        .lease(0, "worker-a", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a free partition");
    log.ensure_group(0).await.unwrap();
    let read = log
        .read(
            0,
            10,
            Read::New {
                block: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), vec![entry]);
    assert_eq!(
        log.lease(0, "worker-b", Duration::from_secs(60))
            .await
            .unwrap(),
        None,
        "held while A's lease lasts"
    );
    log.break_leases().await.unwrap();

    // Worker B takes over under a newer epoch, applies the entry, then a Forget of its scope.
    let second = log
        .lease(0, "worker-b", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the lapsed lease");
    assert!(second > first, "epochs grow: {first} then {second}");
    let pending = log.read(0, 10, Read::Pending).await.unwrap();
    assert_eq!(
        pending.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![entry]
    );
    index.apply(&tenant, upsert(second)).await.unwrap();
    let forget = IndexWrites {
        ops: vec![IndexOp::DeleteScope(Scope::user("u"))],
        ..upsert(second)
    };
    assert_eq!(index.apply(&tenant, forget).await.unwrap().deleted, 1);
    let receipt = engram_domain::api::Erasure {
        memories: 1,
        ..Default::default()
    };
    log.finish(0, second, &[(entry, Done::Forgot(receipt))], &[])
        .await
        .unwrap();

    // A resumes: its apply, dead letter and finish are all refused.
    let refused = index.apply(&tenant, upsert(first)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused}");
    let refused = log
        .finish(0, first, &[(entry, Done::Applied)], &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused}");
    let refused = log
        .dead_letter(0, first, &read[0], "late", &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused}");
    assert_eq!(log.dead_letters().await.unwrap(), 0);
    let found = index
        .get(
            &tenant,
            GetQuery {
                ids: vec![memory.id],
                after_write_token: None,
            },
        )
        .await
        .unwrap();
    assert!(found.memories.is_empty(), "the forgotten memory came back");
    assert_eq!(
        log.forgot(0, entry).await.unwrap(),
        receipt,
        "B's outcome stands"
    );

    // The watermark only moves forward, even when an older entry is finished after a newer one.
    let later = match log.append(0, &[append("later")], 1000).await.unwrap()[..] {
        [Appended::Logged(entry)] => entry,
        ref other => panic!("{other:?}"),
    };
    log.finish(0, second, &[(later, Done::Applied)], &[])
        .await
        .unwrap();
    log.finish(0, second, &[(entry, Done::Applied)], &[])
        .await
        .unwrap();
    let later_token = WriteToken::Logged {
        partition: 0,
        entry: later,
    };
    assert_eq!(log.status(later_token).await.unwrap(), WriteState::Indexed);

    // Redis restarts without its data (no persistence here): the partition's next epoch is
    // still newer than any retrieval has applied, so the next worker is not refused.
    sandbox.redis().kill().await;
    sandbox.redis().restart().await.unwrap();
    let third = eventually("the lease of a Redis that lost its data", || {
        let log = log.clone();
        async move {
            log.lease(0, "worker-c", Duration::from_secs(60))
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    assert!(
        third > second,
        "epochs grow across the loss: {second} then {third}"
    );
    index.apply(&tenant, upsert(third)).await.unwrap();
    sandbox.stop().await;
}

fn forget_ids(ids: &[String]) -> pb::ForgetRequest {
    pb::ForgetRequest {
        target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
            ids: ids.to_vec(),
        })),
    }
}

fn new_text(id: &str, text: &str) -> pb::UpdateRequest {
    pb::UpdateRequest {
        id: id.into(),
        memory: Some(pb::MemoryInput {
            text: text.into(),
            ..Default::default()
        }),
        update_mask: Some(engram_proto::prost_types::FieldMask {
            paths: vec!["text".into()],
        }),
        ..Default::default()
    }
}

/// An Update or Forget by id of a memory whose write is still in the log is applied after
/// that write, instead of finding nothing (NOT_FOUND, `forgotten: 0`) and letting the memory
/// appear later.
#[tokio::test]
async fn update_and_forget_by_id_reach_a_memory_still_in_the_log() {
    let fake = FakeProvider::start(DIM).await;
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    options.write_log.workers = false;
    let sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let written = remember(
        &mut client,
        "ida",
        &["kept, then changed".into(), "soon forgotten".into()],
    )
    .await;
    let ids = created(&written);
    let (kept, forgotten) = (ids[0].clone(), ids[1].clone());

    // Both calls wait for their writes, which no worker has indexed yet.
    let update = {
        let mut client = sandbox.client().await;
        let request = new_text(&kept, "changed while in the log");
        tokio::spawn(async move { client.update(request).await })
    };
    let forget = {
        let mut client = sandbox.client().await;
        let request = forget_ids(std::slice::from_ref(&forgotten));
        tokio::spawn(async move { client.forget(request).await })
    };
    let workers = engram_ingestion::start_workers(
        &sandbox.ingestion_config(LogArgs::default()),
        &Metrics::new(),
    )
    .unwrap()
    .expect("the sandbox has Redis");
    let updated = update.await.unwrap().unwrap().into_inner();
    assert_eq!(
        updated.memory.map(|m| m.text).as_deref(),
        Some("changed while in the log")
    );
    let answer = forget.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.forgotten, 1, "{answer:?}");
    let stored = listed(&mut client, "ida", &answer.write_token).await;
    let texts: Vec<&str> = stored.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["changed while in the log"]);

    // An id the log never had is still not found.
    let unknown = engram_domain::model::MemoryId::new_time_ordered().to_string();
    let missing = client
        .update(new_text(&unknown, "nothing"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    workers.stop().await;
    sandbox.stop().await;
}

/// While Redis is unreachable, Update and Forget are refused (UNAVAILABLE, retryable) instead
/// of being applied directly ahead of the user's older writes still in the log, which would
/// then bring forgotten memories back.
#[tokio::test]
async fn forget_waits_for_the_log_while_redis_is_down_so_older_writes_cannot_overtake_it() {
    let fake = FakeProvider::start(DIM).await;
    let mut options = Options::with_fake(&fake, DIM, fast_policy());
    options.write_log.workers = false;
    options.persistent_redis = true;
    let mut sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let written = remember(&mut client, "ole", &["written before the outage".into()]).await;
    let id = created(&written).remove(0);

    sandbox.redis().kill().await;
    let forget_all = pb::ForgetRequest {
        target: Some(pb::forget_request::Target::Scope(pb::Scope {
            user_id: "ole".into(),
            ..Default::default()
        })),
    };
    let refused = client.forget(forget_all.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some());
    let refused = client
        .update(new_text(&id, "changed during the outage"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // Redis returns, the workers index the older write; the retried Forget comes after it.
    sandbox.redis().restart().await.unwrap();
    let workers = engram_ingestion::start_workers(
        &sandbox.ingestion_config(LogArgs::default()),
        &Metrics::new(),
    )
    .unwrap()
    .expect("the sandbox has Redis");
    let answer = eventually("the Forget accepted once Redis is back", || {
        let mut client = client.clone();
        let request = forget_all.clone();
        async move { client.forget(request).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    assert_eq!(answer.forgotten, 1, "{answer:?}");
    assert!(
        listed(&mut client, "ole", &answer.write_token)
            .await
            .is_empty()
    );
    workers.stop().await;
    sandbox.stop().await;
}

/// The hex digest the embedding cache names the tenant `default`'s text by.
fn cache_hash(text: &str) -> String {
    engram_embedding::text_digest(&engram_domain::model::TenantId::default_tenant(), text)
}

/// The embedding cache's keys in the sandbox's Redis.
async fn embedding_cache_keys(sandbox: &Sandbox) -> Vec<String> {
    let client = redis::Client::open(sandbox.redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg("engram:embeddings:*")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A Forget drops the vectors of what it forgets from the embedding cache: each forgotten
/// turn's text, its text with the turn before it, and the text of the turn after it embedded
/// with it; other users' entries stay.
#[tokio::test]
async fn forget_drops_the_forgotten_texts_from_the_embedding_cache() {
    let fake = FakeProvider::start(DIM).await;
    let sandbox = Sandbox::start_with(None, Options::with_fake(&fake, DIM, fast_policy())).await;
    let mut client = sandbox.client().await;
    let turns = [
        "we sailed to the lake",
        "the boat was green",
        "then it rained",
    ];
    let mut ids = Vec::new();
    for (user, text) in [
        ("uma", turns[0]),
        ("uma", turns[1]),
        ("uma", turns[2]),
        ("vic", "vic's own turn"),
    ] {
        let written = client
            .remember(pb::RememberRequest {
                scope: Some(pb::Scope {
                    user_id: user.into(),
                    session_id: "s".into(),
                    ..Default::default()
                }),
                memories: vec![pb::MemoryInput {
                    text: text.into(),
                    kind: pb::Kind::Message.into(),
                    role: "user".into(),
                    ..Default::default()
                }],
                mode: pb::WriteMode::Sync.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(written.results[0].id.clone());
    }
    let cached = |keys: &[String], text: &str| keys.iter().any(|k| k.ends_with(&cache_hash(text)));
    let keys = embedding_cache_keys(&sandbox).await;
    for text in [
        turns[0],
        turns[1],
        &format!("{}\n{}", turns[0], turns[1]),
        &format!("{}\n{}", turns[1], turns[2]),
        "vic's own turn",
    ] {
        assert!(cached(&keys, text), "{text:?} is not cached: {keys:?}");
    }

    // Forgetting the middle turn: its texts and the next turn's text with it are dropped.
    let forgotten = client
        .forget(forget_ids(std::slice::from_ref(&ids[1])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.forgotten, 1);
    let keys = embedding_cache_keys(&sandbox).await;
    for text in [
        turns[1],
        &format!("{}\n{}", turns[0], turns[1]),
        &format!("{}\n{}", turns[1], turns[2]),
    ] {
        assert!(!cached(&keys, text), "{text:?} is still cached");
    }
    assert!(cached(&keys, turns[0]));
    // The turn after it was embedded again with the turn now before it.
    assert!(cached(&keys, &format!("{}\n{}", turns[0], turns[2])));

    // Forgetting the user drops the rest of theirs; another user's entries stay.
    client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Scope(pb::Scope {
                user_id: "uma".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let keys = embedding_cache_keys(&sandbox).await;
    for text in [turns[0], turns[2], &format!("{}\n{}", turns[0], turns[2])] {
        assert!(!cached(&keys, text), "{text:?} is still cached");
    }
    assert!(cached(&keys, "vic's own turn"));
    sandbox.stop().await;
}
