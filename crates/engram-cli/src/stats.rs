//! `engram stats`: how the cluster is doing right now, from the four admin ports' `/metrics`,
//! without a Prometheus server.
//!
//! Two scrapes an interval apart give, per public RPC, the call rate, the share that failed and
//! the p50/p95/p99 latency over that interval (from the histograms' bucket counts, interpolated
//! as Prometheus' `histogram_quantile` does); the cache hit rates; the write log's backlog and
//! write-to-indexed latency; the circuit breakers' states; and each service's resident memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The services, in the order they are shown.
pub const SERVICES: [&str; 4] = ["gateway", "retrieval", "ingestion", "embedding"];
/// The public API's gRPC services, whose RPCs the table shows.
const PUBLIC: [&str; 2] = ["engram.v1.MemoryService", "engram.v1.ChatService"];
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// One sample of a Prometheus text page: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a page in the Prometheus text (or OpenMetrics) format; lines that do not
/// parse are skipped.
pub fn parse(page: &str) -> Vec<Sample> {
    page.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inside) = rest.strip_prefix('{') {
        let mut chars = inside.char_indices();
        let mut label = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    let (_, '"') = chars.next()? else {
                        return None;
                    };
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut label), value));
                }
                other => label.push(other),
            }
        };
        rest = &inside[end + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// One scrape of every service: its samples, or why it could not be read.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub at: Instant,
    pub services: BTreeMap<&'static str, Result<Vec<Sample>, String>>,
}

/// Read every service's `/metrics` (concurrently).
pub async fn scrape(admin: &[(&'static str, SocketAddr)]) -> Scrape {
    let at = Instant::now();
    let pages = futures::future::join_all(admin.iter().map(|&(service, addr)| async move {
        let page = match engram_telemetry::admin::fetch(addr, "/metrics", SCRAPE_TIMEOUT).await {
            Ok((200, body)) => Ok(parse(&body)),
            Ok((status, _)) => Err(format!("http://{addr}/metrics answered {status}")),
            Err(e) => Err(format!("unreachable ({e})")),
        };
        (service, page)
    }))
    .await;
    Scrape {
        at,
        services: pages.into_iter().collect(),
    }
}

/// What `engram stats` reports: the interval between two scrapes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub interval_seconds: f64,
    /// Public RPCs that were called since the gateway started, by full method name.
    pub rpcs: Vec<RpcStats>,
    pub caches: Vec<CacheStats>,
    pub write_log: Option<WriteLogStats>,
    pub breakers: Vec<BreakerStats>,
    pub services: Vec<ServiceStats>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RpcStats {
    pub method: String,
    /// A streaming RPC: its latency is until the response headers, and its status (hence the
    /// error rate) is of how the stream ended.
    pub streaming: bool,
    /// Calls completed per second over the interval.
    pub rate: f64,
    /// Share of those that did not end OK (0..1; None when there were none).
    pub error_rate: Option<f64>,
    /// Latency quantiles over the interval, in seconds (None when there were no calls).
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// Calls completed since the gateway started.
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheStats {
    pub service: String,
    pub cache: String,
    /// Lookups per second over the interval.
    pub rate: f64,
    /// Share answered from either level over the interval (None without lookups).
    pub hit_rate: Option<f64>,
    /// Share answered since the service started.
    pub hit_rate_since_start: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WriteLogStats {
    /// Entries not yet indexed, over all partitions.
    pub backlog: f64,
    /// Entries delivered to a worker and not yet acknowledged.
    pub pending: f64,
    /// Writes indexed per second over the interval.
    pub indexed_rate: f64,
    /// From acknowledgement to indexed, over the interval (seconds).
    pub to_indexed_p50: Option<f64>,
    pub to_indexed_p99: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BreakerStats {
    pub service: String,
    pub provider: String,
    pub state: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceStats {
    pub service: String,
    /// Resident memory in bytes (None when unreachable or not reported).
    pub rss_bytes: Option<f64>,
    /// Why the service could not be read.
    pub error: Option<String>,
}

/// The interval from `before` to `after`.
pub fn compute(before: &Scrape, after: &Scrape) -> Stats {
    let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    fn page<'a>(scrape: &'a Scrape, service: &str) -> &'a [Sample] {
        scrape
            .services
            .get(service)
            .and_then(|page| page.as_ref().ok())
            .map_or(&[], Vec::as_slice)
    }
    let gateway = (page(before, "gateway"), page(after, "gateway"));
    let ingestion = (page(before, "ingestion"), page(after, "ingestion"));
    let mut caches = Vec::new();
    let mut breakers = Vec::new();
    let mut services = Vec::new();
    for service in SERVICES {
        let (old, new) = (page(before, service), page(after, service));
        caches.extend(cache_stats(service, old, new, seconds));
        breakers.extend(breaker_stats(service, new));
        let error = after
            .services
            .get(service)
            .and_then(|page| page.as_ref().err().cloned());
        services.push(ServiceStats {
            service: service.to_string(),
            // 0: the platform does not say.
            rss_bytes: sum(new, "process_resident_memory_bytes", |_| true).filter(|b| *b > 0.0),
            error,
        });
    }
    Stats {
        interval_seconds: seconds,
        rpcs: rpc_stats(gateway.0, gateway.1, seconds),
        caches,
        write_log: write_log_stats(ingestion.0, ingestion.1, seconds),
        breakers,
        services,
    }
}

/// The sum of the samples named `name` whose labels pass `keep` (None when there are none).
fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> Option<f64> {
    let mut found = None;
    for s in samples.iter().filter(|s| s.name == name && keep(s)) {
        *found.get_or_insert(0.0) += s.value;
    }
    found
}

/// `after - before` of one counter series (a restart in between counts from zero).
fn increase(before: Option<f64>, after: Option<f64>) -> f64 {
    let (before, after) = (before.unwrap_or(0.0), after.unwrap_or(0.0));
    if after >= before {
        after - before
    } else {
        after
    }
}

/// The increase over the interval of the counter series named `name` whose labels pass
/// `keep`: each series on its own (one that restarted counts from zero), then summed, as
/// Prometheus' `sum(increase(...))` does.
fn total_increase(
    before: &[Sample],
    after: &[Sample],
    name: &str,
    keep: impl Fn(&Sample) -> bool,
) -> f64 {
    after
        .iter()
        .filter(|s| s.name == name && keep(s))
        .map(|now| {
            let then = before
                .iter()
                .find(|s| s.name == name && s.labels == now.labels)
                .map(|s| s.value);
            increase(then, Some(now.value))
        })
        .sum()
}

/// The cumulative bucket counts of histogram `name` (the series passing `keep`) increased over
/// the interval, by upper bound: each series on its own (one whose count fell restarted and
/// counts from zero), then summed per bound, and kept non-decreasing.
fn bucket_increase(
    before: &[Sample],
    after: &[Sample],
    name: &str,
    keep: &dyn Fn(&Sample) -> bool,
) -> Vec<(f64, f64)> {
    type Series = Vec<(String, String)>;
    let bucket = format!("{name}_bucket");
    // Each series (its labels but `le`): its (bound, cumulative count)s.
    let series = |samples: &[Sample]| {
        let mut by_series: Vec<(Series, Vec<(f64, f64)>)> = Vec::new();
        for s in samples.iter().filter(|s| s.name == bucket && keep(s)) {
            let Some(bound) = s.label("le").and_then(|le| match le {
                "+Inf" => Some(f64::INFINITY),
                le => le.parse::<f64>().ok(),
            }) else {
                continue;
            };
            let labels: Series = s
                .labels
                .iter()
                .filter(|(n, _)| n != "le")
                .cloned()
                .collect();
            match by_series.iter_mut().find(|(l, _)| *l == labels) {
                Some((_, buckets)) => buckets.push((bound, s.value)),
                None => by_series.push((labels, vec![(bound, s.value)])),
            }
        }
        for (_, buckets) in &mut by_series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        by_series
    };
    let old = series(before);
    let mut total: Vec<(f64, f64)> = Vec::new();
    for (labels, now) in series(after) {
        let then = old.iter().find(|(l, _)| *l == labels).map(|(_, b)| b);
        let count = |buckets: &[(f64, f64)]| buckets.last().map_or(0.0, |(_, c)| *c);
        let restarted = then.is_some_and(|then| count(then) > count(&now));
        for (bound, value) in now {
            let was = then
                .filter(|_| !restarted)
                .and_then(|then| then.iter().find(|(b, _)| *b == bound))
                .map_or(0.0, |(_, c)| *c);
            let grew = (value - was).max(0.0);
            match total.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, sum)) => *sum += grew,
                None => total.push((bound, grew)),
            }
        }
    }
    total.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut highest = 0.0_f64;
    for (_, count) in &mut total {
        highest = highest.max(*count);
        *count = highest;
    }
    total
}

/// The `q` quantile of cumulative `buckets`, interpolated linearly inside its bucket as
/// Prometheus' `histogram_quantile` does (the highest finite bound when it falls in +Inf).
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let share = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

fn rpc_stats(before: &[Sample], after: &[Sample], seconds: f64) -> Vec<RpcStats> {
    let mut methods: Vec<(String, String)> = after
        .iter()
        .filter(|s| s.name == "grpc_server_handled_total")
        .filter_map(|s| Some((s.label("grpc_service")?, s.label("grpc_method")?)))
        .filter(|(service, _)| PUBLIC.contains(service))
        .map(|(service, method)| (service.to_string(), method.to_string()))
        .collect();
    methods.sort();
    methods.dedup();
    methods
        .into_iter()
        .map(|(service, method)| {
            let this = |s: &Sample| {
                s.label("grpc_service") == Some(service.as_str())
                    && s.label("grpc_method") == Some(method.as_str())
            };
            let handled = "grpc_server_handled_total";
            let calls = total_increase(before, after, handled, this);
            let failed_code = |s: &Sample| this(s) && s.label("grpc_code") != Some("OK");
            let failed = total_increase(before, after, handled, failed_code);
            let buckets = bucket_increase(before, after, "grpc_server_handling_seconds", &this);
            let total = sum(after, handled, this).unwrap_or(0.0) as u64;
            RpcStats {
                streaming: service == "engram.v1.ChatService",
                method: method.clone(),
                rate: calls / seconds,
                error_rate: (calls > 0.0).then(|| (failed / calls).min(1.0)),
                p50: quantile(0.50, &buckets),
                p95: quantile(0.95, &buckets),
                p99: quantile(0.99, &buckets),
                total,
            }
        })
        .collect()
}

fn cache_stats(
    service: &str,
    before: &[Sample],
    after: &[Sample],
    seconds: f64,
) -> Vec<CacheStats> {
    const REQUESTS: &str = "engram_cache_requests_total";
    let mut caches: Vec<String> = after
        .iter()
        .filter(|s| s.name == REQUESTS)
        .filter_map(|s| s.label("cache").map(str::to_string))
        .collect();
    caches.sort();
    caches.dedup();
    caches
        .into_iter()
        .map(|cache| {
            // A lookup tries the in-process level first and Redis on a local miss: it is a hit
            // when either level hits, a miss when the last level it tried missed.
            let of = |s: &Sample| s.label("cache") == Some(cache.as_str());
            let hits = |s: &Sample| of(s) && s.label("result") == Some("hit");
            let local = |s: &Sample| of(s) && s.label("level") == Some("local");
            let (hits_now, lookups_now) = (sum(after, REQUESTS, hits), sum(after, REQUESTS, local));
            let lookups = total_increase(before, after, REQUESTS, local);
            let hit = total_increase(before, after, REQUESTS, hits);
            let share = |hit: f64, lookups: f64| (lookups > 0.0).then(|| (hit / lookups).min(1.0));
            CacheStats {
                service: service.to_string(),
                rate: lookups / seconds,
                hit_rate: share(hit, lookups),
                hit_rate_since_start: share(hits_now.unwrap_or(0.0), lookups_now.unwrap_or(0.0)),
                cache,
            }
        })
        .collect()
}

fn write_log_stats(before: &[Sample], after: &[Sample], seconds: f64) -> Option<WriteLogStats> {
    const BACKLOG: &str = "engram_log_backlog";
    const TO_INDEXED: &str = "engram_log_write_to_indexed_seconds";
    // The write log's partitions (the extraction log has its own).
    let write = |s: &Sample| s.label("log") == Some("write");
    let backlog = sum(after, BACKLOG, write)?;
    let buckets = bucket_increase(before, after, TO_INDEXED, &|_| true);
    let indexed = buckets.last().map_or(0.0, |(_, count)| *count);
    Some(WriteLogStats {
        backlog,
        pending: sum(after, "engram_log_pending", write).unwrap_or(0.0),
        indexed_rate: indexed / seconds,
        to_indexed_p50: quantile(0.50, &buckets),
        to_indexed_p99: quantile(0.99, &buckets),
    })
}

fn breaker_stats(service: &str, samples: &[Sample]) -> Vec<BreakerStats> {
    samples
        .iter()
        .filter(|s| s.name == "engram_circuit_breaker_state")
        .map(|s| BreakerStats {
            service: service.to_string(),
            provider: s.label("provider").unwrap_or("?").to_string(),
            state: match s.value as i64 {
                0 => "closed",
                1 => "open",
                2 => "half-open",
                _ => "unknown",
            },
        })
        .collect()
}

// --- the command --------------------------------------------------------------------------

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// How long to measure: the rates and latencies are over this interval.
    #[arg(long, default_value = "3s", value_parser = engram_domain::parse_duration)]
    interval: Duration,
    /// Refresh every interval until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print JSON (one object per interval) instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gateway: engram_gateway::Listen,
    #[command(flatten)]
    retrieval: engram_retrieval::Listen,
    #[command(flatten)]
    ingestion: engram_ingestion::Listen,
    #[command(flatten)]
    embedding: engram_embedding::Listen,
}

/// `engram stats`: exit code 0, or 1 when no service could be read.
pub async fn run(args: StatsArgs) -> std::process::ExitCode {
    if args.interval.is_zero() {
        eprintln!("engram stats: --interval must be greater than zero");
        return std::process::ExitCode::from(2);
    }
    let admin = [
        ("gateway", args.gateway.admin_listen),
        ("retrieval", args.retrieval.admin_listen),
        ("ingestion", args.ingestion.admin_listen),
        ("embedding", args.embedding.admin_listen),
    ];
    let mut before = scrape(&admin).await;
    loop {
        tokio::time::sleep(args.interval).await;
        let after = scrape(&admin).await;
        let stats = compute(&before, &after);
        let reachable = after.services.values().any(Result::is_ok);
        if args.json {
            match serde_json::to_string(&stats) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("engram stats: {e}"),
            }
        } else {
            if args.watch {
                // Clear the terminal and home the cursor.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&stats, &admin));
        }
        if !args.watch {
            return if reachable {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            };
        }
        before = after;
    }
}

fn millis(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "-".into(), |s| format!("{:.1}%", s * 100.0))
}

fn mebibytes(bytes: Option<f64>) -> String {
    bytes.map_or_else(
        || "-".into(),
        |b| format!("{:.0} MiB", b / (1024.0 * 1024.0)),
    )
}

/// The tables `engram stats` prints.
pub fn render(stats: &Stats, admin: &[(&str, SocketAddr)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let gateway = admin
        .first()
        .map_or_else(String::new, |(_, a)| a.to_string());
    let _ = writeln!(
        out,
        "engram stats over the last {:.1} s (gateway admin {gateway})",
        stats.interval_seconds
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "rpc", "calls/s", "errors", "p50", "p95", "p99", "total"
    );
    if stats.rpcs.is_empty() {
        let _ = writeln!(out, "(no public calls since the gateway started)");
    }
    for rpc in &stats.rpcs {
        let _ = writeln!(
            out,
            "{:<28} {:>9.1} {:>7} {:>9} {:>9} {:>9} {:>9}",
            if rpc.streaming {
                format!("{} (stream)", rpc.method)
            } else {
                rpc.method.clone()
            },
            rpc.rate,
            percent(rpc.error_rate),
            millis(rpc.p50),
            millis(rpc.p95),
            millis(rpc.p99),
            rpc.total
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>9} {:>12}",
        "cache", "lookups/s", "hit rate", "since start"
    );
    for cache in &stats.caches {
        let _ = writeln!(
            out,
            "{:<28} {:>9.1} {:>9} {:>12}",
            format!("{} ({})", cache.cache, cache.service),
            cache.rate,
            percent(cache.hit_rate),
            percent(cache.hit_rate_since_start)
        );
    }
    let _ = writeln!(out);
    match &stats.write_log {
        Some(log) => {
            let _ = writeln!(
                out,
                "write log: {:.0} not yet indexed ({:.0} being indexed), {:.1} indexed/s, write to indexed p50 {} p99 {}",
                log.backlog,
                log.pending,
                log.indexed_rate,
                millis(log.to_indexed_p50),
                millis(log.to_indexed_p99)
            );
        }
        None => {
            let _ = writeln!(out, "write log: - (ingestion not reporting one)");
        }
    }
    if stats.breakers.is_empty() {
        let _ = writeln!(out, "breakers: none (no outside providers configured)");
    } else {
        let states: Vec<String> = stats
            .breakers
            .iter()
            .map(|b| format!("{} {} ({})", b.provider, b.state, b.service))
            .collect();
        let _ = writeln!(out, "breakers: {}", states.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<12} {:>9}  admin", "service", "rss");
    for (service, addr) in admin {
        let Some(s) = stats.services.iter().find(|s| s.service == *service) else {
            continue;
        };
        let status = s.error.clone().unwrap_or_else(|| format!("http://{addr}"));
        let _ = writeln!(
            out,
            "{:<12} {:>9}  {status}",
            s.service,
            mebibytes(s.rss_bytes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_labels_escapes_and_special_values() {
        let page = "# HELP x help\n\
            grpc_server_handled_total{grpc_service=\"engram.v1.MemoryService\",grpc_method=\"Recall\",grpc_code=\"OK\"} 7\n\
            weird{a=\"x\\\"y\\\\z\",b=\"c,d}\"} 1.5e3\n\
            h_bucket{le=\"+Inf\"} 3\n\
            plain 2\n\
            not a sample\n\
            # EOF\n";
        let samples = parse(page);
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].label("grpc_method"), Some("Recall"));
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(samples[1].label("a"), Some("x\"y\\z"));
        assert_eq!(samples[1].label("b"), Some("c,d}"));
        assert_eq!(samples[1].value, 1500.0);
        assert_eq!(samples[2].label("le"), Some("+Inf"));
        assert_eq!(samples[3].name, "plain");
    }

    #[test]
    fn a_restarted_series_counts_from_zero_on_its_own() {
        let page = |ok: u32, bad: u32| {
            parse(&format!(
                "c_total{{code=\"OK\"}} {ok}\nc_total{{code=\"Internal\"}} {bad}\n\
                 h_bucket{{m=\"a\",le=\"1\"}} {ok}\nh_bucket{{m=\"a\",le=\"+Inf\"}} {ok}\n"
            ))
        };
        // OK fell (restarted: 5 since); Internal grew by 10.
        let (before, after) = (page(1000, 10), page(5, 20));
        assert_eq!(total_increase(&before, &after, "c_total", |_| true), 15.0);
        let failed = |s: &Sample| s.label("code") != Some("OK");
        assert_eq!(total_increase(&before, &after, "c_total", failed), 10.0);
        let buckets = bucket_increase(&before, &after, "h", &|_| true);
        assert_eq!(buckets, vec![(1.0, 5.0), (f64::INFINITY, 5.0)]);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 10 observations: 5 up to 1 ms, 4 more up to 2 ms, 1 above 4 ms.
        let buckets = [
            (0.001, 5.0),
            (0.002, 9.0),
            (0.004, 9.0),
            (f64::INFINITY, 10.0),
        ];
        assert_eq!(quantile(0.5, &buckets), Some(0.001));
        let p90 = quantile(0.9, &buckets).unwrap_or_default();
        assert!((p90 - 0.002).abs() < 1e-12, "{p90}");
        // In +Inf: the highest finite bound.
        assert_eq!(quantile(0.99, &buckets), Some(0.004));
        assert_eq!(quantile(0.5, &[(0.001, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[]), None);
    }

    fn scrape_of(at: Instant, gateway: &str, ingestion: &str) -> Scrape {
        let mut services = BTreeMap::new();
        services.insert("gateway", Ok(parse(gateway)));
        services.insert("ingestion", Ok(parse(ingestion)));
        services.insert("retrieval", Err("unreachable (refused)".to_string()));
        Scrape { at, services }
    }

    #[test]
    fn an_interval_gives_rates_errors_latencies_hit_rates_and_the_backlog() {
        let rpc = |ok: u32, bad: u32, fast: u32, slow: u32| {
            format!(
                "grpc_server_handled_total{{grpc_service=\"engram.v1.MemoryService\",grpc_method=\"Recall\",grpc_code=\"OK\"}} {ok}\n\
                 grpc_server_handled_total{{grpc_service=\"engram.v1.MemoryService\",grpc_method=\"Recall\",grpc_code=\"INVALID_ARGUMENT\"}} {bad}\n\
                 grpc_server_handled_total{{grpc_service=\"engram.internal.v1.Retrieval\",grpc_method=\"Search\",grpc_code=\"OK\"}} 99\n\
                 grpc_server_handling_seconds_bucket{{grpc_service=\"engram.v1.MemoryService\",grpc_method=\"Recall\",le=\"0.001\"}} {fast}\n\
                 grpc_server_handling_seconds_bucket{{grpc_service=\"engram.v1.MemoryService\",grpc_method=\"Recall\",le=\"0.002\"}} {}\n\
                 grpc_server_handling_seconds_bucket{{grpc_service=\"engram.v1.MemoryService\",grpc_method=\"Recall\",le=\"+Inf\"}} {}\n\
                 engram_cache_requests_total{{cache=\"result\",level=\"local\",result=\"hit\"}} {fast}\n\
                 engram_cache_requests_total{{cache=\"result\",level=\"local\",result=\"miss\"}} {slow}\n\
                 engram_cache_requests_total{{cache=\"result\",level=\"redis\",result=\"miss\"}} {slow}\n\
                 process_resident_memory_bytes 104857600\n",
                fast + slow,
                fast + slow
            )
        };
        let log = |backlog: u32, indexed: u32| {
            format!(
                "engram_log_backlog{{log=\"write\",partition=\"0\"}} {backlog}\n\
                 engram_log_backlog{{log=\"extract\",partition=\"0\"}} 1000\n\
                 engram_log_write_to_indexed_seconds_bucket{{le=\"0.01\"}} {indexed}\n\
                 engram_log_write_to_indexed_seconds_bucket{{le=\"+Inf\"}} {indexed}\n"
            )
        };
        let t0 = Instant::now();
        let before = scrape_of(t0, &rpc(10, 0, 10, 0), &log(0, 5));
        let after = scrape_of(t0 + Duration::from_secs(2), &rpc(16, 2, 14, 4), &log(3, 25));
        let stats = compute(&before, &after);
        assert_eq!(stats.rpcs.len(), 1, "{:?}", stats.rpcs);
        let recall = &stats.rpcs[0];
        assert_eq!(recall.method, "Recall");
        assert!(
            (recall.rate - 4.0).abs() < 1e-9,
            "8 calls in 2 s: {}",
            recall.rate
        );
        assert_eq!(recall.error_rate, Some(0.25));
        assert_eq!(recall.p50, Some(0.001));
        assert_eq!(recall.total, 18);
        let result = &stats.caches[0];
        assert_eq!(
            (result.cache.as_str(), result.service.as_str()),
            ("result", "gateway")
        );
        assert_eq!(result.hit_rate, Some(0.5));
        let log = stats.write_log.as_ref().expect("ingestion reports its log");
        assert_eq!(log.backlog, 3.0);
        assert!((log.indexed_rate - 10.0).abs() < 1e-9);
        // All 20 in (0, 10 ms]: the 99th is 99% of the way through that bucket.
        let p99 = log.to_indexed_p99.unwrap_or_default();
        assert!((p99 - 0.0099).abs() < 1e-12, "{p99}");
        let gateway = &stats.services[0];
        assert_eq!(gateway.rss_bytes, Some(104_857_600.0));
        let retrieval = stats.services.iter().find(|s| s.service == "retrieval");
        assert!(retrieval.is_some_and(|s| s.error.is_some()));
        let text = render(
            &stats,
            &[("gateway", "127.0.0.1:9091".parse().expect("addr"))],
        );
        assert!(text.contains("Recall"), "{text}");
        assert!(text.contains("25.0%"), "{text}");
        assert!(text.contains("100 MiB"), "{text}");
    }
}
