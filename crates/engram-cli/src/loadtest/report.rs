//! ghz's JSON report (durations in nanoseconds, histogram marks in seconds) and its summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use engram_proto::tonic::Code;
use serde::{Deserialize, Serialize};

use super::{Plan, Stop, Tally};

/// The percentiles ghz reports.
const PERCENTAGES: [u32; 7] = [10, 25, 50, 75, 90, 95, 99];
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub end_reason: String,
    pub options: Options,
    pub date: String,
    pub count: u64,
    pub total: u64,
    pub average: u64,
    pub fastest: u64,
    pub slowest: u64,
    pub rps: f64,
    pub error_distribution: BTreeMap<String, u64>,
    pub status_code_distribution: BTreeMap<String, u64>,
    pub latency_distribution: Vec<Percentile>,
    pub histogram: Vec<Bucket>,
    #[serde(default)]
    pub details: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    pub host: String,
    pub call: String,
    pub insecure: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    pub concurrency: usize,
    pub connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rps: Option<f64>,
    /// Nanoseconds, as ghz writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Percentile {
    pub percentage: u32,
    /// Nanoseconds.
    pub latency: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Bucket {
    /// Seconds.
    pub mark: f64,
    pub count: u64,
    pub frequency: f64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// gRPC code names as ghz (Go) writes them: the names of engram's metrics.
pub fn code_name(code: Code) -> &'static str {
    engram_telemetry::code_name(usize::try_from(i32::from(code)).unwrap_or(2))
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

impl Report {
    pub(super) fn new(plan: &Plan, date: SystemTime, elapsed: Duration, tally: &Tally) -> Self {
        let micros = |us: u64| us.saturating_mul(1000);
        let ok = &tally.ok;
        let answered_ok = ok.len();
        let (fastest, slowest) = if answered_ok > 0 {
            (micros(ok.min()), micros(ok.max()))
        } else {
            (0, 0)
        };
        let latency_distribution = if answered_ok > 0 {
            PERCENTAGES
                .iter()
                .map(|&p| Percentile {
                    percentage: p,
                    latency: micros(ok.value_at_quantile(f64::from(p) / 100.0)),
                })
                .collect()
        } else {
            Vec::new()
        };
        let histogram = if answered_ok > 0 {
            let (low, high) = (ok.min() as f64, ok.max() as f64);
            let step = (high - low) / BUCKETS as f64;
            let marks: Vec<f64> = (0..=BUCKETS)
                .map(|i| {
                    if i == BUCKETS {
                        high
                    } else {
                        low + step * i as f64
                    }
                })
                .collect();
            let mut counts = vec![0u64; marks.len()];
            for value in ok.iter_recorded() {
                let v = ok.lowest_equivalent(value.value_iterated_to()) as f64;
                let bucket = marks.iter().position(|m| v <= *m).unwrap_or(BUCKETS);
                counts[bucket] += value.count_at_value();
            }
            marks
                .iter()
                .zip(counts)
                .map(|(mark, count)| Bucket {
                    mark: mark / 1e6,
                    count,
                    frequency: count as f64 / answered_ok as f64,
                })
                .collect()
        } else {
            Vec::new()
        };
        let average = if tally.count > 0 {
            u64::try_from(tally.total_micros / u128::from(tally.count)).unwrap_or(u64::MAX)
        } else {
            0
        };
        let (total, duration) = match plan.stop {
            Stop::Total(n) => (Some(n), None),
            Stop::Duration(d) => (None, Some(nanos(d))),
        };
        Self {
            name: plan.name.clone(),
            end_reason: match plan.stop {
                Stop::Total(_) => "normal",
                Stop::Duration(_) => "timeout",
            }
            .to_string(),
            options: Options {
                host: plan.host.clone(),
                call: plan.call.clone(),
                insecure: true,
                total,
                concurrency: plan.concurrency,
                connections: plan.connections,
                rps: plan.rps,
                duration,
                timeout: plan.timeout.map(nanos),
            },
            date: rfc3339(date),
            count: tally.count,
            total: nanos(elapsed),
            average: micros(average),
            fastest,
            slowest,
            rps: tally.count as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            error_distribution: tally.errors.clone(),
            status_code_distribution: tally
                .codes
                .iter()
                .map(|(code, n)| (code.to_string(), *n))
                .collect(),
            latency_distribution,
            histogram,
            details: Vec::new(),
        }
    }

    /// The percentile `p` (one of 10, 25, 50, 75, 90, 95, 99), if any call succeeded.
    pub fn percentile(&self, p: u32) -> Option<Duration> {
        self.latency_distribution
            .iter()
            .find(|l| l.percentage == p)
            .map(|l| Duration::from_nanos(l.latency))
    }

    /// ghz's summary text.
    pub fn summary(&self) -> String {
        let ms = |ns: u64| format!("{:.2} ms", ns as f64 / 1e6);
        let mut out = String::new();
        let _ = writeln!(out, "Summary:");
        if let Some(name) = &self.name {
            let _ = writeln!(out, "  Name:\t{name}");
        }
        let _ = writeln!(out, "  Count:\t{}", self.count);
        let _ = writeln!(out, "  Total:\t{}", ms(self.total));
        let _ = writeln!(out, "  Slowest:\t{}", ms(self.slowest));
        let _ = writeln!(out, "  Fastest:\t{}", ms(self.fastest));
        let _ = writeln!(out, "  Average:\t{}", ms(self.average));
        let _ = writeln!(out, "  Requests/sec:\t{:.2}", self.rps);
        let _ = writeln!(out, "\nResponse time histogram:");
        let most = self
            .histogram
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(0)
            .max(1);
        for bucket in &self.histogram {
            let bar = "∎".repeat(usize::try_from(bucket.count * 40 / most).unwrap_or(40));
            let _ = writeln!(
                out,
                "  {:>10.3} [{}]\t|{bar}",
                bucket.mark * 1e3,
                bucket.count
            );
        }
        let _ = writeln!(out, "\nLatency distribution:");
        for l in &self.latency_distribution {
            let _ = writeln!(out, "  {} % in {}", l.percentage, ms(l.latency));
        }
        let _ = writeln!(out, "\nStatus code distribution:");
        for (code, n) in &self.status_code_distribution {
            let _ = writeln!(out, "  [{code}]\t{n} responses");
        }
        if !self.error_distribution.is_empty() {
            let _ = writeln!(out, "\nError distribution:");
            for (error, n) in &self.error_distribution {
                let _ = writeln!(out, "  [{n}]\t{error}");
            }
        }
        out
    }
}

/// A bar chart (SVG) of p50, p90 and p99 of each named report, in milliseconds on a log scale,
/// with the value written on each bar.
pub fn latency_svg(reports: &[(String, Report)]) -> String {
    const W: f64 = 900.0;
    const ROW: f64 = 70.0;
    const LEFT: f64 = 20.0;
    const RIGHT: f64 = 60.0;
    let shown: [(u32, &str); 3] = [(50, "#4c78a8"), (90, "#f58518"), (99, "#e45756")];
    let values: Vec<Vec<f64>> = reports
        .iter()
        .map(|(_, r)| {
            shown
                .iter()
                .map(|(p, _)| r.percentile(*p).map_or(0.0, |d| d.as_secs_f64() * 1e3))
                .collect()
        })
        .collect();
    let top = values.iter().flatten().copied().fold(1.0f64, f64::max);
    let (lo, hi) = (0.1f64.log10(), (top * 2.0).log10());
    let x = |ms: f64| LEFT + (ms.max(0.1).log10() - lo) / (hi - lo) * (W - LEFT - RIGHT);
    let height = 70.0 + ROW * reports.len() as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    svg.push_str(&format!(
        r#"<rect width="{W}" height="{height}" fill="white"/><text x="10" y="20" font-size="14">Latency per scenario (ms, log scale): p50, p90, p99</text>"#
    ));
    let mut tick = 0.1;
    while tick <= top * 2.0 {
        let tx = x(tick);
        let label = if tick < 1.0 {
            format!("{tick:.1}")
        } else {
            format!("{tick:.0}")
        };
        svg.push_str(&format!(
            r##"<line x1="{tx:.1}" y1="35" x2="{tx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#666">{label} ms</text>"##,
            height - 25.0,
            height - 10.0
        ));
        tick *= 10.0;
    }
    for (i, ((name, _), row)) in reports.iter().zip(&values).enumerate() {
        let y = 40.0 + ROW * i as f64;
        svg.push_str(&format!(
            r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#,
            y + 10.0,
            name.replace('&', "&amp;").replace('<', "&lt;")
        ));
        for (k, ((p, colour), ms)) in shown.iter().zip(row).enumerate() {
            let by = y + 16.0 + 15.0 * k as f64;
            svg.push_str(&format!(
                r#"<rect x="{LEFT}" y="{by:.1}" width="{:.1}" height="13" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="10">p{p} {ms:.2}</text>"#,
                (x(*ms) - LEFT).max(1.0),
                x(*ms) + 4.0,
                by + 10.0
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}
