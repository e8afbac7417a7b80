//! How long engram takes before a Converse's answer starts: the time to the `context` event,
//! and the time until the model's first token is forwarded, with a model that answers
//! instantly (the fake provider streaming a short reply) — so all of it is engram's: privacy
//! check, cached recall ∥ history, packing, the prompt, the HTTP request to the model and the
//! first chunk's parsing and forwarding. BuildContext and a cached Recall for comparison.
//!
//! Each Converse is `ephemeral` (the turn is not remembered), so every call finds the recall in
//! the result cache as a repeated question would; the session has 10 turns of history.
//!
//! Run: `cargo bench -p engram-tests --bench converse`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use engram_tests::bench::ms;
use engram_tests::{FakeProvider, Options, Sandbox, fast_policy, pb};
use hdrhistogram::Histogram;

const CALLS: usize = 2_000;

fn main() -> ExitCode {
    engram_runtime::server::main_entry(|| async {
        let fake = FakeProvider::start(8).await;
        fake.set_reply("Sure.");
        let mut policy = fast_policy();
        policy.attempt_timeout = Duration::from_secs(5);
        policy.max_concurrency = 64;
        let sandbox = Sandbox::start_with(None, Options::with_chat(&fake, policy)).await;
        let mut client = sandbox.client().await;
        let mut chat = sandbox.chat_client().await;
        let scope = Some(pb::Scope {
            user_id: "alice".into(),
            session_id: "bench".into(),
            ..Default::default()
        });
        let sentences: Vec<&str> = include_str!("../../loadtest/data/sentences.txt")
            .lines()
            .take(100)
            .collect();
        let mut memories: Vec<pb::MemoryInput> = sentences
            .iter()
            .map(|t| pb::MemoryInput {
                text: t.to_string(),
                ..Default::default()
            })
            .collect();
        memories.extend((0..10).map(|i| pb::MemoryInput {
            text: format!("turn {i} of our chat about weekend plans"),
            kind: pb::Kind::Message.into(),
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            ..Default::default()
        }));
        client
            .remember(pb::RememberRequest {
                scope: scope.clone(),
                memories,
                mode: pb::WriteMode::Sync.into(),
                extract: false,
                privacy: 0,
            })
            .await
            .unwrap();
        let message = "what hobbies am I learning";
        let converse = pb::ConverseRequest {
            scope: scope.clone(),
            message: message.into(),
            ephemeral: true,
            ..Default::default()
        };
        let build = pb::BuildContextRequest {
            scope: scope.clone(),
            query: message.into(),
            ..Default::default()
        };
        let recall = pb::RecallRequest {
            scope: Some(pb::Scope {
                user_id: "alice".into(),
                ..Default::default()
            }),
            query: message.into(),
            top_k: 20,
            ..Default::default()
        };

        let mut to_context = Histogram::<u64>::new(3).unwrap();
        let mut to_first = Histogram::<u64>::new(3).unwrap();
        let mut to_done = Histogram::<u64>::new(3).unwrap();
        let mut server_context = Histogram::<u64>::new(3).unwrap();
        let mut server_first = Histogram::<u64>::new(3).unwrap();
        let mut built = Histogram::<u64>::new(3).unwrap();
        let mut recalled = Histogram::<u64>::new(3).unwrap();
        for round in 0..CALLS + 200 {
            let measured = round >= 200;
            let started = Instant::now();
            let mut stream = chat.converse(converse.clone()).await.unwrap().into_inner();
            let (mut context_at, mut first_at) = (None, None);
            let mut timings = None;
            while let Some(event) = stream.message().await.unwrap() {
                match event.event {
                    Some(pb::converse_event::Event::Context(_)) => {
                        context_at = Some(started.elapsed());
                    }
                    Some(pb::converse_event::Event::Delta(_)) => {
                        first_at.get_or_insert(started.elapsed());
                    }
                    Some(pb::converse_event::Event::Done(done)) => timings = done.timings,
                    Some(pb::converse_event::Event::Fallback(f)) => {
                        panic!("fallback: {}", f.reason)
                    }
                    None => {}
                }
            }
            let done_at = started.elapsed();
            let started = Instant::now();
            let context = client
                .build_context(build.clone())
                .await
                .unwrap()
                .into_inner();
            let build_time = started.elapsed();
            assert!(!context.memories.is_empty() && context.turns.len() == 10);
            let started = Instant::now();
            let hits = client.recall(recall.clone()).await.unwrap().into_inner();
            let recall_time = started.elapsed();
            assert!(hits.cache_hit);
            if !measured {
                continue;
            }
            let timings = timings.unwrap();
            to_context.record(micros(context_at.unwrap())).unwrap();
            to_first.record(micros(first_at.unwrap())).unwrap();
            to_done.record(micros(done_at)).unwrap();
            server_context.record(timings.context_us).unwrap();
            server_first.record(timings.first_token_us).unwrap();
            built.record(micros(build_time)).unwrap();
            recalled.record(micros(recall_time)).unwrap();
        }
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "Converse, {CALLS} calls one at a time, cached recall (20 memories), 10 turns of history, 1,024-token budget, model answering at once; {cores} cores"
        );
        println!("| measure | p50 | p90 | p99 |");
        println!("|---|---|---|---|");
        for (name, h) in [
            ("client: request → `context` event", &to_context),
            ("client: request → first `delta`", &to_first),
            ("client: request → end of stream", &to_done),
            ("gateway: request → `context` sent", &server_context),
            (
                "gateway: request → first token forwarded (engram's added time)",
                &server_first,
            ),
            ("client: BuildContext (same context)", &built),
            ("client: Recall, cache hit (for comparison)", &recalled),
        ] {
            println!(
                "| {name} | {} | {} | {} |",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99))
            );
        }
        sandbox.stop().await;
        ExitCode::SUCCESS
    })
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}
