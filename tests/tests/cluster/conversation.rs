//! Conversations: Converse streaming through the fake chat model (its failures, hangs and
//! disconnects), session history (and its survival of a Redis flush), BuildContext's budget,
//! the privacy guard end to end, and LLM fact extraction — with the real local model for
//! embeddings and a real Redis.

use std::time::Duration;

use engram_proto::tonic::Code;
use engram_tests::{
    ChatBehavior, ChatClient, FakeProvider, Options, Sandbox, eventually, fast_policy, pb,
};

type Client = engram_cli::Client;

fn scope(user: &str, session: &str) -> Option<pb::Scope> {
    Some(pb::Scope {
        user_id: user.into(),
        session_id: session.into(),
        ..Default::default()
    })
}

/// A sandbox whose chat model (`fake`, returned) is down: extractions wait for it.
async fn chat_down() -> (FakeProvider, Sandbox) {
    let fake = FakeProvider::start(8).await;
    let sandbox = Sandbox::start_with(None, Options::with_chat(&fake, fast_policy())).await;
    fake.set_chat_default(ChatBehavior::Status {
        status: 503,
        retry_after: None,
    });
    (fake, sandbox)
}

/// Remember `texts` as `user`'s turns in session `s`, SYNC, with fact extraction.
async fn remember_extracting(
    client: &mut Client,
    user: &str,
    texts: &[&str],
) -> pb::RememberResponse {
    let turns = texts.iter().map(|t| turn("user", t)).collect();
    remember_in(client, scope(user, "s"), turns, true).await
}

/// Forget everything of `user`.
async fn forget_user(client: &mut Client, user: &str) -> pb::ForgetResponse {
    client
        .forget(pb::ForgetRequest {
            target: Some(pb::forget_request::Target::Scope(pb::Scope {
                user_id: user.into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap_or_else(|s| panic!("forget: {s:?}"))
        .into_inner()
}

async fn remember_sync(
    client: &mut Client,
    user: &str,
    session: &str,
    memories: Vec<pb::MemoryInput>,
) -> pb::RememberResponse {
    remember_in(client, scope(user, session), memories, false).await
}

/// Remember `memories` in `scope`, SYNC, with fact extraction or not.
async fn remember_in(
    client: &mut Client,
    scope: Option<pb::Scope>,
    memories: Vec<pb::MemoryInput>,
    extract: bool,
) -> pb::RememberResponse {
    client
        .remember(pb::RememberRequest {
            scope,
            memories,
            mode: pb::WriteMode::Sync.into(),
            extract,
            privacy: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("remember: {s:?}"))
        .into_inner()
}

fn fact(text: &str) -> pb::MemoryInput {
    pb::MemoryInput {
        text: text.into(),
        kind: pb::Kind::Fact.into(),
        ..Default::default()
    }
}

fn turn(role: &str, text: &str) -> pb::MemoryInput {
    pb::MemoryInput {
        text: text.into(),
        kind: pb::Kind::Message.into(),
        role: role.into(),
        ..Default::default()
    }
}

fn converse_request(user: &str, session: &str, message: &str) -> pb::ConverseRequest {
    pb::ConverseRequest {
        scope: scope(user, session),
        message: message.into(),
        ..Default::default()
    }
}

/// Every event of a Converse until the stream ends (bounded, so a hung stream fails the test
/// instead of hanging it).
async fn converse(
    chat: &mut ChatClient,
    request: pb::ConverseRequest,
) -> Vec<pb::converse_event::Event> {
    let mut stream = chat
        .converse(request)
        .await
        .unwrap_or_else(|s| panic!("converse: {s:?}"))
        .into_inner();
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .unwrap_or_else(|_| panic!("the Converse stream hung after {events:?}"));
        match next {
            Ok(Some(event)) => events.extend(event.event),
            Ok(None) => return events,
            Err(status) => panic!("the Converse stream failed: {status:?} after {events:?}"),
        }
    }
}

fn deltas(events: &[pb::converse_event::Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            pb::converse_event::Event::Delta(d) => Some(d.text.as_str()),
            _ => None,
        })
        .collect()
}

fn fallback(events: &[pb::converse_event::Event]) -> &pb::FallbackEvent {
    match events.last() {
        Some(pb::converse_event::Event::Fallback(f)) => f,
        other => panic!("expected a fallback event last, got {other:?} in {events:?}"),
    }
}

fn context(events: &[pb::converse_event::Event]) -> &pb::ContextEvent {
    match events.first() {
        Some(pb::converse_event::Event::Context(c)) => c,
        other => panic!("expected the context event first, got {other:?}"),
    }
}

async fn build_context(
    client: &mut Client,
    user: &str,
    session: &str,
    query: &str,
    budget: u32,
) -> pb::BuildContextResponse {
    client
        .build_context(pb::BuildContextRequest {
            scope: scope(user, session),
            query: query.into(),
            token_budget: budget,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("build_context: {s:?}"))
        .into_inner()
}

#[tokio::test]
async fn converse_streams_the_answer_after_its_context_and_remembers_the_turn() {
    let fake = FakeProvider::start(8).await;
    fake.set_reply("Lisbon is lovely in May, and Miso will enjoy the parks.");
    let sandbox = Sandbox::start_with(None, Options::with_chat(&fake, fast_policy())).await;
    let mut client = sandbox.client().await;
    let mut chat = sandbox.chat_client().await;
    remember_sync(
        &mut client,
        "ana",
        "",
        vec![
            fact("Ana moved to Lisbon in 2024."),
            fact("Ana has a dog named Miso."),
        ],
    )
    .await;

    let events = converse(
        &mut chat,
        converse_request("ana", "trip", "Where should I walk my dog?"),
    )
    .await;
    let ctx = context(&events);
    let recalled: Vec<&str> = ctx
        .memories
        .iter()
        .filter_map(|h| h.memory.as_ref())
        .map(|m| m.text.as_str())
        .collect();
    assert!(
        recalled.contains(&"Ana has a dog named Miso."),
        "{recalled:?}"
    );
    assert!(ctx.context_tokens > 0);
    assert_eq!(
        deltas(&events),
        "Lisbon is lovely in May, and Miso will enjoy the parks."
    );
    // Every delta comes after the context and before done, in order.
    assert!(
        events[1..events.len() - 1]
            .iter()
            .all(|e| matches!(e, pb::converse_event::Event::Delta(_)))
    );
    let Some(pb::converse_event::Event::Done(done)) = events.last() else {
        panic!("expected done last: {events:?}");
    };
    let usage = done.usage.unwrap_or_default();
    assert!(usage.reported_by_model);
    assert_eq!(usage.prompt_tokens, 42);
    let timings = done.timings.unwrap_or_default();
    assert!(
        timings.context_us <= timings.first_token_us && timings.first_token_us <= timings.total_us
    );
    assert_eq!(done.model, "fake-chat");

    // The model got the memories in its system prompt, then the user's message.
    let sent = fake.chat_requests();
    let messages = sent[0]["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(messages[0]["role"], "system");
    assert!(
        messages[0]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("- [")
    );
    assert!(
        messages[0]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("Ana has a dog named Miso.")
    );
    assert_eq!(
        messages.last().map(|m| m["content"].clone()),
        Some("Where should I walk my dog?".into())
    );
    assert_eq!(sent[0]["stream"], true);

    // The turn is in the session's history, then recallable.
    let history = eventually("the turn in the history", || {
        let mut client = client.clone();
        async move {
            let built = build_context(&mut client, "ana", "trip", "dog", 1000).await;
            (built.turns.len() == 2).then_some(built)
        }
    })
    .await;
    assert_eq!(history.turns[0].role, "user");
    assert_eq!(history.turns[0].text, "Where should I walk my dog?");
    assert_eq!(history.turns[1].role, "assistant");
    assert!(history.context.contains(
        "## Recent conversation\nuser: Where should I walk my dog?\nassistant: Lisbon is lovely"
    ));
    eventually("the answer recallable", || {
        let mut client = client.clone();
        async move {
            let found = client
                .recall(pb::RecallRequest {
                    scope: scope("ana", ""),
                    query: "parks in May".into(),
                    top_k: 5,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            found
                .hits
                .iter()
                .any(|h| {
                    h.memory
                        .as_ref()
                        .is_some_and(|m| m.text.contains("enjoy the parks"))
                })
                .then_some(())
        }
    })
    .await;

    // The next turn sees the previous one as history, sent as chat messages.
    converse(
        &mut chat,
        converse_request("ana", "trip", "And in the evening?"),
    )
    .await;
    let sent = fake.chat_requests();
    let messages = sent[1]["messages"].as_array().cloned().unwrap_or_default();
    let roles: Vec<&str> = messages.iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    sandbox.stop().await;
}

#[tokio::test]
async fn model_failures_end_in_a_fallback_with_the_context() {
    let fake = FakeProvider::start(8).await;
    let mut policy = fast_policy();
    policy.breaker.consecutive_failures = 6;
    let sandbox = Sandbox::start_with(None, Options::with_chat(&fake, policy)).await;
    let mut client = sandbox.client().await;
    let mut chat = sandbox.chat_client().await;
    remember_sync(
        &mut client,
        "bo",
        "",
        vec![fact("Bo is allergic to peanuts.")],
    )
    .await;
    let ask = || converse_request("bo", "s1", "What snacks can I eat?");

    // Mid-answer silence: the idle timeout ends it, with what was said flagged partial.
    fake.then_chat(ChatBehavior::StallAfter(2));
    let events = converse(&mut chat, ask()).await;
    assert_eq!(deltas(&events), "Hello from");
    let f = fallback(&events);
    assert!(f.partial);
    assert!(
        f.reason.contains("ENGRAM_CHAT_IDLE_TIMEOUT"),
        "{}",
        f.reason
    );
    assert!(
        f.context.contains("Bo is allergic to peanuts."),
        "{}",
        f.context
    );

    // A model that never answers: each attempt times out, then a fallback.
    fake.set_chat_default(ChatBehavior::Hang);
    let events = converse(&mut chat, ask()).await;
    let f = fallback(&events);
    assert!(!f.partial);
    assert_eq!(deltas(&events), "");
    assert!(f.reason.contains("timed out"), "{}", f.reason);
    assert_eq!(f.memories.len(), 1);
    assert!(matches!(events[0], pb::converse_event::Event::Context(_)));

    // 500s: retried, then a fallback naming the status.
    fake.set_chat_default(ChatBehavior::Status {
        status: 500,
        retry_after: None,
    });
    let before = fake.chat_requests().len();
    let events = converse(&mut chat, ask()).await;
    let f = fallback(&events);
    assert!(f.reason.contains("500"), "{}", f.reason);
    // The provider's body is logged, never sent to the caller.
    assert!(!f.reason.contains("scripted failure"), "{}", f.reason);
    assert_eq!(f.code, "UNAVAILABLE");
    assert_eq!(fake.chat_requests().len() - before, 3, "three attempts");

    // Six failures in a row opened the circuit: the next call fails fast, without a request.
    let before = fake.chat_requests().len();
    let events = converse(&mut chat, ask()).await;
    let f = fallback(&events);
    assert!(f.reason.contains("circuit is open"), "{}", f.reason);
    assert_eq!(fake.chat_requests().len(), before);
    assert!(f.context.contains("Bo is allergic to peanuts."));
    sandbox.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_model_call() {
    let fake = FakeProvider::start(8).await;
    let sandbox = Sandbox::start_with(None, Options::with_chat(&fake, fast_policy())).await;
    let mut chat = sandbox.chat_client().await;
    fake.set_word_delay(Duration::from_millis(20));
    fake.then_chat(ChatBehavior::StallAfter(3));
    let mut stream = chat
        .converse(converse_request("cy", "s", "Tell me a long story."))
        .await
        .unwrap_or_else(|s| panic!("converse: {s:?}"))
        .into_inner();
    let mut seen = 0;
    while seen < 2 {
        match stream.message().await {
            Ok(Some(pb::ConverseEvent {
                event: Some(pb::converse_event::Event::Delta(_)),
            })) => seen += 1,
            Ok(Some(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(stream);
    drop(chat);
    eventually("the provider to see the connection closed", || async {
        (fake.chat_disconnects() >= 1).then_some(())
    })
    .await;
    assert_eq!(fake.in_flight(), 0);
    sandbox.stop().await;
}

#[tokio::test]
async fn build_context_stays_within_its_budget_and_keeps_the_most_relevant() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let facts: Vec<pb::MemoryInput> = (0..30)
        .map(|i| {
            fact(&format!(
                "Dee's trip number {i} went to a city with a long and storied history of trade."
            ))
        })
        .collect();
    remember_sync(&mut client, "dee", "", facts).await;
    remember_sync(
        &mut client,
        "dee",
        "chat",
        vec![
            turn("user", "I want to plan another trip."),
            turn("assistant", "Where to?"),
        ],
    )
    .await;

    let full = build_context(
        &mut client,
        "dee",
        "chat",
        "trips to trading cities",
        32_768,
    )
    .await;
    assert_eq!(full.dropped, 0);
    assert_eq!(full.memories.len(), 20, "max_memories defaults to 20");
    assert_eq!(full.turns.len(), 2);
    assert_eq!(full.tokenizer, "o200k_base");
    let ranked: Vec<String> = full
        .memories
        .iter()
        .filter_map(|h| h.memory.as_ref())
        .map(|m| m.id.clone())
        .collect();
    for budget in [1, 10, 40, 100, 200, 400] {
        let cut = build_context(
            &mut client,
            "dee",
            "chat",
            "trips to trading cities",
            budget,
        )
        .await;
        assert!(
            cut.token_count <= budget,
            "{} tokens for a budget of {budget}",
            cut.token_count
        );
        let kept: Vec<String> = cut
            .memories
            .iter()
            .filter_map(|h| h.memory.as_ref())
            .map(|m| m.id.clone())
            .collect();
        assert_eq!(
            kept,
            ranked[..kept.len()],
            "budget {budget} kept a prefix of the ranking"
        );
        assert_eq!(cut.dropped as usize, 22 - kept.len() - cut.turns.len());
        if budget >= 100 {
            assert!(!kept.is_empty());
            assert!(
                cut.context.starts_with("## Relevant memories\n- ["),
                "{}",
                cut.context
            );
        }
    }
    let bad = client
        .build_context(pb::BuildContextRequest {
            scope: scope("dee", ""),
            query: "x".into(),
            token_budget: 1_000_000,
            ..Default::default()
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("an oversized budget was accepted"));
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("token_budget"), "{}", bad.message());
    sandbox.stop().await;
}

#[tokio::test]
async fn history_survives_a_redis_flush() {
    let sandbox = Sandbox::start().await;
    let mut client = sandbox.client().await;
    let turns: Vec<pb::MemoryInput> = (0..12)
        .map(|i| {
            turn(
                if i % 2 == 0 { "user" } else { "assistant" },
                &format!("turn {i}"),
            )
        })
        .collect();
    remember_sync(&mut client, "eli", "s", turns).await;
    let before = build_context(&mut client, "eli", "s", "turn", 1000).await;
    let texts =
        |r: &pb::BuildContextResponse| r.turns.iter().map(|t| t.text.clone()).collect::<Vec<_>>();
    let expected: Vec<String> = (2..12).map(|i| format!("turn {i}")).collect();
    assert_eq!(texts(&before), expected, "the last 10 turns, oldest first");

    let pool =
        engram_cache::pool("test", &sandbox.redis_url().into()).unwrap_or_else(|e| panic!("{e}"));
    let mut conn = pool.get().await.unwrap_or_else(|e| panic!("{e}"));
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let after = build_context(&mut client, "eli", "s", "turn", 1000).await;
    assert_eq!(texts(&after), expected, "rebuilt from the index");
    // And cached again: a new turn is appended to the rebuilt list.
    remember_sync(&mut client, "eli", "s", vec![turn("user", "turn 12")]).await;
    let latest = build_context(&mut client, "eli", "s", "turn", 1000).await;
    assert_eq!(texts(&latest).last().map(String::as_str), Some("turn 12"));
    // Forgetting the user empties the history.
    forget_user(&mut client, "eli").await;
    let forgotten = build_context(&mut client, "eli", "s", "turn", 1000).await;
    assert!(forgotten.turns.is_empty(), "{:?}", texts(&forgotten));
    sandbox.stop().await;
}

#[tokio::test]
async fn the_privacy_guard_redacts_or_blocks_before_storage_and_the_model() {
    let fake = FakeProvider::start(8).await;
    let mut options = Options::with_chat(&fake, fast_policy());
    options.common.privacy.tenant_privacy = "default=redact".into();
    let sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let mut chat = sandbox.chat_client().await;
    let raw = "Reach me at fay@example.com or +44 20 7946 0958; card 4111 1111 1111 1111.";

    // redact (the tenant's mode): placeholders are stored, never the values.
    let written = remember_sync(&mut client, "fay", "", vec![fact(raw)]).await;
    let got = client
        .get(pb::GetRequest {
            ids: vec![written.results[0].id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("get: {s:?}"))
        .into_inner();
    assert_eq!(
        got.memories[0].text,
        "Reach me at [EMAIL] or [PHONE]; card [CARD]."
    );

    // block, asked by the request: refused, naming the field and the kinds; nothing stored.
    let refused = client
        .remember(pb::RememberRequest {
            scope: scope("fay", "blocked"),
            memories: vec![fact("nothing personal"), fact(raw)],
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: pb::PrivacyMode::Block.into(),
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("a blocked write was accepted"));
    assert_eq!(refused.code(), Code::InvalidArgument);
    let message = refused.message();
    assert!(message.contains("memories[1].text"), "{message}");
    for kind in [
        "an email address",
        "a phone number",
        "a payment card number",
    ] {
        assert!(message.contains(kind), "{message}");
    }
    let listed = client
        .list(pb::ListRequest {
            scope: scope("fay", "blocked"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("list: {s:?}"))
        .into_inner();
    assert!(listed.memories.is_empty());
    // A request cannot loosen the tenant's mode.
    let loosened = remember_sync_with(&mut client, "fay", raw, pb::PrivacyMode::Off).await;
    assert!(!loosened.contains("fay@example.com"));

    // Converse: the model never sees the raw values; the turn is stored redacted.
    let events = converse(
        &mut chat,
        converse_request(
            "fay",
            "c",
            &format!(
                "My email is fay@example.com, key sk-proj-{}",
                "a".repeat(24)
            ),
        ),
    )
    .await;
    assert_eq!(context(&events).redacted, ["secret", "email"]);
    let body = fake
        .chat_requests()
        .last()
        .map(|b| b.to_string())
        .unwrap_or_default();
    assert!(
        !body.contains("fay@example.com") && !body.contains("sk-proj-"),
        "{body}"
    );
    assert!(
        body.contains("[EMAIL]") && body.contains("[SECRET]"),
        "{body}"
    );
    let history = eventually("the redacted turn", || {
        let mut client = client.clone();
        async move {
            let built = build_context(&mut client, "fay", "c", "email", 1000).await;
            (!built.turns.is_empty()).then_some(built)
        }
    })
    .await;
    assert!(history.turns[0].text.contains("[EMAIL]"));
    assert!(!history.context.contains("fay@example.com"));

    // block on Converse: refused before anything is sent.
    let before = fake.chat_requests().len();
    let mut request = converse_request("fay", "c", "card 4111 1111 1111 1111");
    request.privacy = pb::PrivacyMode::Block.into();
    let refused = chat
        .converse(request)
        .await
        .err()
        .unwrap_or_else(|| panic!("a blocked message was accepted"));
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("message")
            && refused.message().contains("a payment card number"),
        "{}",
        refused.message()
    );
    assert_eq!(fake.chat_requests().len(), before);
    sandbox.stop().await;
}

/// Remember `text` with the request's privacy mode `mode`; the stored text.
async fn remember_sync_with(
    client: &mut Client,
    user: &str,
    text: &str,
    mode: pb::PrivacyMode,
) -> String {
    let written = client
        .remember(pb::RememberRequest {
            scope: scope(user, "loose"),
            memories: vec![fact(text)],
            mode: pb::WriteMode::Sync.into(),
            extract: false,
            privacy: mode.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("remember: {s:?}"))
        .into_inner();
    let got = client
        .get(pb::GetRequest {
            ids: vec![written.results[0].id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("get: {s:?}"))
        .into_inner();
    got.memories[0].text.clone()
}

async fn facts_of(client: &mut Client, user: &str) -> Vec<pb::Memory> {
    client
        .list(pb::ListRequest {
            scope: scope(user, ""),
            filter: Some(pb::Filter {
                kinds: vec![pb::Kind::Fact.into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("list: {s:?}"))
        .into_inner()
        .memories
}

#[tokio::test]
async fn extraction_stores_linked_facts_and_dead_letters_malformed_answers() {
    let fake = FakeProvider::start(8).await;
    let mut options = Options::with_chat(&fake, fast_policy());
    options.write_log.max_deliveries = 2;
    let sandbox = Sandbox::start_with(None, options).await;
    let mut client = sandbox.client().await;
    let facts = r#"{"facts": ["Gus lives in Porto.", "Gus has a cat named Tofu."]}"#;
    fake.then_chat(ChatBehavior::Text(facts.into()));
    let written = client
        .remember(pb::RememberRequest {
            scope: scope("gus", "s"),
            memories: vec![turn("user", "I live in Porto with my cat Tofu.")],
            mode: pb::WriteMode::Async.into(),
            extract: true,
            privacy: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("remember: {s:?}"))
        .into_inner();
    let source = written.results[0].id.clone();
    let stored = eventually("two facts", || {
        let mut client = client.clone();
        async move {
            let facts = facts_of(&mut client, "gus").await;
            (facts.len() == 2).then_some(facts)
        }
    })
    .await;
    let mut texts: Vec<&str> = stored.iter().map(|m| m.text.as_str()).collect();
    texts.sort();
    assert_eq!(texts, ["Gus has a cat named Tofu.", "Gus lives in Porto."]);
    for fact in &stored {
        assert_eq!(fact.metadata.get("source_id"), Some(&source));
        assert_eq!(
            fact.metadata.get("extracted_by").map(String::as_str),
            Some("fake-chat")
        );
        assert_eq!(
            fact.scope.as_ref().map(|s| s.session_id.as_str()),
            Some("s")
        );
    }
    let asked = fake.chat_requests();
    assert_eq!(asked[0]["response_format"]["type"], "json_object");

    // The same facts again, from another turn: nothing new is stored.
    fake.then_chat(ChatBehavior::Text(
        r#"{"facts": ["Gus lives in Porto."]}"#.into(),
    ));
    let before = fake.chat_requests().len();
    client
        .remember(pb::RememberRequest {
            scope: scope("gus", "s"),
            memories: vec![turn("user", "Porto is home.")],
            mode: pb::WriteMode::Async.into(),
            extract: true,
            privacy: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("remember: {s:?}"));
    eventually("the second extraction", || async {
        (fake.chat_requests().len() > before).then_some(())
    })
    .await;

    // Malformed JSON: retried, then dead-lettered; other writes go on meanwhile.
    let log = sandbox.write_log();
    let dead_before = log.dead_letters().await.unwrap_or_else(|e| panic!("{e}"));
    fake.set_chat_default(ChatBehavior::Text("Sure! Gus lives in Porto.".into()));
    let before = fake.chat_requests().len();
    client
        .remember(pb::RememberRequest {
            scope: scope("gus", "s"),
            memories: vec![turn("user", "Tofu turned three.")],
            mode: pb::WriteMode::Async.into(),
            extract: true,
            privacy: 0,
        })
        .await
        .unwrap_or_else(|s| panic!("remember: {s:?}"));
    let other = remember_sync(&mut client, "gus", "", vec![fact("Gus speaks Portuguese.")]).await;
    assert_eq!(other.results[0].status(), pb::WriteStatus::Created);
    eventually("the malformed extraction dead-lettered", || {
        let log = log.clone();
        async move {
            let dead = log.dead_letters().await.ok()?;
            (dead > dead_before).then_some(())
        }
    })
    .await;
    assert!(
        fake.chat_requests().len() - before >= 2,
        "retried before dead-lettering"
    );
    let dead = log
        .dead_lettered(10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        dead.iter().any(|d| d.reason.contains("facts are unusable")),
        "{dead:?}"
    );
    let facts = facts_of(&mut client, "gus").await;
    assert_eq!(
        facts.len(),
        3,
        "the two extracted and the one written: {facts:?}"
    );

    // Without a chat model, extract is refused with a clear reason.
    sandbox.stop().await;
    let plain = Sandbox::start().await;
    let mut client = plain.client().await;
    let refused = client
        .remember(pb::RememberRequest {
            scope: scope("gus", ""),
            memories: vec![fact("x")],
            mode: pb::WriteMode::Async.into(),
            extract: true,
            privacy: 0,
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("extract without a model was accepted"));
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("ENGRAM_CHAT_BASE_URL"),
        "{}",
        refused.message()
    );
    plain.stop().await;
}

#[tokio::test]
async fn an_answer_ends_at_its_token_cap_whatever_the_model_does() {
    let fake = FakeProvider::start(8).await;
    // The fake ignores max_tokens: it streams all 400 words.
    fake.set_reply(&"word ".repeat(400));
    let sandbox = Sandbox::start_with(None, Options::with_chat(&fake, fast_policy())).await;
    let mut chat = sandbox.chat_client().await;
    let events = converse(
        &mut chat,
        pb::ConverseRequest {
            max_tokens: 20,
            ephemeral: true,
            ..converse_request("cap", "s", "Talk for a long time.")
        },
    )
    .await;
    let answered = deltas(&events);
    let words = answered.split_whitespace().count();
    assert!((15..=20).contains(&words), "{words} words: {answered:?}");
    match events.last() {
        Some(pb::converse_event::Event::Done(done)) => assert_eq!(done.finish_reason, "length"),
        other => panic!("expected done last, got {other:?}"),
    }
    // More than the API allows is refused before anything runs.
    let refused = chat
        .converse(pb::ConverseRequest {
            max_tokens: engram_domain::validate::MAX_ANSWER_TOKENS + 1,
            ..converse_request("cap", "s", "Hello")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn streams_are_capped_per_tenant_counted_in_flight_for_their_life_and_end_on_time() {
    let fake = FakeProvider::start(8).await;
    fake.set_reply("one two three four five");
    // One word, then silence: each stream stays open until its overall deadline.
    fake.set_chat_default(ChatBehavior::StallAfter(1));
    let mut options = Options::with_chat(&fake, fast_policy());
    options.chat.idle_timeout = Duration::from_secs(120);
    options.edge.converse_max_streams = 2;
    options.edge.converse_max_duration = Duration::from_secs(2);
    let sandbox = Sandbox::start_with(None, options).await;
    let mut chat = sandbox.chat_client().await;
    let request = || pb::ConverseRequest {
        ephemeral: true,
        ..converse_request("streams", "s", "Tell me a story.")
    };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = chat.converse(request()).await.unwrap().into_inner();
        // Until the first word: the stream is past its response head.
        loop {
            let event = stream.message().await.unwrap().unwrap().event;
            if matches!(event, Some(pb::converse_event::Event::Delta(_))) {
                break;
            }
        }
        open.push(stream);
    }
    let admin = sandbox.addrs.gateway_admin.unwrap();
    assert_eq!(
        engram_tests::metric(admin, "engram_gateway_in_flight").await,
        Some(2.0)
    );
    let refused = chat.converse(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("ENGRAM_CONVERSE_MAX_STREAMS"),
        "{refused:?}"
    );
    // Each stream ends at ENGRAM_CONVERSE_MAX_DURATION with a partial fallback.
    for mut stream in open {
        let mut last = None;
        while let Some(event) = stream.message().await.unwrap() {
            last = event.event;
        }
        match last {
            Some(pb::converse_event::Event::Fallback(f)) => {
                assert_eq!(f.code, "DEADLINE_EXCEEDED", "{f:?}");
                assert!(f.partial);
                assert!(f.reason.contains("ENGRAM_CONVERSE_MAX_DURATION"), "{f:?}");
            }
            other => panic!("expected a fallback last, got {other:?}"),
        }
    }
    // Their places are given back.
    eventually("the streams to leave the in-flight count", || async {
        (engram_tests::metric(admin, "engram_gateway_in_flight").await == Some(0.0)).then_some(())
    })
    .await;
    fake.set_chat_default(ChatBehavior::Reply);
    let events = converse(&mut chat, request()).await;
    assert!(matches!(
        events.last(),
        Some(pb::converse_event::Event::Done(_))
    ));
    sandbox.stop().await;
}

#[tokio::test]
async fn a_relevance_floor_leaves_unrelated_memories_out_of_the_context() {
    let sandbox = Sandbox::start_with(
        None,
        Options {
            edge: engram_gateway::EdgeArgs {
                context_min_relevance: 0.2,
                ..engram_gateway::EdgeArgs::default()
            },
            ..Options::default()
        },
    )
    .await;
    let mut client = sandbox.client().await;
    remember_sync(
        &mut client,
        "fay",
        "",
        vec![
            fact("Fay works night shifts as a nurse at the city hospital"),
            fact("Fay adopted a cat named Miso"),
        ],
    )
    .await;
    // Without the floor both memories would be offered; with it only the matching one is.
    let built = build_context(&mut client, "fay", "", "night shifts nurse hospital", 1000).await;
    let texts: Vec<&str> = built
        .memories
        .iter()
        .filter_map(|h| h.memory.as_ref().map(|m| m.text.as_str()))
        .collect();
    assert_eq!(
        texts,
        ["Fay works night shifts as a nurse at the city hospital"],
        "{built:?}"
    );
    assert!(built.memories.iter().all(|h| h.relevance >= 0.2));
    // A question nothing answers gets no memories section at all.
    let built = build_context(
        &mut client,
        "fay",
        "",
        "which planet has the largest moon",
        1000,
    )
    .await;
    assert!(built.memories.is_empty(), "{built:?}");
    assert!(!built.context.contains("Relevant memories"), "{built:?}");
    sandbox.stop().await;
}

/// Wait until every partition of `log` has nothing left to index.
async fn drained(what: &str, log: engram_writelog::WriteLog) {
    eventually(what, || {
        let log = log.clone();
        async move {
            for p in 0..log.partitions() {
                if log.depth(p).await.ok()?.backlog > 0 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

/// A message forgotten while its fact extraction waits for the chat model (down during the
/// Forget, up after) leaves no facts behind: the extraction finds its source gone before it
/// asks the model again, and facts already on their way are dropped by the worker that would
/// apply them after the Forget.
#[tokio::test]
async fn facts_of_a_message_forgotten_while_extraction_lags_are_never_stored() {
    let (fake, sandbox) = chat_down().await;
    let mut client = sandbox.client().await;
    let written =
        remember_extracting(&mut client, "hal", &["I moved to Lisbon with my dog Rex."]).await;
    assert_eq!(written.results[0].status(), pb::WriteStatus::Created);
    eventually("an extraction attempt during the outage", || async {
        (!fake.chat_requests().is_empty()).then_some(())
    })
    .await;

    let forgotten = forget_user(&mut client, "hal").await;
    assert_eq!(forgotten.forgotten, 1);

    // The model comes back, with facts from the forgotten message for whoever still asks.
    fake.set_chat_default(ChatBehavior::Text(
        r#"{"facts": ["Hal lives in Lisbon.", "Hal has a dog named Rex."]}"#.into(),
    ));
    drained(
        "the extraction log",
        sandbox.write_log().with_prefix("engram:extract"),
    )
    .await;
    drained("the write log", sandbox.write_log()).await;
    let left = client
        .list(pb::ListRequest {
            scope: scope("hal", ""),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("list: {s:?}"))
        .into_inner()
        .memories;
    assert!(left.is_empty(), "forgotten: {left:?}");
    sandbox.stop().await;
}

/// A reader that rebuilt a session's history from the index just before a Forget cannot cache
/// those turns after it: the Forget moves the user's epoch on, and the fill is refused.
#[tokio::test]
async fn a_history_read_before_a_forget_is_not_cached_after_it() {
    use engram_cache::history::History;
    use engram_domain::model::{Memory, MemoryId, NewMemory, Scope, TenantId, Timestamp};

    let sandbox = Sandbox::start().await;
    let redis = engram_cache::Redis::connect(
        engram_cache::RedisConfig::new(sandbox.redis_url()),
        &engram_telemetry::Metrics::new(),
    )
    .unwrap();
    let history = History::new(Some(redis), Duration::from_secs(600));
    let tenant = TenantId::parse("default").unwrap();
    let session = Scope {
        user_id: "ivy".into(),
        session_id: "s".into(),
        ..Scope::default()
    };
    let turn = Memory::from_input(
        MemoryId::new_time_ordered(),
        tenant.clone(),
        session.clone(),
        NewMemory {
            kind: engram_domain::model::Kind::Message,
            role: "user".into(),
            ..NewMemory::text("a turn about to be forgotten")
        },
        Timestamp::now(),
    );

    // The reader sees the epoch, reads the index (the turn is still there), and is slow.
    let seen = history.epoch(&tenant, "ivy").await.expect("Redis is up");
    let read = vec![turn.clone()];
    // Meanwhile the user is forgotten.
    history.invalidate_user(&tenant, "ivy").await;
    history.fill(&tenant, &session, &read, &seen).await;
    assert!(
        history.recent(&tenant, &session, 10).await.is_none(),
        "turns read before the Forget were cached after it"
    );

    // A reader after the Forget fills as usual.
    let now = history.epoch(&tenant, "ivy").await.expect("Redis is up");
    assert_ne!(now, seen);
    history.fill(&tenant, &session, &[], &now).await;
    assert_eq!(
        history.recent(&tenant, &session, 10).await,
        Some(Vec::new())
    );
    sandbox.stop().await;
}

/// Every value Redis holds, rendered as text (strings, lists, sets, hashes, streams), with
/// its key.
async fn every_redis_value(sandbox: &Sandbox) -> Vec<(String, String)> {
    let client = redis::Client::open(sandbox.redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut values = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
            ],
            "list" => redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "stream" => {
                let entries: redis::Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                vec![format!("{entries:?}").into_bytes()]
            }
            _ => Vec::new(),
        };
        let text: String = parts
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        values.push((key, text));
    }
    values
}

/// A Forget of a user with turns, facts extracted from them, a cached session history and
/// cached Recall results leaves nothing of them in Redis — no key or value holding their ids,
/// texts, content hashes or the names of their cached vectors — nor in the index, and its
/// receipt says what it removed. The chat model is down when the turns are written, so the
/// extraction lags, and comes back before the Forget.
#[tokio::test]
async fn a_forgotten_user_leaves_nothing_in_redis_and_the_receipt_says_what_went() {
    let (fake, sandbox) = chat_down().await;
    let mut client = sandbox.client().await;
    let texts = [
        "I moved to Lisbon with my dog Rex.",
        "My sister Ana teaches violin in Porto.",
    ];
    remember_extracting(&mut client, "kim", &texts).await;
    // Someone else's memory, which stays.
    remember_sync(
        &mut client,
        "lee",
        "s",
        vec![turn("user", "Lee keeps bees.")],
    )
    .await;
    eventually("an extraction attempt during the outage", || async {
        (!fake.chat_requests().is_empty()).then_some(())
    })
    .await;
    let facts = ["Kim lives in Lisbon.", "Kim has a dog named Rex."];
    fake.set_chat_default(ChatBehavior::Text(format!(
        r#"{{"facts": ["{}", "{}"]}}"#,
        facts[0], facts[1]
    )));
    drained(
        "the extraction log",
        sandbox.write_log().with_prefix("engram:extract"),
    )
    .await;
    drained("the write log", sandbox.write_log()).await;
    let listed = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            client
                .list(pb::ListRequest {
                    scope: scope("kim", ""),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .memories
        }
    };
    let stored = listed(&mut client).await;
    assert_eq!(stored.len(), 4, "two turns and two facts: {stored:?}");
    // A cached history and cached results.
    client
        .build_context(pb::BuildContextRequest {
            scope: scope("kim", "s"),
            query: "where does Kim live".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for query in ["where does Kim live", "who teaches violin"] {
        client
            .recall(pb::RecallRequest {
                scope: scope("kim", ""),
                query: query.into(),
                top_k: 5,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let forgotten = forget_user(&mut client, "kim").await;
    let receipt = forgotten.receipt.unwrap();
    assert_eq!(forgotten.forgotten, 4);
    assert_eq!((receipt.memories, receipt.facts), (4, 2), "{receipt:?}");
    assert!(receipt.cached_embeddings >= 4, "{receipt:?}");
    assert!(receipt.history_lists >= 1, "{receipt:?}");
    assert!(receipt.cached_results >= 2, "{receipt:?}");
    assert!(listed(&mut client).await.is_empty());

    // Nothing in Redis names or holds any of it.
    let tenant = engram_domain::model::TenantId::default_tenant();
    let mut needles: Vec<String> = Vec::new();
    for memory in &stored {
        needles.push(memory.id.clone());
        needles.push(memory.text.clone());
        needles.push(memory.content_hash.clone());
        needles.push(engram_embedding::text_digest(&tenant, &memory.text));
    }
    for (key, value) in every_redis_value(&sandbox).await {
        for needle in needles.iter().filter(|n| !n.is_empty()) {
            assert!(
                !key.contains(needle.as_str()) && !value.contains(needle.as_str()),
                "{key} still holds {needle:?}: {value}"
            );
        }
    }
    // Lee's memory stays.
    let lee = client
        .list(pb::ListRequest {
            scope: scope("lee", ""),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .memories;
    assert_eq!(lee.len(), 1);
    sandbox.stop().await;
}
