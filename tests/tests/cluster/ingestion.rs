//! The durable write log: acknowledgement before indexing, read-your-writes, restarts, and the
//! synchronous fallback when Redis is away — with a real redis-server and the real local model.

use engram_proto::tonic::transport::Channel;
use engram_proto::v1::memory_service_client::MemoryServiceClient;
use engram_tests::{Options, Sandbox, pb};

type Client = MemoryServiceClient<Channel>;

fn scope(user: &str) -> Option<pb::Scope> {
    Some(pb::Scope {
        user_id: user.into(),
        ..Default::default()
    })
}

async fn remember(client: &mut Client, user: &str, texts: &[String]) -> pb::RememberResponse {
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
        })
        .await
        .unwrap()
        .into_inner()
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
        written.write_token.starts_with("wt1.l"),
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
    assert_eq!(written.write_token, "wt1.i");
    assert_eq!(listed(&mut client, "bo", "").await.len(), 1);
    sandbox.redis().restart().await.unwrap();
    sandbox.stop().await;
}
