//! `engram bench`: a load runner that reads ghz's configuration files and writes ghz's JSON
//! report, for machines where ghz cannot be installed.
//!
//! Closed loop (no `rps`): `concurrency` workers each send a request as soon as their last one
//! is answered. Open loop (`rps` set): request *n* is due at `start + n / rps`, and its latency
//! is measured from that due time, not from when a worker got round to sending it — so a
//! server that stalls is charged for every request that had to wait (no coordinated omission).
//! Latencies go into an HDR histogram (microsecond resolution, 3 significant digits).

mod call;
mod config;
mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use engram_proto::tonic::transport::{Channel, Endpoint};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::time::Instant;

pub use call::Method;
pub use config::{CallData, Config, Plan, Stop, parse_duration, render};
pub use report::{Report, code_name, latency_svg};

/// What the workers gather.
#[derive(Debug)]
pub struct Tally {
    /// Latencies of the calls answered OK, in microseconds.
    pub ok: Histogram<u64>,
    /// Sum of every latency (answered or not), for the average.
    pub total_micros: u128,
    pub count: u64,
    pub codes: BTreeMap<&'static str, u64>,
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            ok: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
            }),
            total_micros: 0,
            count: 0,
            codes: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<(), engram_proto::tonic::Status>) {
        let micros = latency.as_micros().max(1);
        self.count += 1;
        self.total_micros += micros;
        match outcome {
            Ok(()) => {
                *self.codes.entry("OK").or_default() += 1;
                let _ = self.ok.record(u64::try_from(micros).unwrap_or(u64::MAX));
            }
            Err(status) => {
                *self.codes.entry(code_name(status.code())).or_default() += 1;
                let error = format!(
                    "rpc error: code = {} desc = {}",
                    code_name(status.code()),
                    status.message()
                );
                *self.errors.entry(error).or_default() += 1;
            }
        }
    }
}

/// Channels to `host` (`host:port` or a URL), `connections` of them.
fn channels(host: &str, connections: usize) -> Result<Vec<Channel>, String> {
    let url = if host.contains("://") {
        host.to_string()
    } else {
        format!("http://{host}")
    };
    (0..connections)
        .map(|_| {
            Endpoint::from_shared(url.clone())
                .map(|e| {
                    e.tcp_nodelay(true)
                        .connect_timeout(Duration::from_secs(10))
                        .connect_lazy()
                })
                .map_err(|e| format!("host {host:?}: {e}"))
        })
        .collect()
}

/// Run `plan`, calling `progress(done)` as requests complete; the report has the run's
/// `date`, `options` and every distribution ghz reports.
pub async fn run(
    plan: &Plan,
    method: &Method,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Report, String> {
    // Every template must make a valid message before the run starts.
    for (i, template) in plan.data.iter().enumerate() {
        let sample = render(
            template,
            &CallData {
                request_number: 0,
                worker_id: 0,
                unix_nanos: 0,
            },
        );
        method
            .encode(&sample)
            .map_err(|e| format!("data[{i}]: {e}"))?;
    }
    let channels = channels(&plan.host, plan.connections)?;
    let tally = Arc::new(Mutex::new(Tally::new()));
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(progress);
    let date = SystemTime::now();
    let start = Instant::now();
    let end = match plan.stop {
        Stop::Duration(d) => Some(start + d),
        Stop::Total(_) => None,
    };
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..plan.concurrency {
        let channel = channels[worker % channels.len()].clone();
        let (plan, method) = (plan.clone(), method.clone());
        let (tally, next, done, progress) = (
            Arc::clone(&tally),
            Arc::clone(&next),
            Arc::clone(&done),
            Arc::clone(&progress),
        );
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if let Stop::Total(total) = plan.stop
                    && n >= total
                {
                    break;
                }
                // Open loop: request n is due at its place in the schedule, whenever a worker
                // is free to send it; its latency counts from then.
                let due = match plan.rps {
                    Some(rps) => start + Duration::from_secs_f64(n as f64 / rps),
                    None => Instant::now(),
                };
                if end.is_some_and(|end| due >= end) {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let data = CallData {
                    request_number: n,
                    worker_id: worker,
                    unix_nanos: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos()),
                };
                let template = &plan.data[usize::try_from(n).unwrap_or(0) % plan.data.len()];
                let outcome = match method.encode(&render(template, &data)) {
                    Ok(body) => {
                        let sent = match plan.rps {
                            Some(_) => due,
                            None => Instant::now(),
                        };
                        let outcome = method.call(channel.clone(), body, plan.timeout).await;
                        (sent.elapsed(), outcome)
                    }
                    Err(e) => (
                        Duration::ZERO,
                        Err(engram_proto::tonic::Status::invalid_argument(e)),
                    ),
                };
                tally.lock().record(outcome.0, outcome.1);
                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.map_err(|e| format!("a load worker failed: {e}"))?;
    }
    let elapsed = start.elapsed();
    let tally = Arc::try_unwrap(tally)
        .map(Mutex::into_inner)
        .map_err(|_| "a load worker outlived the run".to_string())?;
    Ok(Report::new(plan, date, elapsed, &tally))
}

/// `engram bench`'s command line.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A ghz JSON configuration file (for example one of `loadtest/ghz/`).
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Run for this long instead of the config's `total` (like ghz's `-z`).
    #[arg(long, value_parser = engram_domain::parse_duration)]
    pub duration: Option<Duration>,
    /// The gateway to load, instead of the config's `host`.
    #[arg(long)]
    pub host: Option<String>,
    /// Write ghz's JSON report here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    /// API key, sent as `authorization: Bearer <key>` unless the config's metadata has one.
    #[arg(long = "api-key", env = "ENGRAM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Run `engram bench`: the summary on stdout, the JSON report in `--output`.
pub async fn command(args: BenchArgs) -> Result<Report, String> {
    let (config, base) = Config::read(&args.config)?;
    let ignored = config.ignored();
    if !ignored.is_empty() {
        eprintln!(
            "note: ghz settings this runner does not use: {}",
            ignored.join(", ")
        );
    }
    let mut plan = config.plan(&base, args.duration, args.host.as_deref())?;
    if let Some(key) = args.api_key.filter(|k| !k.is_empty()) {
        plan.metadata
            .entry("authorization".into())
            .or_insert_with(|| format!("Bearer {key}"));
    }
    let method = Method::resolve(&plan.call, &plan.metadata)?;
    let done = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&done);
    let bar = progress_bar(&plan, Arc::clone(&done));
    let report = run(&plan, &method, move |n| counter.store(n, Ordering::Relaxed)).await;
    bar.abort();
    eprintln!();
    let report = report?;
    if let Some(path) = &args.output {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report)
}

/// A progress bar on stderr (when it is a terminal), redrawn four times a second.
fn progress_bar(plan: &Plan, done: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    use std::io::{IsTerminal as _, Write as _};
    let stop = plan.stop;
    let started = Instant::now();
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let n = done.load(Ordering::Relaxed);
            let fraction = match stop {
                Stop::Total(total) => n as f64 / total.max(1) as f64,
                Stop::Duration(d) => started.elapsed().as_secs_f64() / d.as_secs_f64().max(1e-9),
            }
            .clamp(0.0, 1.0);
            let filled = (fraction * 40.0) as usize;
            eprint!(
                "\r[{}{}] {:>3.0}%  {n} requests",
                "#".repeat(filled),
                ".".repeat(40 - filled),
                fraction * 100.0
            );
            let _ = std::io::stderr().flush();
        }
    })
}

/// `engram bench-report`: ghz JSON reports into a Markdown table and an SVG latency chart.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// ghz JSON reports (from `engram bench --output` or from ghz itself).
    #[arg(required = true)]
    pub reports: Vec<std::path::PathBuf>,
    /// Write the latency chart here.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
}

/// The Markdown table of `reports` (printed), and the chart.
pub fn report_command(args: ReportArgs) -> Result<String, String> {
    let mut reports = Vec::new();
    for path in &args.reports {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let report: Report = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a ghz report: {e}", path.display()))?;
        let name = report.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default()
        });
        reports.push((name, report));
    }
    if let Some(svg) = &args.svg {
        std::fs::write(svg, latency_svg(&reports))
            .map_err(|e| format!("{}: {e}", svg.display()))?;
    }
    Ok(markdown(&reports))
}

fn markdown(reports: &[(String, Report)]) -> String {
    let ms = |d: Option<Duration>| {
        d.map_or("—".to_string(), |d| {
            format!("{:.2} ms", d.as_secs_f64() * 1e3)
        })
    };
    let mut out = String::from(
        "| scenario | calls | calls/s | p50 | p90 | p99 | max | status codes |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (name, r) in reports {
        let codes: Vec<String> = r
            .status_code_distribution
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        out.push_str(&format!(
            "| {name} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            r.count,
            r.rps,
            ms(r.percentile(50)),
            ms(r.percentile(90)),
            ms(r.percentile(99)),
            ms(Some(Duration::from_nanos(r.slowest))),
            codes.join(", ")
        ));
    }
    out
}
