//! The cluster's spine, end to end through the gateway: remember, recall, get, list, forget,
//! restart, and refusal of bad input.

use engram_proto::prost_types::{FieldMask, Timestamp};
use engram_proto::tonic::{Code, Status};
use engram_tests::{Sandbox, pb};
use tonic_types::StatusExt as _;

type Client = engram_cli::Client;

fn scope(user: &str) -> Option<pb::Scope> {
    Some(pb::Scope {
        user_id: user.to_string(),
        ..Default::default()
    })
}

fn input(text: &str) -> pb::MemoryInput {
    pb::MemoryInput {
        text: text.to_string(),
        ..Default::default()
    }
}

async fn remember(client: &mut Client, user: &str, texts: &[&str]) -> Vec<String> {
    let response = client
        .remember(pb::RememberRequest {
            scope: scope(user),
            memories: texts.iter().map(|t| input(t)).collect(),
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        response
            .results
            .iter()
            .all(|r| r.status() == pb::WriteStatus::Created),
        "{response:?}"
    );
    response.results.into_iter().map(|r| r.id).collect()
}

async fn recall(client: &mut Client, user: &str, query: &str, top_k: u32) -> Vec<pb::Hit> {
    client
        .recall(pb::RecallRequest {
            scope: scope(user),
            query: query.to_string(),
            top_k,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits
}

async fn list_all(client: &mut Client, user: &str, page_size: u32) -> Vec<pb::Memory> {
    let mut memories = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list(pb::ListRequest {
                scope: scope(user),
                page_size,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.memories.len() <= page_size as usize);
        memories.extend(page.memories);
        if page.next_page_token.is_empty() {
            return memories;
        }
        page_token = page.next_page_token;
    }
}

fn texts(hits: &[pb::Hit]) -> Vec<&str> {
    hits.iter()
        .map(|h| h.memory.as_ref().map_or("", |m| m.text.as_str()))
        .collect()
}

#[tokio::test]
async fn recall_stays_in_the_user_s_scope_and_ranks_the_closest_first() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    remember(
        &mut client,
        "alice",
        &[
            "The quarterly budget review is on Thursday",
            "I adopted a cat named Miso",
            "My favourite food is ramen",
        ],
    )
    .await;
    remember(
        &mut client,
        "bob",
        &["I have a dog called Rex", "Bob's cat is called Tom"],
    )
    .await;

    let hits = recall(&mut client, "alice", "what pet do I have", 10).await;
    assert_eq!(hits.len(), 3, "{:?}", texts(&hits));
    assert_eq!(texts(&hits)[0], "I adopted a cat named Miso");
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(hits.iter().all(|h| {
        h.memory
            .as_ref()
            .and_then(|m| m.scope.as_ref())
            .map(|s| s.user_id.as_str())
            == Some("alice")
    }));

    let hits = recall(&mut client, "bob", "what pet do I have", 10).await;
    assert_eq!(hits.len(), 2);
    assert!(
        texts(&hits)
            .iter()
            .all(|t| t.contains("Rex") || t.contains("Tom"))
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn get_returns_what_was_stored_field_for_field() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let event_time = Timestamp {
        seconds: 1_683_000_000,
        nanos: 123_456_000,
    };
    let sent = pb::MemoryInput {
        text: "Caroline: I went to the LGBTQ support group yesterday".into(),
        kind: pb::Kind::Message.into(),
        role: "Caroline".into(),
        metadata: [
            ("dia_id".to_string(), "D1:3".to_string()),
            ("a.b c".to_string(), "x=y".to_string()),
        ]
        .into(),
        tags: vec!["support".into(), "community".into()],
        event_time: Some(event_time),
        importance: 0.8,
        idempotency_key: String::new(),
    };
    let response = client
        .remember(pb::RememberRequest {
            scope: Some(pb::Scope {
                user_id: "caroline".into(),
                agent_id: "companion".into(),
                session_id: "s1".into(),
            }),
            memories: vec![sent.clone()],
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let id = response.results[0].id.clone();
    let got = client
        .get(pb::GetRequest {
            ids: vec![id.clone(), uuid_like_missing()],
            after_write_token: response.write_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.missing_ids, vec![uuid_like_missing()]);
    let memory = &got.memories[0];
    assert_eq!(memory.id, id);
    assert_eq!(memory.text, sent.text);
    assert_eq!(memory.kind, sent.kind);
    assert_eq!(memory.role, sent.role);
    assert_eq!(memory.metadata, sent.metadata);
    assert_eq!(memory.tags, sent.tags);
    assert_eq!(memory.event_time, Some(event_time));
    assert_eq!(memory.importance, sent.importance);
    assert_eq!(
        memory.scope,
        Some(pb::Scope {
            user_id: "caroline".into(),
            agent_id: "companion".into(),
            session_id: "s1".into(),
        })
    );
    assert_eq!(memory.state(), pb::MemoryState::Indexed);
    assert!(!memory.content_hash.is_empty());
    assert!(memory.created_at.is_some() && memory.created_at == memory.updated_at);
    sandbox.stop().await;
}

fn uuid_like_missing() -> String {
    "01900000-0000-7000-8000-000000000000".to_string()
}

#[tokio::test]
async fn list_pages_through_a_scope_in_time_order() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let mut written = Vec::new();
    for batch in 0..3 {
        let texts: Vec<String> = (0..9)
            .map(|i| format!("note {batch}-{i}: item number {i}"))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        written.extend(remember(&mut client, "paula", &refs).await);
    }
    remember(&mut client, "someone-else", &["not paula's"]).await;
    let listed = list_all(&mut client, "paula", 10).await;
    assert_eq!(
        listed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        written
    );
    let created: Vec<_> = listed
        .iter()
        .map(|m| m.created_at.unwrap_or_default())
        .collect();
    assert!(
        created
            .windows(2)
            .all(|w| (w[0].seconds, w[0].nanos) <= (w[1].seconds, w[1].nanos))
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn forgotten_memories_never_come_back() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let ids = remember(
        &mut client,
        "fred",
        &[
            "I adopted a cat named Miso",
            "I play the cello",
            "I live in Lisbon",
        ],
    )
    .await;
    remember(&mut client, "gina", &["I adopted a cat named Miso"]).await;

    let response = client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: vec![ids[0].clone()],
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.forgotten, 1);
    let got = client
        .get(pb::GetRequest {
            ids: vec![ids[0].clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.memories.is_empty());
    assert!(
        !texts(&recall(&mut client, "fred", "cat named Miso", 10).await)
            .contains(&"I adopted a cat named Miso")
    );
    assert_eq!(list_all(&mut client, "fred", 100).await.len(), 2);

    let response = client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Scope(pb::Scope {
                user_id: "fred".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.forgotten, 2);
    assert!(list_all(&mut client, "fred", 100).await.is_empty());
    assert!(recall(&mut client, "fred", "cello", 10).await.is_empty());
    // Another user's identical memory is untouched.
    assert_eq!(
        texts(&recall(&mut client, "gina", "cat", 10).await),
        vec!["I adopted a cat named Miso"]
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn a_restarted_cluster_has_everything() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::start_in(dir.path()).await;
    let mut client = sandbox.client().await;
    let ids = remember(
        &mut client,
        "rita",
        &["I adopted a cat named Miso", "I work night shifts"],
    )
    .await;
    drop(client);
    sandbox.stop().await;

    let sandbox = Sandbox::start_in(dir.path()).await;
    let mut client = sandbox.client().await;
    let listed = list_all(&mut client, "rita", 100).await;
    assert_eq!(listed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(
        texts(&recall(&mut client, "rita", "pet", 1).await),
        vec!["I adopted a cat named Miso"]
    );
    sandbox.stop().await;
}

fn field_of(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("a BadRequest detail");
    let field = bad.field_violations[0].field.clone();
    assert!(
        status.message().contains(&field),
        "message {:?} should name {field}",
        status.message()
    );
    field
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_nothing_is_stored() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let limits = engram_domain::Limits::default();
    let remember_with = |memories: Vec<pb::MemoryInput>| pb::RememberRequest {
        scope: scope("victor"),
        memories,
        mode: pb::WriteMode::Sync.into(),
        extract: false,
        privacy: 0,
    };
    let cases: Vec<(pb::RememberRequest, &str)> = vec![
        (
            remember_with(vec![input("fine"), input("")]),
            "memories[1].text",
        ),
        (
            remember_with(vec![input(&"x".repeat(limits.max_text_bytes + 1))]),
            "memories[0].text",
        ),
        (
            remember_with(vec![input("same"); limits.max_batch + 1]),
            "memories",
        ),
        (
            pb::RememberRequest {
                scope: scope(""),
                ..remember_with(vec![input("no user")])
            },
            "scope.user_id",
        ),
        (
            pb::RememberRequest {
                scope: None,
                ..remember_with(vec![input("no scope")])
            },
            "scope.user_id",
        ),
        (
            remember_with(vec![pb::MemoryInput {
                kind: 99,
                ..input("bad kind")
            }]),
            "memories[0].kind",
        ),
        (
            pb::RememberRequest {
                mode: 7,
                ..remember_with(vec![input("bad mode")])
            },
            "mode",
        ),
    ];
    for (request, field) in cases {
        let status = client.remember(request).await.unwrap_err();
        assert_eq!(field_of(&status), field);
    }

    let recall_with = |top_k: u32, mode: i32| pb::RecallRequest {
        scope: scope("victor"),
        query: "anything".into(),
        top_k,
        mode,
        ..Default::default()
    };
    assert_eq!(
        field_of(&client.recall(recall_with(0, 0)).await.unwrap_err()),
        "top_k"
    );
    assert_eq!(
        field_of(&client.recall(recall_with(101, 0)).await.unwrap_err()),
        "top_k"
    );
    assert_eq!(
        field_of(&client.recall(recall_with(5, 42)).await.unwrap_err()),
        "mode"
    );
    let status = client
        .get(pb::GetRequest {
            ids: vec!["not-an-id".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&status), "ids[0]");
    let status = client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: vec!["123".into()],
            })),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&status), "ids.ids[0]");
    let status = client
        .update(pb::UpdateRequest {
            id: uuid_like_missing(),
            memory: Some(input("new")),
            update_mask: Some(FieldMask {
                paths: vec!["colour".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&status), "update_mask.paths[0]");

    assert!(
        list_all(&mut client, "victor", 100).await.is_empty(),
        "a refused request stored something"
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn update_changes_what_recall_and_get_see() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let ids = remember(
        &mut client,
        "uma",
        &["My favourite colour is green", "I drive a red bicycle"],
    )
    .await;
    let updated = client
        .update(pb::UpdateRequest {
            id: ids[0].clone(),
            memory: Some(pb::MemoryInput {
                tags: vec!["prefs".into()],
                ..input("My favourite colour is purple")
            }),
            update_mask: Some(FieldMask {
                paths: vec!["text".into(), "tags".into()],
            }),
            mode: pb::WriteMode::Sync.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let memory = updated.memory.unwrap();
    assert_eq!(
        (memory.text.as_str(), memory.tags.as_slice()),
        ("My favourite colour is purple", &["prefs".to_string()][..])
    );
    let hits = recall(&mut client, "uma", "what is my favourite colour", 1).await;
    assert_eq!(texts(&hits), vec!["My favourite colour is purple"]);
    assert_eq!(list_all(&mut client, "uma", 10).await.len(), 2);

    let status = client
        .update(pb::UpdateRequest {
            id: uuid_like_missing(),
            memory: Some(input("x")),
            update_mask: Some(FieldMask {
                paths: vec!["text".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    sandbox.stop().await;
}

#[tokio::test]
async fn repeated_facts_are_duplicates_but_messages_are_not() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let first = remember(&mut client, "dora", &["I am allergic to peanuts"]).await;
    let again = client
        .remember(pb::RememberRequest {
            scope: scope("dora"),
            memories: vec![
                input("I am allergic to peanuts"),
                pb::MemoryInput {
                    kind: pb::Kind::Message.into(),
                    role: "user".into(),
                    ..input("thanks!")
                },
                pb::MemoryInput {
                    kind: pb::Kind::Message.into(),
                    role: "user".into(),
                    ..input("thanks!")
                },
            ],
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.results[0].status(), pb::WriteStatus::Duplicate);
    assert_eq!(again.results[0].id, first[0]);
    assert_eq!(again.results[1].status(), pb::WriteStatus::Created);
    assert_eq!(again.results[2].status(), pb::WriteStatus::Created);
    assert_eq!(list_all(&mut client, "dora", 10).await.len(), 3);
    sandbox.stop().await;
}
