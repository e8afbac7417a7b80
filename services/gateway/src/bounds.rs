//! How large a request each public method may send. tonic enforces a server's decoding limit
//! on the length prefix of a message before reading it and again while decompressing it, so a
//! method whose limit fits what it can validly carry cannot be made to decode, or inflate, more:
//! a Get is bounded by its ids, a Recall by its query and filters, and only Remember may send
//! a batch of memories. Each limit also stays within `ENGRAM_MAX_MESSAGE_BYTES`.
//!
//! The generated servers carry one limit each, so a service is served by one instance per
//! limit, over the same handler, and [`ByMethod`] routes each call to its method's instance.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use engram_domain::Limits;
use engram_domain::limits::fixed;
use engram_proto::tonic::body::Body;
use engram_proto::tonic::server::NamedService;

/// The limit of a method that carries no memory text: a query, a scope, filters, a page.
pub const MAX_SMALL_MESSAGE_BYTES: usize = 1024 * 1024;

/// Room for a request's fixed fields (scope, tokens, options) beside what it carries.
const ENVELOPE_BYTES: usize = 4096;

/// Largest encoding of one memory a client may send: text, role, metadata and tags at their
/// limits, with their protobuf framing.
pub fn memory_bytes(limits: &Limits) -> usize {
    let framed = |len: usize| len + 4;
    framed(limits.max_text_bytes)
        + framed(fixed::MAX_ROLE_BYTES)
        + fixed::MAX_METADATA_ENTRIES
            * (framed(fixed::MAX_METADATA_KEY_BYTES) + framed(fixed::MAX_METADATA_VALUE_BYTES) + 4)
        + fixed::MAX_TAGS * framed(fixed::MAX_TAG_BYTES)
        + ENVELOPE_BYTES
}

/// The decoding limit of each method of the public API, by method name; `max_message_bytes`
/// caps them all. Methods not named get [`MAX_SMALL_MESSAGE_BYTES`].
pub fn method_limits(limits: &Limits, max_message_bytes: usize) -> HashMap<&'static str, usize> {
    let ids = limits.max_batch * (fixed::MAX_ID_BYTES + 3) + ENVELOPE_BYTES;
    let memory = memory_bytes(limits);
    let small = MAX_SMALL_MESSAGE_BYTES.max(memory);
    [
        // A batch of memories: only the deployment's message limit bounds it.
        (
            "Remember",
            limits
                .max_batch
                .saturating_mul(memory)
                .saturating_add(ENVELOPE_BYTES),
        ),
        ("Update", memory),
        ("Get", ids),
        ("Forget", ids),
        ("Recall", small),
        ("List", small),
        ("BuildContext", small),
        ("Converse", small),
    ]
    .into_iter()
    .map(|(method, bytes)| (method, bytes.min(max_message_bytes)))
    .collect()
}

/// One service served by instances that differ only in their decoding limit: each call goes
/// to the instance of its method's limit.
#[derive(Clone)]
pub struct ByMethod<S> {
    instances: Arc<[S]>,
    /// Index into `instances` by method name.
    routes: Arc<HashMap<&'static str, usize>>,
    /// The instance of methods not in `routes` (unknown ones: they answer UNIMPLEMENTED).
    fallback: usize,
}

impl<S> ByMethod<S> {
    /// `make(limit)` builds the service with that decoding limit; `limits` is
    /// [`method_limits`]'s table, `fallback` the limit of any other method.
    pub fn new(
        limits: &HashMap<&'static str, usize>,
        fallback: usize,
        make: impl Fn(usize) -> S,
    ) -> Self {
        let mut distinct: Vec<usize> = limits.values().copied().chain([fallback]).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let index = |limit: usize| distinct.binary_search(&limit).unwrap_or_default();
        let routes = limits
            .iter()
            .map(|(method, limit)| (*method, index(*limit)))
            .collect();
        Self {
            instances: distinct.iter().map(|limit| make(*limit)).collect(),
            routes: Arc::new(routes),
            fallback: index(fallback),
        }
    }

    fn instance(&self, path: &str) -> &S {
        let method = path.rsplit('/').next().unwrap_or_default();
        let at = self.routes.get(method).copied().unwrap_or(self.fallback);
        &self.instances[at]
    }
}

impl<S: NamedService> NamedService for ByMethod<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for ByMethod<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = S::Future;

    /// Generated servers are always ready; the instance is chosen per call.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.instance(request.uri().path()).clone().call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_is_bounded_by_what_it_can_carry() {
        let limits = Limits::default();
        let table = method_limits(&limits, 16 * 1024 * 1024);
        // 1,000 ids of at most 256 bytes: about 260 KB, where 64 MiB of empty ids decoded
        // into 30 million strings.
        assert!(table["Get"] < 300 * 1024, "{}", table["Get"]);
        assert_eq!(table["Get"], table["Forget"]);
        assert_eq!(table["Recall"], MAX_SMALL_MESSAGE_BYTES);
        assert!(table["Update"] >= limits.max_text_bytes);
        assert_eq!(table["Remember"], 16 * 1024 * 1024);
        // The deployment's limit caps every method.
        let table = method_limits(&limits, 100 * 1024);
        assert!(table.values().all(|&bytes| bytes <= 100 * 1024));
    }

    #[test]
    fn calls_go_to_the_instance_of_their_method() {
        let table: HashMap<&'static str, usize> = [("Get", 10), ("Remember", 1000)].into();
        let by = ByMethod::new(&table, 100, |limit| limit);
        assert_eq!(*by.instance("/engram.v1.MemoryService/Get"), 10);
        assert_eq!(*by.instance("/engram.v1.MemoryService/Remember"), 1000);
        assert_eq!(*by.instance("/engram.v1.MemoryService/Recall"), 100);
        assert_eq!(*by.instance("/engram.v1.MemoryService/Nope"), 100);
    }
}
