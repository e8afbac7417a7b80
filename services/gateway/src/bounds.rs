//! How large a request each public method may send. tonic enforces a server's decoding limit
//! on the length prefix of a message before reading it and again while decompressing it, so a
//! method whose limit fits what it can validly carry cannot be made to decode, or inflate, more:
//! a Get is bounded by its ids, a Recall by its query and filters, and only Remember may send
//! a batch of memories. Each limit also stays within `ENGRAM_MAX_MESSAGE_BYTES`.
//!
//! The generated servers carry one limit each, so a service is served by one instance per
//! limit, over the same handler, and [`ByMethod`] routes each call to its method's instance.
//!
//! Bytes alone do not bound what decoding allocates: an empty repeated message is two bytes on
//! the wire and a whole struct once decoded, so 16 MiB of empty memories would decode into
//! gigabytes. A method whose request repeats messages has a [`WireCheck`] that counts them in
//! the encoded bytes (inflated first if compressed, within the same limit) and refuses the
//! call before it is decoded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Read as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use engram_domain::limits::fixed;
use engram_domain::model::TenantId;
use engram_domain::{Error, Limits, Result};
use engram_proto::tonic::Status;
use engram_proto::tonic::body::Body;
use engram_proto::tonic::server::NamedService;
use engram_telemetry::Metrics;
use http_body_util::BodyExt as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

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
        // Each entry: its key and value, framed, in a framed map entry.
        + fixed::MAX_METADATA_BYTES
        + fixed::MAX_METADATA_ENTRIES * (framed(0) * 2 + 4)
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

/// A check of a request's encoded message (uncompressed) against the limits.
pub type WireCheck = fn(&[u8], &Limits) -> Result<()>;

/// The wire checks of the public API, by method.
pub fn wire_checks() -> HashMap<&'static str, WireCheck> {
    HashMap::from([("Remember", remember_counts as WireCheck)])
}

/// A RememberRequest holds at most `max_batch` memories (field 2), each with at most
/// [`fixed::MAX_TAGS`] tags (field 5) and [`fixed::MAX_METADATA_ENTRIES`] metadata entries
/// (field 4). Counted as the bytes are walked, so the walk stops at the first excess; bytes
/// the walk cannot follow (malformed, or groups, which no engram message has) are refused
/// rather than left to a decoder that might skip past them.
fn remember_counts(message: &[u8], limits: &Limits) -> Result<()> {
    let mut memories = 0;
    let mut refusal = None;
    walk(message, &mut |number, memory| {
        if number != 2 {
            return true;
        }
        memories += 1;
        if memories > limits.max_batch {
            refusal = Some(Error::invalid(
                "memories",
                format!(
                    "at most {} per request (ENGRAM_MAX_BATCH)",
                    limits.max_batch
                ),
            ));
            return false;
        }
        let at = memories - 1;
        let (mut tags, mut entries) = (0, 0);
        let counted = walk(memory, &mut |number, _| {
            match number {
                5 => tags += 1,
                4 => entries += 1,
                _ => {}
            }
            tags <= fixed::MAX_TAGS && entries <= fixed::MAX_METADATA_ENTRIES
        });
        if tags > fixed::MAX_TAGS {
            refusal = Some(Error::invalid(
                format!("memories[{at}].tags"),
                format!("at most {} tags", fixed::MAX_TAGS),
            ));
        } else if entries > fixed::MAX_METADATA_ENTRIES {
            refusal = Some(Error::invalid(
                format!("memories[{at}].metadata"),
                format!("at most {} entries", fixed::MAX_METADATA_ENTRIES),
            ));
        } else if counted.is_err() {
            refusal = Some(malformed(&format!("memories[{at}]")));
        }
        refusal.is_none()
    })
    .map_err(|()| malformed("memories"))?;
    refusal.map_or(Ok(()), Err)
}

fn malformed(field: &str) -> Error {
    Error::invalid(field, "is not a well-formed protobuf message")
}

/// Walk one protobuf message level, calling `visit(number, bytes)` for each length-delimited
/// field until it returns false. `Err` for bytes that are not a sequence of well-formed
/// fields of wire types 0, 1, 2 and 5.
fn walk(
    mut bytes: &[u8],
    visit: &mut dyn FnMut(u64, &[u8]) -> bool,
) -> std::result::Result<(), ()> {
    while !bytes.is_empty() {
        let key = varint(&mut bytes).ok_or(())?;
        let skip = match key & 7 {
            0 => {
                varint(&mut bytes).ok_or(())?;
                0
            }
            1 => 8,
            2 => {
                let len = usize::try_from(varint(&mut bytes).ok_or(())?).map_err(|_| ())?;
                let value = bytes.get(..len).ok_or(())?;
                bytes = &bytes[len..];
                if !visit(key >> 3, value) {
                    return Ok(());
                }
                0
            }
            5 => 4,
            _ => return Err(()),
        };
        bytes = bytes.get(skip..).ok_or(())?;
    }
    Ok(())
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The message of a unary request's body, which must be exactly one gRPC frame, inflated
/// within `limit` if the frame is compressed, calling `hold(n)` before each `n` bytes it
/// inflates (an error from it ends the inflating). Anything else is refused here: the server's
/// decoder would otherwise read past what was checked (a second frame is decoded too).
fn message<'a>(
    frame: &'a [u8],
    encoding: Option<&str>,
    limit: usize,
    hold: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let not_one = || {
        Error::invalid(
            "request",
            "a unary request must be exactly one gRPC message",
        )
    };
    let (&flag, rest) = frame.split_first().ok_or_else(not_one)?;
    let (len, payload) = rest.split_first_chunk::<4>().ok_or_else(not_one)?;
    if u32::from_be_bytes(*len) as usize != payload.len() || flag > 1 {
        return Err(not_one());
    }
    if flag == 0 {
        return Ok(std::borrow::Cow::Borrowed(payload));
    }
    let unreadable = || Error::invalid("request", "the compressed request cannot be inflated");
    let reader: Box<dyn std::io::Read + '_> = match encoding {
        Some("gzip") => Box::new(flate2::read::GzDecoder::new(payload)),
        Some("zstd") => {
            let mut decoder =
                zstd::stream::read::Decoder::new(payload).map_err(|_| unreadable())?;
            // Windows up to 8 MiB (zstd's level 19 default); larger ones need that much memory.
            decoder.window_log_max(23).map_err(|_| unreadable())?;
            Box::new(decoder)
        }
        _ => {
            return Err(Error::invalid(
                "request",
                "a compressed request needs grpc-encoding gzip or zstd",
            ));
        }
    };
    let mut reader = reader.take(limit as u64 + 1);
    let mut inflated = Vec::new();
    loop {
        hold(INFLATE_STEP)?;
        match (&mut reader)
            .take(INFLATE_STEP as u64)
            .read_to_end(&mut inflated)
        {
            Ok(_) if inflated.len() > limit => {
                return Err(Error::ResourceExhausted {
                    reason: format!("the request inflates past its limit of {limit} bytes"),
                    retry_after: None,
                });
            }
            // Less than a step: the end.
            Ok(read) if read < INFLATE_STEP => break,
            Ok(_) => {}
            Err(_) => return Err(unreadable()),
        }
    }
    Ok(std::borrow::Cow::Owned(inflated))
}

/// Bytes inflated between two calls of `hold`.
const INFLATE_STEP: usize = 64 * 1024;

/// The smallest `ENGRAM_MAX_REQUEST_BYTES` for requests of up to `max_message` bytes: a largest
/// compressed request holds its bytes and what they inflate to (in steps).
pub fn min_request_bytes(max_message: usize) -> usize {
    max_message
        .saturating_mul(2)
        .saturating_add(INFLATE_STEP + 5)
}

/// The request bytes the gateway may hold at once, across calls (`ENGRAM_MAX_REQUEST_BYTES`):
/// a call holds its bytes as they arrive (and, for a compressed message, as it inflates)
/// until its handler has answered. A call whose next bytes do not fit is refused at once
/// (RESOURCE_EXHAUSTED), so concurrent large requests cannot together outgrow the process's
/// memory; and one tenant may hold all of it but one largest request's worth, so a tenant
/// that stalls large requests cannot shut every other out.
#[derive(Clone)]
pub struct RequestBytes {
    budget: Arc<tokio::sync::Semaphore>,
    total: usize,
    per_tenant: usize,
    tenants: Arc<parking_lot::Mutex<HashMap<TenantId, usize>>>,
    gauge: Gauge,
    refused: Counter,
}

impl RequestBytes {
    /// `total` bytes in all, all but `largest` (one largest request) for any one tenant.
    pub fn new(total: usize, largest: usize, metrics: &Metrics) -> Self {
        let total = total.min(tokio::sync::Semaphore::MAX_PERMITS);
        let gauge = Gauge::default();
        metrics.register(
            "engram_gateway_request_bytes",
            "Bytes of public requests the gateway holds now (ENGRAM_MAX_REQUEST_BYTES bounds them)",
            gauge.clone(),
        );
        let refused = Counter::default();
        metrics.register(
            "engram_gateway_request_bytes_refused",
            "Calls refused because their bytes did not fit in ENGRAM_MAX_REQUEST_BYTES or in their tenant's share of it",
            refused.clone(),
        );
        Self {
            budget: Arc::new(tokio::sync::Semaphore::new(total)),
            total,
            per_tenant: total.saturating_sub(largest).max(largest),
            tenants: Arc::default(),
            gauge,
            refused,
        }
    }

    /// Bytes held now by calls in flight.
    pub fn held(&self) -> usize {
        self.total - self.budget.available_permits()
    }

    /// Add `n` bytes to what `held` holds, or refuse.
    fn hold(&self, held: &mut Held, n: usize) -> Result<()> {
        let refused = |why: &str| {
            self.refused.inc();
            Error::ResourceExhausted {
                reason: format!("{why} (ENGRAM_MAX_REQUEST_BYTES); retry shortly"),
                retry_after: Some(std::time::Duration::from_millis(100)),
            }
        };
        let mut tenants = self.tenants.lock();
        let tenant_holds = tenants.get(&held.tenant).copied().unwrap_or(0);
        if tenant_holds + n > self.per_tenant {
            return Err(refused(
                "this tenant's requests hold as many bytes as one tenant may",
            ));
        }
        let permit = u32::try_from(n)
            .ok()
            .and_then(|n| Arc::clone(&self.budget).try_acquire_many_owned(n).ok())
            .ok_or_else(|| refused("the gateway holds as many request bytes as it may"))?;
        tenants.insert(held.tenant.clone(), tenant_holds + n);
        drop(tenants);
        self.gauge.inc_by(n as i64);
        held.bytes += n;
        match &mut held.permit {
            Some(permit_held) => permit_held.merge(permit),
            None => held.permit = Some(permit),
        }
        Ok(())
    }
}

/// What one call holds of [`RequestBytes`], given back when it is dropped.
pub struct Held {
    owner: RequestBytes,
    tenant: TenantId,
    bytes: usize,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Held {
    fn new(owner: &RequestBytes, tenant: TenantId) -> Self {
        Self {
            owner: owner.clone(),
            tenant,
            bytes: 0,
            permit: None,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut tenants = self.owner.tenants.lock();
        if let Some(holds) = tenants.get_mut(&self.tenant) {
            *holds = holds.saturating_sub(self.bytes);
            if *holds == 0 {
                tenants.remove(&self.tenant);
            }
        }
        self.owner.gauge.dec_by(self.bytes as i64);
    }
}

/// A unary request's body: one frame of at most `limit` bytes, each chunk held in `held` as it
/// arrives. Refused as soon as it is larger than its limit or than the message its length
/// prefix announced.
async fn read_frame(
    body: Body,
    limit: usize,
    bytes: &RequestBytes,
    held: &mut Held,
) -> std::result::Result<Bytes, Status> {
    let too_large = || {
        Status::out_of_range(format!(
            "the request is larger than its limit of {limit} bytes"
        ))
    };
    let mut body = http_body_util::Limited::new(body, limit + 5);
    let mut buffer = bytes::BytesMut::new();
    let mut announced = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(e) => return Err(Status::cancelled(format!("the request broke off: {e}"))),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        bytes.hold(held, data.len()).map_err(Status::from)?;
        buffer.extend_from_slice(&data);
        if announced.is_none() && buffer.len() >= 5 {
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if length > limit {
                return Err(too_large());
            }
            announced = Some(length + 5);
        }
        if announced.is_some_and(|whole| buffer.len() > whole) {
            return Err(Status::invalid_argument(
                "request: a unary request must be exactly one gRPC message",
            ));
        }
    }
    Ok(buffer.freeze())
}

/// One service served by instances that differ only in their decoding limit: each call goes
/// to the instance of its method's limit, after its [`WireCheck`] if it has one.
#[derive(Clone)]
pub struct ByMethod<S> {
    instances: Arc<[(usize, S)]>,
    /// Index into `instances` by method name.
    routes: Arc<HashMap<&'static str, usize>>,
    /// The instance of methods not in `routes` (unknown ones: they answer UNIMPLEMENTED).
    fallback: usize,
    checks: Arc<HashMap<&'static str, WireCheck>>,
    limits: Arc<Limits>,
    bytes: RequestBytes,
}

impl<S> ByMethod<S> {
    /// `make(limit)` builds the service with that decoding limit; `limits` is
    /// [`method_limits`]'s table, `fallback` the limit of any other method.
    pub fn new(
        limits: &HashMap<&'static str, usize>,
        fallback: usize,
        make: impl Fn(usize) -> S,
        bytes: RequestBytes,
    ) -> Self {
        Self::checked(
            limits,
            fallback,
            make,
            HashMap::new(),
            Limits::default(),
            bytes,
        )
    }

    /// [`ByMethod::new`] with `checks` run, against `request_limits`, before their methods.
    pub fn checked(
        limits: &HashMap<&'static str, usize>,
        fallback: usize,
        make: impl Fn(usize) -> S,
        checks: HashMap<&'static str, WireCheck>,
        request_limits: Limits,
        bytes: RequestBytes,
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
            instances: distinct
                .iter()
                .map(|limit| (*limit, make(*limit)))
                .collect(),
            routes: Arc::new(routes),
            fallback: index(fallback),
            checks: Arc::new(checks),
            limits: Arc::new(request_limits),
            bytes,
        }
    }

    fn method(path: &str) -> &str {
        path.rsplit('/').next().unwrap_or_default()
    }

    /// The instance serving `path`, and its decoding limit.
    fn instance(&self, path: &str) -> &(usize, S) {
        let at = self
            .routes
            .get(Self::method(path))
            .copied()
            .unwrap_or(self.fallback);
        &self.instances[at]
    }
}

impl<S: NamedService> NamedService for ByMethod<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for ByMethod<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Infallible>> + Send>>;

    /// Generated servers are always ready; the instance is chosen per call.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Every call's request is read whole here, its bytes held in [`RequestBytes`] until its
    /// handler answers; a compressed one is inflated here (within its limit, its bytes held as
    /// they grow) and handed on uncompressed; then the method's [`WireCheck`] runs, if it has
    /// one.
    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (limit, instance) = self.instance(request.uri().path()).clone();
        let check = self.checks.get(Self::method(request.uri().path())).copied();
        let limits = Arc::clone(&self.limits);
        let bytes = self.bytes.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let tenant = (parts.extensions.get::<crate::Caller>())
                .map_or_else(TenantId::default_tenant, |caller| caller.tenant.clone());
            let mut held = Held::new(&bytes, tenant);
            let frame = match read_frame(body, limit, &bytes, &mut held).await {
                Ok(frame) => frame,
                Err(refused) => return Ok(refused.into_http()),
            };
            let encoding = parts
                .headers
                .get("grpc-encoding")
                .and_then(|v| v.to_str().ok());
            let message = message(&frame, encoding, limit, &mut |n| bytes.hold(&mut held, n))
                .and_then(|m| match check {
                    Some(check) => check(&m[..], &limits).map(|()| m),
                    None => Ok(m),
                });
            let body = match message {
                Err(refused) => return Ok(Status::from(refused).into_http()),
                Ok(std::borrow::Cow::Borrowed(_)) => {
                    Body::new(http_body_util::Full::new(frame.clone()))
                }
                // Handed on as an uncompressed frame (its flag says so; the encoding header
                // only names what the client may send): a header, then the inflated bytes,
                // not copied.
                Ok(std::borrow::Cow::Owned(inflated)) => {
                    let length = u32::try_from(inflated.len()).unwrap_or(u32::MAX);
                    let mut header = vec![0u8];
                    header.extend_from_slice(&length.to_be_bytes());
                    let chunks = [Bytes::from(header), Bytes::from(inflated)]
                        .map(|chunk| Ok::<_, Infallible>(http_body::Frame::data(chunk)));
                    Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                        chunks,
                    )))
                }
            };
            drop(frame);
            let request = http::Request::from_parts(parts, body);
            let response = instance.clone().call(request).await;
            drop(held);
            response
        })
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
        let bytes = RequestBytes::new(1000, 100, &engram_telemetry::Metrics::new());
        let by = ByMethod::new(&table, 100, |limit| limit, bytes);
        assert_eq!(by.instance("/engram.v1.MemoryService/Get").1, 10);
        assert_eq!(by.instance("/engram.v1.MemoryService/Remember").1, 1000);
        assert_eq!(by.instance("/engram.v1.MemoryService/Recall").1, 100);
        assert_eq!(by.instance("/engram.v1.MemoryService/Nope").1, 100);
    }

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for mut value in [number << 3 | 2, payload.len() as u64] {
            while value >= 0x80 {
                out.push((value as u8) | 0x80);
                value >>= 7;
            }
            out.push(value as u8);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn repeated_messages_are_counted_before_decoding() {
        let limits = Limits::default();
        let memory = [field(1, b"hello"), field(5, b"tag")].concat();
        let batch = |n: usize| field(2, &memory).repeat(n);
        assert!(remember_counts(&batch(limits.max_batch), &limits).is_ok());
        let refused = remember_counts(&batch(limits.max_batch + 1), &limits).unwrap_err();
        assert!(refused.to_string().contains("memories"), "{refused}");
        // A million empty memories: 2 MB on the wire, refused at the 1,001st.
        assert!(remember_counts(&[0x12, 0x00].repeat(1_000_000), &limits).is_err());
        let tagged = field(2, &field(5, b"").repeat(fixed::MAX_TAGS + 1));
        let refused = remember_counts(&tagged, &limits).unwrap_err();
        assert!(
            refused.to_string().contains("memories[0].tags"),
            "{refused}"
        );
        // Bytes the walk cannot follow are refused, not passed to a decoder that might skip
        // past them: a truncated field, and a group (field 15) ahead of a million memories.
        assert!(remember_counts(&[0x12, 0xff], &limits).is_err());
        let grouped = [&[0x7b, 0x7c][..], &[0x12, 0x00].repeat(1_000_000)].concat();
        assert!(remember_counts(&grouped, &limits).is_err());
        let grouped_inside = field(2, &[0x7b, 0x7c, 0x2a, 0x00]);
        assert!(remember_counts(&grouped_inside, &limits).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever the walk accepts decodes within the limits: it never counts less than the
        /// decoder finds.
        #[test]
        fn the_walk_never_undercounts_what_prost_decodes(
            parts in proptest::collection::vec((0u8..8, 0usize..4), 0..40)
        ) {
            use engram_proto::prost::Message as _;
            let limits = Limits { max_batch: 3, ..Limits::default() };
            let memory = |tags: usize| [field(1, b"t"), field(5, b"a").repeat(tags)].concat();
            let bytes: Vec<u8> = parts
                .iter()
                .flat_map(|&(kind, n)| match kind {
                    0 | 1 => field(2, &memory(n * 30)),
                    2 => vec![0x12, 0x00],
                    3 => vec![0x7b, 0x7c],
                    4 => vec![0x18, 0x01],
                    5 => field(2, &[0x7b, 0x7c, 0x2a, 0x00].repeat(n + 1)),
                    6 => vec![0x12],
                    _ => vec![0xff; n],
                })
                .collect();
            if remember_counts(&bytes, &limits).is_ok()
                && let Ok(decoded) = engram_proto::v1::RememberRequest::decode(&bytes[..])
            {
                proptest::prop_assert!(decoded.memories.len() <= limits.max_batch);
                proptest::prop_assert!(
                    decoded.memories.iter().all(|m| m.tags.len() <= fixed::MAX_TAGS)
                );
            }
        }
    }

    #[test]
    fn a_compressed_frame_is_inflated_within_its_limit() {
        use std::io::Write as _;
        let raw = [0x12, 0x00].repeat(10_000);
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&raw).unwrap();
        let compressed = gzip.finish().unwrap();
        let frame = |flag: u8, payload: &[u8]| {
            [&[flag][..], &(payload.len() as u32).to_be_bytes(), payload].concat()
        };
        let compressed_frame = frame(1, &compressed);
        let free = &mut |_| Ok(());
        let inflated = message(&compressed_frame, Some("gzip"), 1 << 20, free).unwrap();
        assert_eq!(&*inflated, &raw[..]);
        assert!(message(&frame(1, &compressed), Some("gzip"), 1000, free).is_err());
        let plain = frame(0, &raw);
        assert_eq!(&*message(&plain, None, 1 << 20, free).unwrap(), &raw[..]);
        // Only exactly one frame: not a truncated one, nor one followed by more.
        assert!(message(b"\x00\x00", None, 100, free).is_err());
        let two = [frame(0, &raw), frame(0, &raw)].concat();
        assert!(message(&two, None, 1 << 20, free).is_err());
        assert!(message(&[frame(0, &raw), vec![0]].concat(), None, 1 << 20, free).is_err());
        // Compressed without a known encoding.
        assert!(message(&frame(1, &compressed), None, 1 << 20, free).is_err());
        // Inflating holds its bytes as they grow, and stops when they cannot be held.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&[0x12, 0x00].repeat(150_000)).unwrap();
        let large = frame(1, &gzip.finish().unwrap());
        let bytes = RequestBytes::new(100 * 1024, 0, &engram_telemetry::Metrics::new());
        let mut held = Held::new(&bytes, TenantId::default_tenant());
        let refused = message(&large, Some("gzip"), 1 << 20, &mut |n| {
            bytes.hold(&mut held, n)
        });
        assert!(
            matches!(refused, Err(Error::ResourceExhausted { .. })),
            "{refused:?}"
        );
        assert_eq!(bytes.held(), INFLATE_STEP);
        drop(held);
        assert_eq!(bytes.held(), 0);
    }
}
