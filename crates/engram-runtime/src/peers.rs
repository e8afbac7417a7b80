//! Channels to the internal services: client-side load balancing over every replica, endpoint
//! discovery by DNS, passive health checks, and the retry budget of idempotent reads.
//!
//! A peer's setting (`ENGRAM_RETRIEVAL_URL`, say) is one URL or a comma-separated list. A URL
//! whose host is an IP address is one endpoint; a URL whose host is a name (the headless
//! Service of Kubernetes, `retrieval.engram.svc`) is re-resolved every discovery interval, so
//! new replicas receive traffic within one interval and removed ones stop receiving it.
//!
//! Each call goes to the less loaded of two endpoints taken in turn, over that endpoint's own
//! pooled HTTP/2 connection. An endpoint whose connection fails is ejected for a while (a
//! stopped replica stops getting traffic before DNS forgets it), and reads that failed as
//! UNAVAILABLE are tried once more on another endpoint while the [`RetryBudget`] allows.
//! Writes are never retried here: their caller decides (ingestion's write log does).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use engram_proto::tonic::body::Body;
use engram_proto::tonic::transport::{Channel, Endpoint};
use engram_proto::tonic::{self, Status};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Service, ServiceExt as _};

use engram_domain::error::{Error, Result};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How channels to peers behave.
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    /// Timeout of one call (the caller's deadline, when sooner, wins).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How often a name is resolved again.
    pub discovery_interval: Duration,
    /// How long an endpoint whose connection failed is left out.
    pub eject_for: Duration,
}

impl PeerSettings {
    pub fn new(request_timeout: Duration, discovery_interval: Duration) -> Self {
        Self {
            request_timeout,
            connect_timeout: Duration::from_secs(2),
            discovery_interval,
            eject_for: Duration::from_secs(2),
        }
    }
}

/// One replica of a peer.
struct Backend {
    addr: SocketAddr,
    channel: Channel,
    in_flight: AtomicUsize,
    ejected_until: Mutex<Option<Instant>>,
}

impl Backend {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.lock().is_some_and(|until| until > now)
    }
}

struct Shared {
    setting: String,
    settings: PeerSettings,
    backends: RwLock<Vec<Arc<Backend>>>,
    next: AtomicUsize,
    /// Bumped whenever the endpoint set changes (first resolution included).
    resolved: watch::Sender<u64>,
}

/// A load-balanced channel to every replica of one peer service. Cheap to clone.
#[derive(Clone)]
pub struct Balanced {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Balanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balanced")
            .field("setting", &self.shared.setting)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

/// One entry of a peer's setting.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Fixed(SocketAddr),
    Name { host: String, port: u16 },
}

fn parse_targets(setting: &str, urls: &str) -> Result<Vec<Target>> {
    let targets = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            let bad = |why: &str| Error::invalid(setting, format!("{url:?} {why}"));
            let uri: http::Uri = url
                .parse()
                .map_err(|e| bad(&format!("is not a valid URL: {e}")))?;
            if uri.scheme_str() != Some("http") {
                return Err(bad(
                    "must start with http:// (internal calls are plaintext HTTP/2)",
                ));
            }
            let host = uri.host().ok_or_else(|| bad("has no host"))?;
            let port = uri.port_u16().ok_or_else(|| bad("has no port"))?;
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            Ok(match literal.parse::<IpAddr>() {
                Ok(ip) => Target::Fixed(SocketAddr::new(ip, port)),
                Err(_) => Target::Name {
                    host: host.to_string(),
                    port,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if targets.is_empty() {
        return Err(Error::invalid(setting, "is empty"));
    }
    Ok(targets)
}

impl Balanced {
    /// Channels to the peers `urls` lists (see the module docs); `setting` names where they
    /// came from, for errors. Connects on first use. Must be called inside the tokio runtime
    /// when a URL names a host, which is then resolved in the background for as long as the
    /// channel lives.
    pub fn new(setting: &str, urls: &str, settings: PeerSettings) -> Result<Self> {
        let targets = parse_targets(setting, urls)?;
        let (resolved, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            setting: setting.to_string(),
            settings,
            backends: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            resolved,
        });
        let fixed: Vec<SocketAddr> = targets
            .iter()
            .filter_map(|t| match t {
                Target::Fixed(addr) => Some(*addr),
                Target::Name { .. } => None,
            })
            .collect();
        let names: Vec<(String, u16)> = targets
            .into_iter()
            .filter_map(|t| match t {
                Target::Name { host, port } => Some((host, port)),
                Target::Fixed(_) => None,
            })
            .collect();
        shared.update(fixed.clone())?;
        if !names.is_empty() {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                Error::internal(format!(
                    "{setting}: resolving a host name needs the async runtime"
                ))
            })?;
            runtime.spawn(discover(Arc::downgrade(&shared), fixed, names));
        }
        Ok(Self { shared })
    }

    /// The endpoints in use now.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.shared.backends.read().iter().map(|b| b.addr).collect()
    }

    /// The endpoint for the next call: of two taken in turn among those not ejected, the one
    /// with fewer calls in flight.
    fn pick(&self) -> Option<Arc<Backend>> {
        let backends = self.shared.backends.read();
        let now = Instant::now();
        let healthy: Vec<&Arc<Backend>> = backends.iter().filter(|b| !b.ejected(now)).collect();
        // With every endpoint ejected, try them anyway: better a call that may fail than none.
        let pool: Vec<&Arc<Backend>> = if healthy.is_empty() {
            backends.iter().collect()
        } else {
            healthy
        };
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let turn = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (pool[turn % n], pool[(turn + 1) % n]);
        let chosen = if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed) {
            b
        } else {
            a
        };
        Some(Arc::clone(chosen))
    }

    /// Wait (up to the connect timeout) for a name to resolve to at least one endpoint.
    async fn first_endpoint(&self) -> Option<Arc<Backend>> {
        if let Some(backend) = self.pick() {
            return Some(backend);
        }
        let mut resolved = self.shared.resolved.subscribe();
        let wait = crate::deadline::within(self.shared.settings.connect_timeout);
        let _ = tokio::time::timeout(wait, async {
            while self.shared.backends.read().is_empty() {
                if resolved.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        self.pick()
    }
}

impl Shared {
    /// Use exactly `addrs`, keeping the connections of those already in use.
    fn update(&self, mut addrs: Vec<SocketAddr>) -> Result<()> {
        addrs.sort();
        addrs.dedup();
        let mut backends = self.backends.write();
        if backends.iter().map(|b| b.addr).eq(addrs.iter().copied()) {
            return Ok(());
        }
        let mut existing: HashMap<SocketAddr, Arc<Backend>> =
            backends.drain(..).map(|b| (b.addr, b)).collect();
        for addr in addrs {
            let backend = match existing.remove(&addr) {
                Some(backend) => backend,
                None => Arc::new(Backend {
                    addr,
                    channel: self.endpoint(addr)?.connect_lazy(),
                    in_flight: AtomicUsize::new(0),
                    ejected_until: Mutex::new(None),
                }),
            };
            backends.push(backend);
        }
        let endpoints: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        drop(backends);
        tracing::info!(peer = %self.setting, ?endpoints, "peer endpoints changed");
        self.resolved.send_modify(|n| *n += 1);
        Ok(())
    }

    fn endpoint(&self, addr: SocketAddr) -> Result<Endpoint> {
        let url = format!("http://{addr}");
        Ok(Endpoint::from_shared(url.clone())
            .map_err(|e| Error::invalid(&self.setting, format!("{url:?}: {e}")))?
            .connect_timeout(self.settings.connect_timeout)
            .timeout(self.settings.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true))
    }
}

/// Resolve `names` every discovery interval until the channel is dropped.
async fn discover(shared: Weak<Shared>, fixed: Vec<SocketAddr>, names: Vec<(String, u16)>) {
    loop {
        let mut addrs = fixed.clone();
        let mut failed = None;
        for (host, port) in &names {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(found) => addrs.extend(found),
                Err(e) => failed = Some(format!("{host}: {e}")),
            }
        }
        let Some(strong) = shared.upgrade() else {
            return;
        };
        match failed {
            // A failed lookup keeps the endpoints last seen rather than dropping them all.
            Some(e) => {
                tracing::warn!(peer = %strong.setting, error = %e, "cannot resolve peer endpoints; keeping the last ones")
            }
            None => {
                if let Err(e) = strong.update(addrs) {
                    tracing::warn!(peer = %strong.setting, error = %e, "bad peer endpoint");
                }
            }
        }
        let interval = strong.settings.discovery_interval;
        drop(strong);
        tokio::time::sleep(interval).await;
    }
}

impl Service<http::Request<Body>> for Balanced {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // Each call waits for its own endpoint's readiness.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let Some(backend) = this.first_endpoint().await else {
                return Err(Status::unavailable(format!(
                    "{}: no endpoint to call (the name resolves to no address yet)",
                    this.shared.setting
                ))
                .into());
            };
            backend.in_flight.fetch_add(1, Ordering::Relaxed);
            let mut channel = backend.channel.clone();
            let result = async {
                channel.ready().await?;
                channel.call(request).await
            }
            .await;
            backend.in_flight.fetch_sub(1, Ordering::Relaxed);
            result.map_err(|e| {
                let error: BoxError = e.into();
                if is_timeout(&*error) {
                    return Status::deadline_exceeded(format!(
                        "{} at {} did not answer in time",
                        this.shared.setting, backend.addr
                    ))
                    .into();
                }
                // The connection failed or broke: leave this endpoint out for a while.
                *backend.ejected_until.lock() = Some(Instant::now() + this.shared.settings.eject_for);
                tracing::warn!(peer = %this.shared.setting, endpoint = %backend.addr, error = %error, "peer endpoint failed; ejecting it");
                error
            })
        })
    }
}

fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Bounds retries to a fraction of the calls that succeed, plus a small floor, so that retries
/// cannot multiply the load on a peer that is already failing (the retry budget of Finagle and
/// gRPC's retry throttling).
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<BudgetState>,
    /// Retry tokens earned per successful call.
    ratio: f64,
    /// Tokens granted per second whatever the traffic, so a quiet client can still retry.
    floor_per_second: f64,
    max_tokens: f64,
}

#[derive(Debug)]
struct BudgetState {
    tokens: f64,
    refilled: Instant,
}

impl Default for RetryBudget {
    /// 10% of successful calls, plus 10 retries a second.
    fn default() -> Self {
        Self::new(0.1, 10.0)
    }
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_second: f64) -> Self {
        Self {
            state: Mutex::new(BudgetState {
                tokens: floor_per_second,
                refilled: Instant::now(),
            }),
            ratio,
            floor_per_second,
            max_tokens: (floor_per_second * 10.0).max(100.0),
        }
    }

    /// Record a successful call.
    pub fn deposit(&self) {
        let mut state = self.state.lock();
        state.tokens = (state.tokens + self.ratio).min(self.max_tokens);
    }

    /// Take one retry from the budget; false if it is spent.
    pub fn withdraw(&self) -> bool {
        let mut state = self.state.lock();
        let now = Instant::now();
        let elapsed = now.duration_since(state.refilled).as_secs_f64();
        state.refilled = now;
        state.tokens = (state.tokens + elapsed * self.floor_per_second).min(self.max_tokens);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_addresses_or_names() {
        let targets = parse_targets(
            "X",
            "http://127.0.0.1:1, http://retrieval.engram.svc:50052,http://[::1]:3",
        )
        .unwrap();
        assert_eq!(
            targets,
            vec![
                Target::Fixed("127.0.0.1:1".parse().unwrap()),
                Target::Name {
                    host: "retrieval.engram.svc".into(),
                    port: 50052
                },
                Target::Fixed("[::1]:3".parse().unwrap()),
            ]
        );
        for bad in ["", "127.0.0.1:1", "https://a:1", "http://a", "http://"] {
            let error = parse_targets("ENGRAM_RETRIEVAL_URL", bad).unwrap_err();
            assert!(
                error.to_string().starts_with("ENGRAM_RETRIEVAL_URL"),
                "{bad:?}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn names_are_resolved_and_endpoints_balanced() {
        let settings = PeerSettings::new(Duration::from_secs(1), Duration::from_secs(60));
        let peer = Balanced::new("X", "http://localhost:9,http://127.0.0.2:9", settings).unwrap();
        let mut resolved = peer.shared.resolved.subscribe();
        while peer.endpoints().len() < 2 {
            tokio::time::timeout(Duration::from_secs(5), resolved.changed())
                .await
                .expect("localhost resolves")
                .unwrap();
        }
        let endpoints = peer.endpoints();
        assert!(
            endpoints.contains(&"127.0.0.2:9".parse().unwrap()),
            "{endpoints:?}"
        );
        assert!(
            endpoints
                .iter()
                .any(|a| a.ip().is_loopback() && a.ip() != "127.0.0.2".parse::<IpAddr>().unwrap()),
            "localhost resolved: {endpoints:?}"
        );
        let picked: std::collections::HashSet<SocketAddr> = (0..10)
            .filter_map(|_| peer.pick())
            .map(|b| b.addr)
            .collect();
        assert_eq!(picked.len(), endpoints.len(), "every endpoint is used");
    }

    #[tokio::test]
    async fn a_failed_endpoint_is_left_out() {
        let settings = PeerSettings::new(Duration::from_secs(1), Duration::from_secs(60));
        let peer = Balanced::new("X", "http://127.0.0.1:9,http://127.0.0.2:9", settings).unwrap();
        let first = peer.pick().unwrap();
        *first.ejected_until.lock() = Some(Instant::now() + Duration::from_secs(60));
        for _ in 0..10 {
            assert_ne!(peer.pick().unwrap().addr, first.addr);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_is_a_share_of_successes_plus_a_floor() {
        let budget = RetryBudget::new(0.5, 1.0);
        assert!(budget.withdraw(), "the floor grants one at once");
        assert!(!budget.withdraw());
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw(), "two successes earn one retry");
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(budget.withdraw(), "the floor refills");
    }
}
