//! A fake model provider for tests: a real HTTP/1.1 server on a free port speaking the OpenAI
//! embeddings protocol (`POST /v1/embeddings`) and streamed chat completions
//! (`POST /v1/chat/completions`, server-sent events), each scriptable request by request. It
//! stands only for the external API; everything on engram's side of the wire is real.
//!
//! Each request takes the next scripted [`Behavior`] (or the default one) and answers with it.
//! `Ok` answers with a deterministic unit vector per input ([`FakeProvider::vector_for`]), so a
//! test can check that each caller got the vector of its own text.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the fake answers one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// 200 with one vector per input.
    Ok,
    /// An HTTP error status, with `Retry-After: <seconds>` if given.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Accept the request and never answer.
    Hang,
    /// 200 with a body that is not an embeddings response.
    Malformed,
    /// 200 with vectors of this dimension.
    WrongDimension(usize),
    /// Close the connection without answering.
    Drop,
}

/// How the fake answers one chat completion.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatBehavior {
    /// Stream the reply (see [`FakeProvider::set_reply`]) word by word, then `[DONE]`.
    Reply,
    /// Stream this text instead.
    Text(String),
    /// An HTTP error status, with `Retry-After: <seconds>` if given.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Accept the request and never answer.
    Hang,
    /// Send this many words of the reply, then nothing more until the client goes away.
    StallAfter(usize),
    /// 200 with events that are not chat completion chunks.
    Malformed,
}

struct State {
    dimension: usize,
    script: VecDeque<Behavior>,
    default: Behavior,
    latency: Duration,
    /// Texts whose requests always fail, with this status.
    poison: HashMap<String, u16>,
    /// The inputs of every request received, in order.
    requests: Vec<Vec<String>>,
    /// Requests received and not yet answered.
    in_flight: usize,
    chat_script: VecDeque<ChatBehavior>,
    chat_default: ChatBehavior,
    reply: String,
    /// Pause between two streamed words.
    word_delay: Duration,
    /// The body of every chat request received, in order.
    chat_requests: Vec<serde_json::Value>,
    /// Chat streams whose client closed the connection before the stream ended.
    chat_disconnects: usize,
}

#[derive(Clone)]
pub struct FakeProvider {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeProvider {
    pub async fn start(dimension: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("fake provider: bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake provider: address: {e}"));
        let state = Arc::new(Mutex::new(State {
            dimension,
            script: VecDeque::new(),
            default: Behavior::Ok,
            latency: Duration::ZERO,
            poison: HashMap::new(),
            requests: Vec::new(),
            in_flight: 0,
            chat_script: VecDeque::new(),
            chat_default: ChatBehavior::Reply,
            reply: "Hello from the fake model.".into(),
            word_delay: Duration::ZERO,
            chat_requests: Vec::new(),
            chat_disconnects: 0,
        }));
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Streamed events are small writes: send each at once, as a real server does.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, serving.clone()));
            }
        });
        Self { addr, state }
    }

    /// The base URL to configure, e.g. `http://127.0.0.1:4242/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Answer the next request (after those already scripted) this way.
    pub fn then(&self, behavior: Behavior) -> &Self {
        self.state.lock().script.push_back(behavior);
        self
    }

    /// How requests are answered once the script is used up.
    pub fn set_default(&self, behavior: Behavior) {
        self.state.lock().default = behavior;
    }

    /// Added before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().latency = latency;
    }

    /// Every request containing this text fails with 500.
    pub fn poison(&self, text: &str) {
        self.poison_with(text, 500);
    }

    /// Every request containing this text fails with `status` (e.g. 400, as a provider refuses
    /// a text over its token limit).
    pub fn poison_with(&self, text: &str, status: u16) {
        self.state.lock().poison.insert(text.to_string(), status);
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().requests.len()
    }

    /// Requests received and not yet answered (or abandoned).
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    /// The inputs of every request so far.
    pub fn requests(&self) -> Vec<Vec<String>> {
        self.state.lock().requests.clone()
    }

    /// Answer the next chat completion (after those already scripted) this way.
    pub fn then_chat(&self, behavior: ChatBehavior) -> &Self {
        self.state.lock().chat_script.push_back(behavior);
        self
    }

    /// How chat completions are answered once the chat script is used up.
    pub fn set_chat_default(&self, behavior: ChatBehavior) {
        self.state.lock().chat_default = behavior;
    }

    /// The text [`ChatBehavior::Reply`] streams.
    pub fn set_reply(&self, reply: &str) {
        self.state.lock().reply = reply.to_string();
    }

    /// Pause between two streamed words.
    pub fn set_word_delay(&self, delay: Duration) {
        self.state.lock().word_delay = delay;
    }

    /// The JSON body of every chat request so far.
    pub fn chat_requests(&self) -> Vec<serde_json::Value> {
        self.state.lock().chat_requests.clone()
    }

    /// Chat streams the client closed before they ended.
    pub fn chat_disconnects(&self) -> usize {
        self.state.lock().chat_disconnects
    }

    /// The words a reply is streamed in: each word with the space before it.
    pub fn words(text: &str) -> Vec<String> {
        let mut words = Vec::new();
        for (i, word) in text.split(' ').enumerate() {
            words.push(if i == 0 {
                word.to_string()
            } else {
                format!(" {word}")
            });
        }
        words
    }

    /// The vector this fake returns for `text`: unit length, derived from its SHA-256.
    pub fn vector_for(text: &str, dimension: usize) -> Vec<f32> {
        let mut values = Vec::with_capacity(dimension);
        let mut block = 0u32;
        while values.len() < dimension {
            let digest = Sha256::new()
                .chain_update(text.as_bytes())
                .chain_update(block.to_le_bytes())
                .finalize();
            values.extend(digest.iter().map(|b| f32::from(*b) / 127.5 - 1.0));
            block += 1;
        }
        values.truncate(dimension);
        let norm = values
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::EPSILON);
        values.iter().map(|v| v / norm).collect()
    }
}

/// Requests on one keep-alive connection.
async fn serve_connection(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buffer = Vec::new();
    loop {
        let Some((path, body)) = read_request(&mut stream, &mut buffer).await else {
            return;
        };
        if path.ends_with("/chat/completions") {
            if serve_chat(&mut stream, &state, &body).await {
                continue;
            }
            return;
        }
        let inputs: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("input").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let _answering = InFlight::enter(&state);
        let (behavior, latency, dimension) = {
            let mut state = state.lock();
            state.requests.push(inputs.clone());
            let poisoned = inputs.iter().find_map(|i| state.poison.get(i).copied());
            let scripted = state.script.pop_front();
            let behavior = if let Some(status) = poisoned {
                Behavior::Status {
                    status,
                    retry_after: None,
                }
            } else {
                scripted.unwrap_or_else(|| state.default.clone())
            };
            (behavior, state.latency, state.dimension)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let response = match behavior {
            Behavior::Ok => ok(&inputs, dimension),
            Behavior::WrongDimension(wrong) => ok(&inputs, wrong),
            Behavior::Malformed => http(200, "application/json", "{\"data\": \"not a list\"", None),
            Behavior::Status {
                status,
                retry_after,
            } => http(
                status,
                "application/json",
                "{\"error\":{\"message\":\"scripted failure\"}}",
                retry_after,
            ),
            Behavior::Hang => {
                std::future::pending::<()>().await;
                return;
            }
            Behavior::Drop => return,
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Counts a request as in flight until it is answered or abandoned.
struct InFlight(Arc<Mutex<State>>);

impl InFlight {
    fn enter(state: &Arc<Mutex<State>>) -> Self {
        state.lock().in_flight += 1;
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

fn ok(inputs: &[String], dimension: usize) -> String {
    let data: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            json!({"object": "embedding", "index": index, "embedding": FakeProvider::vector_for(text, dimension)})
        })
        .collect();
    let body = json!({"object": "list", "data": data, "model": "fake-embedding", "usage": {"prompt_tokens": 0, "total_tokens": 0}});
    http(200, "application/json", &body.to_string(), None)
}

fn http(status: u16, content_type: &str, body: &str, retry_after: Option<u64>) -> String {
    let retry_after = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {status} Fake\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{retry_after}\r\n{body}",
        body.len()
    )
}

/// Answer one chat completion; false when the connection is done with.
async fn serve_chat(stream: &mut TcpStream, state: &Arc<Mutex<State>>, body: &[u8]) -> bool {
    let _answering = InFlight::enter(state);
    let (behavior, latency, reply, delay) = {
        let mut state = state.lock();
        let request = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        state.chat_requests.push(request);
        let behavior = state
            .chat_script
            .pop_front()
            .unwrap_or_else(|| state.chat_default.clone());
        (
            behavior,
            state.latency,
            state.reply.clone(),
            state.word_delay,
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (words, stall) = match behavior {
        ChatBehavior::Status {
            status,
            retry_after,
        } => {
            let response = http(
                status,
                "application/json",
                "{\"error\":{\"message\":\"scripted failure\"}}",
                retry_after,
            );
            return stream.write_all(response.as_bytes()).await.is_ok();
        }
        ChatBehavior::Hang => {
            std::future::pending::<()>().await;
            return false;
        }
        ChatBehavior::Malformed => (vec!["not a chunk".to_string()], false),
        ChatBehavior::Reply => (FakeProvider::words(&reply), false),
        ChatBehavior::Text(text) => (FakeProvider::words(&text), false),
        ChatBehavior::StallAfter(n) => (
            FakeProvider::words(&reply).into_iter().take(n).collect(),
            true,
        ),
    };
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let malformed = words.first().is_some_and(|w| w == "not a chunk");
    for (i, word) in words.iter().enumerate() {
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let data = if malformed {
            word.clone()
        } else {
            json!({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]})
                .to_string()
        };
        if !send_event(stream, &data).await {
            state.lock().chat_disconnects += 1;
            return false;
        }
    }
    if stall {
        // Wait for the client to give up and close the connection.
        let mut byte = [0u8; 1];
        while let Ok(n) = stream.read(&mut byte).await {
            if n == 0 {
                break;
            }
        }
        state.lock().chat_disconnects += 1;
        return false;
    }
    let completion_tokens = words.len();
    let finish = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 42, "completion_tokens": completion_tokens}});
    if !send_event(stream, &finish.to_string()).await || !send_event(stream, "[DONE]").await {
        state.lock().chat_disconnects += 1;
        return false;
    }
    stream.write_all(b"0\r\n\r\n").await.is_ok()
}

/// One server-sent event as one HTTP chunk; false if the client is gone.
async fn send_event(stream: &mut TcpStream, data: &str) -> bool {
    let event = format!("data: {data}\n\n");
    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
    stream.write_all(chunk.as_bytes()).await.is_ok() && stream.flush().await.is_ok()
}

/// Read one request (head and `Content-Length` body): its path and body; `None` when the
/// client closed.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[head_end..head_end + length].to_vec();
    buffer.drain(..head_end + length);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((path, body))
}
