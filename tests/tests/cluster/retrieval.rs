//! Retrieval through the gateway: the search modes, time, recency, filters, explain, and the
//! result cache's freshness, with the real model, real qdrant-edge and a private Redis.

use std::collections::BTreeMap;

use engram_domain::api::{Index as _, Ingestion as _, RecallQuery, RememberBatch};
use engram_domain::model::{Filter, NewMemory, Scope, TenantId, WriteMode};
use engram_runtime::rpc::IngestionClient;
use engram_tests::{Sandbox, pb};
use engram_text::calendar::Date;

type Client = engram_cli::Client;

fn scope(user: &str) -> Option<pb::Scope> {
    Some(pb::Scope {
        user_id: user.to_string(),
        ..Default::default()
    })
}

fn at(date: Date) -> Option<engram_proto::prost_types::Timestamp> {
    Some(engram_domain::convert::timestamp(date.start()))
}

fn date(y: i32, m: u32, d: u32) -> Date {
    Date::new(y, m, d).unwrap()
}

/// Remember (SYNC) inputs into `user`'s scope; their ids.
async fn remember(client: &mut Client, user: &str, memories: Vec<pb::MemoryInput>) -> Vec<String> {
    remember_in(client, scope(user), memories).await
}

/// Remember (SYNC) inputs into `scope`; their ids.
async fn remember_in(
    client: &mut Client,
    scope: Option<pb::Scope>,
    memories: Vec<pb::MemoryInput>,
) -> Vec<String> {
    let response = client
        .remember(pb::RememberRequest {
            scope,
            memories,
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

fn text(t: &str) -> pb::MemoryInput {
    pb::MemoryInput {
        text: t.to_string(),
        ..Default::default()
    }
}

fn message_on(t: &str, day: Date) -> pb::MemoryInput {
    pb::MemoryInput {
        text: t.to_string(),
        kind: pb::Kind::Message.into(),
        event_time: at(day),
        ..Default::default()
    }
}

fn request(user: &str, query: &str, mode: pb::SearchMode) -> pb::RecallRequest {
    pb::RecallRequest {
        scope: scope(user),
        query: query.to_string(),
        top_k: 10,
        mode: mode.into(),
        explain: true,
        ..Default::default()
    }
}

async fn recall(client: &mut Client, request: pb::RecallRequest) -> pb::RecallResponse {
    client.recall(request).await.unwrap().into_inner()
}

fn texts(response: &pb::RecallResponse) -> Vec<&str> {
    response
        .hits
        .iter()
        .map(|h| h.memory.as_ref().map_or("", |m| m.text.as_str()))
        .collect()
}

/// Every hit's explanation accounts for its score, and the order follows the scores.
fn assert_explained(response: &pb::RecallResponse) {
    assert!(
        response.hits.windows(2).all(|w| w[0].score >= w[1].score),
        "{response:?}"
    );
    for hit in &response.hits {
        let e = hit.explanation.as_ref().expect("explain was asked for");
        let product = e.fused_score * e.recency_factor * e.importance_factor;
        assert!((product - hit.score).abs() < 1e-5, "{hit:?}");
        assert!(
            e.dense_rank + e.keyword_rank + e.temporal_rank + e.entity_rank > 0,
            "a hit no strategy returned: {hit:?}"
        );
    }
}

fn message(t: &str) -> pb::MemoryInput {
    pb::MemoryInput {
        text: t.to_string(),
        kind: pb::Kind::Message.into(),
        ..Default::default()
    }
}

/// The cosine explain reports for the hit with text `t`.
fn cosine_of(response: &pb::RecallResponse, t: &str) -> f32 {
    response
        .hits
        .iter()
        .find(|h| h.memory.as_ref().is_some_and(|m| m.text == t))
        .and_then(|h| h.explanation.as_ref())
        .map(|e| e.dense_score)
        .unwrap_or_else(|| panic!("{t:?} not found: {:?}", texts(response)))
}

#[tokio::test]
async fn a_turn_is_embedded_with_the_turn_before_it_until_that_turn_is_forgotten() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let session = |user: &str| {
        Some(pb::Scope {
            user_id: user.to_string(),
            session_id: "walks".to_string(),
            ..Default::default()
        })
    };
    let (first, question, answer) = (
        "I went to the shelter on Saturday",
        "What did you name the puppy you adopted?",
        "Biscuit!",
    );
    let ids = remember_in(
        &mut client,
        session("u"),
        vec![message(first), message(question), message(answer)],
    )
    .await;
    // The same answer without a session, and the same session written one turn per call:
    // the turn before comes from the index then.
    remember(&mut client, "alone", vec![message(answer)]).await;
    for turn in [first, question, answer] {
        remember_in(&mut client, session("one-by-one"), vec![message(turn)]).await;
    }
    let ask = |user: &str| request(user, "what is the dog called", pb::SearchMode::Semantic);
    let alone = cosine_of(&recall(&mut client, ask("alone")).await, answer);
    let in_context = cosine_of(&recall(&mut client, ask("u")).await, answer);
    assert!(in_context > alone + 0.1, "{in_context} vs alone {alone}");
    let one_by_one = cosine_of(&recall(&mut client, ask("one-by-one")).await, answer);
    assert!(
        (one_by_one - in_context).abs() < 1e-4,
        "{one_by_one} vs {in_context}"
    );

    // Forgetting the question embeds the answer again after the turn now before it.
    let forgotten = client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Ids(pb::MemoryIds {
                ids: vec![ids[1].clone()],
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forgotten.forgotten, 1);
    let mut after = ask("u");
    after.after_write_token = forgotten.write_token;
    let after = cosine_of(&recall(&mut client, after).await, answer);
    assert!(after < in_context - 0.1, "{after} vs {in_context}");
    // Exactly as if the question had never been said.
    remember_in(
        &mut client,
        session("never-asked"),
        vec![message(first), message(answer)],
    )
    .await;
    let never_asked = cosine_of(&recall(&mut client, ask("never-asked")).await, answer);
    assert!(
        (after - never_asked).abs() < 1e-4,
        "{after} vs {never_asked}"
    );

    // Changing the text of the turn before embeds the answer again after the new text.
    let asked_again = "And the dog's name?";
    let updated = client
        .update(pb::UpdateRequest {
            id: ids[0].clone(),
            memory: Some(message(asked_again)),
            update_mask: Some(engram_proto::prost_types::FieldMask {
                paths: vec!["text".into()],
            }),
            mode: pb::WriteMode::Sync.into(),
        })
        .await
        .unwrap()
        .into_inner();
    remember_in(
        &mut client,
        session("asked-again"),
        vec![message(asked_again), message(answer)],
    )
    .await;
    let mut now = ask("u");
    now.after_write_token = updated.write_token;
    let now = cosine_of(&recall(&mut client, now).await, answer);
    let expected = cosine_of(&recall(&mut client, ask("asked-again")).await, answer);
    assert!((now - expected).abs() < 1e-4, "{now} vs {expected}");
    sandbox.stop().await;
}

const DISTRACTORS: [&str; 6] = [
    "I had pasta for dinner with my sister",
    "The weather has been rainy all week",
    "My manager moved the team meeting to Friday",
    "I started reading a novel about a lighthouse keeper",
    "We repainted the kitchen a pale green",
    "My phone battery dies too quickly",
];

#[tokio::test]
async fn rare_keywords_need_keyword_search_and_paraphrases_need_semantic_search() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let mut inputs: Vec<pb::MemoryInput> = DISTRACTORS.iter().map(|t| text(t)).collect();
    let order = "Order QX-7731 ships through Brightwater Freight";
    let cat = "I adopted a cat named Miso";
    inputs.extend([text(order), text(cat)]);
    remember(&mut client, "u", inputs).await;

    let rare = "brightwater qx-7731";
    for mode in [pb::SearchMode::Keyword, pb::SearchMode::Hybrid] {
        let found = recall(&mut client, request("u", rare, mode)).await;
        assert_eq!(texts(&found)[0], order, "{mode:?}: {:?}", texts(&found));
        assert_explained(&found);
    }
    let paraphrase = "which animal companion lives with me";
    for mode in [pb::SearchMode::Semantic, pb::SearchMode::Hybrid] {
        let found = recall(&mut client, request("u", paraphrase, mode)).await;
        assert_eq!(texts(&found)[0], cat, "{mode:?}: {:?}", texts(&found));
        assert_explained(&found);
    }
    // Keyword search alone cannot see a paraphrase: no word in common.
    let found = recall(
        &mut client,
        request("u", paraphrase, pb::SearchMode::Keyword),
    )
    .await;
    assert!(!texts(&found).contains(&cat), "{:?}", texts(&found));
    sandbox.stop().await;
}

#[tokio::test]
async fn last_week_prefers_last_week_and_an_explicit_range_excludes_the_rest() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    // The request is made on Wednesday 2023-05-17: last week is 8..=14 May.
    let now = date(2023, 5, 17);
    let last_week = [
        ("I went climbing at the indoor gym", date(2023, 5, 9)),
        (
            "I baked sourdough bread with my neighbour",
            date(2023, 5, 13),
        ),
    ];
    let earlier = [
        (
            "I went hiking up the hill behind the village",
            date(2023, 3, 2),
        ),
        ("I played tennis with my cousin", date(2023, 2, 11)),
        ("I went to a concert downtown", date(2023, 4, 20)),
        ("I visited the science museum", date(2023, 1, 15)),
    ];
    let inputs = last_week
        .iter()
        .chain(&earlier)
        .map(|(t, d)| message_on(t, *d))
        .collect();
    remember(&mut client, "u", inputs).await;

    let mut ask = request("u", "what did I do last week", pb::SearchMode::Hybrid);
    ask.request_time = at(now).map(|mut t| {
        t.seconds += 15 * 3600;
        t
    });
    let found = recall(&mut client, ask.clone()).await;
    assert_explained(&found);
    let top: Vec<&str> = texts(&found)[..2].to_vec();
    for (t, _) in &last_week {
        assert!(
            top.contains(t),
            "last week's memories first: {:?}",
            texts(&found)
        );
    }
    assert!(
        found.hits[..2]
            .iter()
            .all(|h| h.explanation.as_ref().unwrap().temporal_rank > 0)
    );

    // An explicit range is a filter: nothing outside it comes back.
    ask.filter = Some(pb::Filter {
        event_after: at(date(2023, 2, 1)),
        event_before: at(date(2023, 3, 31)),
        ..Default::default()
    });
    let found = recall(&mut client, ask).await;
    let mut inside = texts(&found);
    inside.sort();
    assert_eq!(
        inside,
        [
            "I played tennis with my cousin",
            "I went hiking up the hill behind the village"
        ]
    );
    sandbox.stop().await;
}

#[tokio::test]
async fn with_a_half_life_the_more_recent_of_two_equal_memories_ranks_first() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    // The same words twice, the recent one written last (so it has the later id).
    let words = "I renewed my passport at the embassy";
    let ids = remember(
        &mut client,
        "u",
        vec![
            message_on(words, date(2022, 1, 10)),
            message_on(words, date(2023, 5, 1)),
        ],
    )
    .await;
    let mut ask = request("u", "passport renewal", pb::SearchMode::Hybrid);
    ask.recency_half_life = Some(engram_proto::prost_types::Duration {
        seconds: 30 * 86_400,
        nanos: 0,
    });
    ask.request_time = at(date(2023, 5, 17));
    let found = recall(&mut client, ask).await;
    assert_explained(&found);
    let first = found.hits[0].memory.as_ref().unwrap();
    assert_eq!(first.id, ids[1], "{found:?}");
    let factors: Vec<f32> = found
        .hits
        .iter()
        .map(|h| h.explanation.as_ref().unwrap().recency_factor)
        .collect();
    assert!(factors[0] > factors[1], "{factors:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_write_makes_its_scope_s_cached_results_stale_and_leaves_other_scopes_cached() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    remember(
        &mut client,
        "alice",
        vec![text("I keep bees in the garden")],
    )
    .await;
    remember(&mut client, "bob", vec![text("I collect vinyl records")]).await;
    let alice = request("alice", "what hobbies do I have", pb::SearchMode::Hybrid);
    let bob = request("bob", "what hobbies do I have", pb::SearchMode::Hybrid);

    let first = recall(&mut client, alice.clone()).await;
    assert!(!first.cache_hit);
    let again = recall(&mut client, alice.clone()).await;
    assert!(again.cache_hit, "the same Recall again is a cache hit");
    assert_eq!(texts(&again), texts(&first));
    // Whitespace does not make a different query.
    let spaced = pb::RecallRequest {
        query: "  what   hobbies do I  have ".into(),
        ..alice.clone()
    };
    assert!(recall(&mut client, spaced).await.cache_hit);
    let bypass = pb::RecallRequest {
        bypass_cache: true,
        ..alice.clone()
    };
    assert!(!recall(&mut client, bypass).await.cache_hit);
    assert!(!recall(&mut client, bob.clone()).await.cache_hit);
    assert!(recall(&mut client, bob.clone()).await.cache_hit);

    remember(
        &mut client,
        "alice",
        vec![text("I also do pottery on weekends")],
    )
    .await;
    let after = recall(&mut client, alice.clone()).await;
    assert!(
        !after.cache_hit,
        "a write to the scope invalidates its results"
    );
    assert!(
        texts(&after).contains(&"I also do pottery on weekends"),
        "{:?}",
        texts(&after)
    );
    assert!(
        recall(&mut client, bob).await.cache_hit,
        "another scope's results stay cached"
    );
    assert!(recall(&mut client, alice).await.cache_hit);
    sandbox.stop().await;
}

#[tokio::test]
async fn a_write_through_one_replica_invalidates_the_cache_of_another() {
    let sandbox = Sandbox::start().await;
    let metrics = engram_telemetry::Metrics::new();
    let redis = || {
        engram_cache::Redis::connect(
            engram_cache::RedisConfig::new(sandbox.redis_url()),
            &metrics,
        )
        .unwrap()
    };
    let cache_metrics = engram_cache::CacheMetrics::new(&metrics);
    let replica = |redis| {
        engram_retrieval::ResultCache::new(
            engram_retrieval::RetrievalArgs::in_dir(sandbox.data_dir())
                .result_cache()
                .expect("on by default"),
            Some(redis),
            &cache_metrics,
            &Default::default(),
        )
    };
    let (one, two) = (replica(redis()), replica(redis()));
    let tenant = TenantId::parse("t").unwrap();
    let query = RecallQuery::new(Scope::user("u"), "anything", 5);
    let key = two.key(&tenant, &query).await.unwrap();
    assert_eq!(
        one.key(&tenant, &query).await.unwrap(),
        key,
        "replicas agree"
    );
    let write =
        engram_domain::api::IndexWrites::new(vec![engram_domain::api::IndexOp::DeleteScope(
            Scope::user("u"),
        )]);
    one.invalidate(&engram_retrieval::ResultCache::touched(&tenant, &write))
        .await;
    let after = two.key(&tenant, &query).await.unwrap();
    assert_ne!(
        after, key,
        "the other replica no longer reaches the old result"
    );
    let other_user = RecallQuery::new(Scope::user("v"), "anything", 5);
    let before_v = one.key(&tenant, &other_user).await.unwrap();
    one.invalidate(&engram_retrieval::ResultCache::touched(&tenant, &write))
        .await;
    assert_eq!(two.key(&tenant, &other_user).await.unwrap(), before_v);
    sandbox.stop().await;
}

#[tokio::test]
async fn filters_select_alone_and_combined_and_never_cross_tenants_or_users() {
    let sandbox = Sandbox::start().await;
    let ingestion = IngestionClient::connect(
        &sandbox.peers(),
        "ingestion",
        &format!("http://{}", sandbox.addrs.ingestion),
    )
    .unwrap();
    let index = sandbox.index();
    let memory = |t: &str, kind, tags: &[&str], day: Date, source: &str| NewMemory {
        text: t.to_string(),
        kind,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        event_time: Some(day.start()),
        metadata: BTreeMap::from([("source".to_string(), source.to_string())]),
        ..NewMemory::default()
    };
    use engram_domain::model::Kind::{Fact, Message};
    let data = vec![
        memory(
            "Caroline moved to Boston",
            Fact,
            &["move", "city"],
            date(2023, 1, 5),
            "chat",
        ),
        memory(
            "Melanie painted a sunset",
            Message,
            &["art"],
            date(2023, 2, 5),
            "chat",
        ),
        memory(
            "Caroline started pottery classes",
            Message,
            &["art", "class"],
            date(2023, 3, 5),
            "email",
        ),
        memory(
            "The budget meeting is on Monday",
            Fact,
            &["work"],
            date(2023, 4, 5),
            "email",
        ),
    ];
    let (a, b) = (
        TenantId::parse("tenant-a").unwrap(),
        TenantId::parse("tenant-b").unwrap(),
    );
    for (tenant, user) in [(&a, "u"), (&a, "other"), (&b, "u")] {
        ingestion
            .submit(
                tenant,
                RememberBatch {
                    scope: Scope::user(user),
                    memories: data.clone(),
                    mode: WriteMode::Sync,
                    extract: false,
                    privacy: None,
                },
            )
            .await
            .unwrap();
    }
    let search = |tenant: TenantId, user: &'static str, filter: Filter| {
        let index = &index;
        let mut query = RecallQuery::new(Scope::user(user), "what happened", 20);
        query.filter = filter;
        query.explain = true;
        async move {
            let found = index.search(&tenant, query).await.unwrap();
            for hit in &found.hits {
                assert_eq!(hit.memory.tenant, tenant);
                assert_eq!(hit.memory.scope.user_id, user);
            }
            let mut texts: Vec<String> = found.hits.into_iter().map(|h| h.memory.text).collect();
            texts.sort();
            texts
        }
    };
    let cases: Vec<(Filter, Vec<&str>)> = vec![
        (
            Filter {
                kinds: vec![Message],
                ..Filter::default()
            },
            vec![
                "Caroline started pottery classes",
                "Melanie painted a sunset",
            ],
        ),
        (
            Filter {
                tags_any: vec!["work".into(), "move".into()],
                ..Filter::default()
            },
            vec![
                "Caroline moved to Boston",
                "The budget meeting is on Monday",
            ],
        ),
        (
            Filter {
                tags_all: vec!["art".into(), "class".into()],
                ..Filter::default()
            },
            vec!["Caroline started pottery classes"],
        ),
        (
            Filter {
                entities_any: vec!["Caroline".into()],
                ..Filter::default()
            },
            vec![
                "Caroline moved to Boston",
                "Caroline started pottery classes",
            ],
        ),
        (
            Filter {
                event_after: Some(date(2023, 2, 1).start()),
                event_before: Some(date(2023, 4, 1).start()),
                ..Filter::default()
            },
            vec![
                "Caroline started pottery classes",
                "Melanie painted a sunset",
            ],
        ),
        (
            Filter {
                metadata_equals: BTreeMap::from([("source".into(), "email".into())]),
                ..Filter::default()
            },
            vec![
                "Caroline started pottery classes",
                "The budget meeting is on Monday",
            ],
        ),
        (
            Filter {
                kinds: vec![Message],
                tags_any: vec!["art".into()],
                entities_any: vec!["Caroline".into()],
                event_after: Some(date(2023, 1, 1).start()),
                metadata_equals: BTreeMap::from([("source".into(), "email".into())]),
                ..Filter::default()
            },
            vec!["Caroline started pottery classes"],
        ),
    ];
    for (filter, expected) in cases {
        for (tenant, user) in [(&a, "u"), (&a, "other"), (&b, "u")] {
            assert_eq!(
                search(tenant.clone(), user, filter.clone()).await,
                expected,
                "{tenant} {user} {filter:?}"
            );
        }
        // A tenant or user with nothing sees nothing, whatever the filter.
        let stranger = TenantId::parse("tenant-c").unwrap();
        assert!(search(stranger, "u", filter.clone()).await.is_empty());
        assert!(search(a.clone(), "nobody", filter).await.is_empty());
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn locomo_eval_ingests_once_and_scores_the_evidence_turns() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let dir = tempfile::tempdir().unwrap();
    let conversation = serde_json::json!({
        "speaker_a": "Ana",
        "speaker_b": "Ben",
        "session_1_date_time": "10:00 am on 3 March, 2023",
        "session_1": [
            {"speaker": "Ana", "dia_id": "D1:1", "text": "I just adopted a greyhound named Comet."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "Congrats! I am learning to play the cello."},
        ],
        "session_2_date_time": "4:30 pm on 9 April, 2023",
        "session_2": [
            {"speaker": "Ana", "dia_id": "D2:1", "text": "Comet won a race at the county fair!"},
            {"speaker": "Ben", "dia_id": "D2:2", "text": "My cello teacher moved to Lisbon."},
        ],
        "qa": [
            {"question": "What is the name of Ana's dog?", "answer": "Comet", "evidence": ["D1:1"], "category": 4},
            {"question": "What instrument does Ben play?", "answer": "cello", "evidence": ["D1:2"], "category": 4},
            {"question": "Where did Ben's teacher move?", "answer": "Lisbon", "evidence": ["D2:2"], "category": 1},
            {"question": "What is Ana's favourite colour?", "answer": "n/a", "evidence": [], "category": 5},
        ]
    });
    std::fs::write(dir.path().join("tiny.json"), conversation.to_string()).unwrap();
    let conversations = engram_cli::eval::read_dir(dir.path()).unwrap();
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0].turns.len(), 4);
    let created = engram_cli::eval::ingest(&mut client, &conversations[0])
        .await
        .unwrap();
    assert_eq!(created, 4);
    let again = engram_cli::eval::ingest(&mut client, &conversations[0])
        .await
        .unwrap();
    assert_eq!(again, 0, "a second run stores nothing twice");

    let report = engram_cli::eval::evaluate(&mut client, &conversations, 2)
        .await
        .unwrap();
    assert_eq!(report.questions, 3, "category 5 is not scored");
    assert_eq!(report.modes.len(), 3);
    let hybrid = &report.modes[0];
    assert_eq!(hybrid.mode, "hybrid");
    assert_eq!(hybrid.categories["single-hop"].questions, 2);
    assert_eq!(hybrid.categories["multi-hop"].questions, 1);
    assert_eq!(hybrid.overall.recall_any, 1.0, "{report:?}");
    assert!(hybrid.overall.mrr > 0.5);
    assert!(engram_cli::eval::table(&report).contains("overall"));
    // Per question: the rank of each evidence turn in every mode.
    assert_eq!(report.results.len(), 3);
    for result in &report.results {
        assert_eq!(result.ranks.len(), 3, "{result:?}");
        assert!(
            result
                .ranks
                .values()
                .all(|r| r.len() == result.evidence.len())
        );
    }

    // Cross-validation over two copies of the conversation (two users): each fold chooses on
    // one and scores the other, category 5 included in the relevance figures.
    std::fs::write(dir.path().join("twin.json"), conversation.to_string()).unwrap();
    let conversations = engram_cli::eval::read_dir(dir.path()).unwrap();
    engram_cli::eval::ingest(&mut client, &conversations[1])
        .await
        .unwrap();
    let candidates = engram_cli::eval::candidates(&mut client, &conversations)
        .await
        .unwrap();
    assert_eq!(candidates.len(), 8, "every question, category 5 too");
    let dog = &candidates[0];
    assert!(
        dog.candidates
            .iter()
            .any(|c| c.dia_id == "D1:1" && c.dense_rank > 0 && c.keyword_rank > 0),
        "{dog:?}"
    );
    let cv = engram_cli::crossval::run(&candidates, 2, 2);
    assert_eq!(cv.folds.len(), 2);
    assert_eq!(cv.held_out.questions, 6);
    assert_eq!(cv.in_sample.questions, 6);
    for fold in &cv.folds {
        assert_eq!(fold.held_out.len(), 1);
        let hybrid = fold.held_out_figures.recall["hybrid"];
        assert!(hybrid.iter().all(|v| (0.0..=1.0).contains(v)), "{fold:?}");
        assert!((0.05..=0.95).contains(&fold.choices.dense_share));
    }
    assert_eq!(cv.held_out.recall["hybrid"][0], 1.0, "{cv:?}");
    assert!(engram_cli::crossval::table(&cv).contains("held-out"));
    sandbox.stop().await;
}

#[tokio::test]
async fn relevance_is_comparable_across_queries_and_min_score_cuts_by_it() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let nurse = "I work night shifts as a nurse";
    remember(
        &mut client,
        "u",
        vec![text("I adopted a cat named Miso"), text(nurse)],
    )
    .await;
    for mode in [
        pb::SearchMode::Hybrid,
        pb::SearchMode::Semantic,
        pb::SearchMode::Keyword,
    ] {
        let found = recall(
            &mut client,
            request("u", "where do I work as a nurse", mode),
        )
        .await;
        assert_eq!(texts(&found)[0], nurse, "{mode:?}: {found:?}");
        assert!(
            found
                .hits
                .iter()
                .all(|h| (0.0..=1.0).contains(&h.relevance)),
            "{found:?}"
        );
        // The unrelated memory (if any strategy returned it) is far less relevant.
        if let Some(other) = found.hits.get(1) {
            assert!(other.relevance < found.hits[0].relevance / 2.0, "{found:?}");
        }
    }
    // HYBRID's fused score is per query; the relevance is not: the answer to a matching
    // question is more relevant than the best hit of a question nothing answers.
    let matching = recall(
        &mut client,
        request("u", "night shifts nurse", pb::SearchMode::Hybrid),
    )
    .await;
    let nothing = recall(
        &mut client,
        request(
            "u",
            "which planet has the largest moon",
            pb::SearchMode::Hybrid,
        ),
    )
    .await;
    assert!(
        nothing
            .hits
            .iter()
            .all(|h| h.relevance < matching.hits[0].relevance),
        "{matching:?} vs {nothing:?}"
    );
    // min_score applies to the relevance.
    let floor = matching.hits[0].relevance * 0.9;
    let cut = recall(
        &mut client,
        pb::RecallRequest {
            min_score: Some(floor),
            ..request("u", "night shifts nurse", pb::SearchMode::Hybrid)
        },
    )
    .await;
    assert_eq!(texts(&cut), [nurse], "{cut:?}");
    let none = recall(
        &mut client,
        pb::RecallRequest {
            min_score: Some(floor),
            ..request(
                "u",
                "which planet has the largest moon",
                pb::SearchMode::Hybrid,
            )
        },
    )
    .await;
    assert!(none.hits.is_empty(), "{none:?}");
    sandbox.stop().await;
}
