//! ghz's configuration file, read as ghz reads it: the same keys, durations as strings like
//! `30s`, `data` as one message or an array used round-robin, per-request templates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// A ghz configuration (JSON). Keys engram's runner does not act on are accepted and listed by
/// [`Config::ignored`], so a config written for ghz runs unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    #[serde(default)]
    pub proto: Option<String>,
    /// `package.Service.Method` or `package.Service/Method`.
    pub call: String,
    #[serde(default)]
    pub host: Option<String>,
    /// Requests to make (ignored when `duration` is set). ghz's default: 200.
    #[serde(default)]
    pub total: Option<u64>,
    /// Workers making requests. ghz's default: 50.
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// Connections the workers share. ghz's default: 1.
    #[serde(default)]
    pub connections: Option<u64>,
    /// Requests per second for the whole run (open loop); unset: as fast as the workers go.
    #[serde(default, alias = "qps")]
    pub rps: Option<f64>,
    #[serde(default)]
    pub duration: Option<String>,
    /// Per request; ghz's default: 20s, and `0` for none.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub data_file: Option<PathBuf>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub insecure: Option<bool>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// A run as the configuration and the command line settle it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub call: String,
    pub host: String,
    pub stop: Stop,
    pub concurrency: usize,
    pub connections: usize,
    pub rps: Option<f64>,
    pub timeout: Option<Duration>,
    /// Messages (JSON templates) used round-robin.
    pub data: Vec<Value>,
    pub metadata: BTreeMap<String, String>,
    pub name: Option<String>,
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    Total(u64),
    Duration(Duration),
}

impl Config {
    /// Read a config file; `data-file` is resolved against the file's directory.
    pub fn read(path: &Path) -> Result<(Self, PathBuf), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a ghz JSON config: {e}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((config, base))
    }

    /// Keys ghz knows that this runner leaves alone (TLS files, proto import paths, ...).
    pub fn ignored(&self) -> Vec<&str> {
        self.other.keys().map(String::as_str).collect()
    }

    /// Settle the run: `duration` and `host` from the command line win over the file.
    pub fn plan(
        &self,
        base: &Path,
        duration: Option<Duration>,
        host: Option<&str>,
    ) -> Result<Plan, String> {
        let duration = match (duration, &self.duration) {
            (Some(d), _) => Some(d),
            (None, Some(text)) if !text.is_empty() && text != "0" => {
                Some(parse_duration("duration", text)?)
            }
            _ => None,
        };
        let stop = match duration {
            Some(d) if !d.is_zero() => Stop::Duration(d),
            _ => Stop::Total(self.total.unwrap_or(200)),
        };
        let concurrency = self.concurrency.unwrap_or(50).max(1);
        if let Stop::Total(total) = stop
            && total < concurrency
        {
            return Err(format!(
                "total ({total}) must be at least concurrency ({concurrency})"
            ));
        }
        let timeout = match self.timeout.as_deref() {
            None => Some(Duration::from_secs(20)),
            Some("0") | Some("0s") => None,
            Some(text) => Some(parse_duration("timeout", text)?),
        };
        if let Some(rps) = self.rps
            && !(rps.is_finite() && rps >= 0.0)
        {
            return Err(format!("rps: {rps} is not a rate"));
        }
        let data = match (&self.data, &self.data_file) {
            (Some(_), Some(_)) => return Err("set data or data-file, not both".into()),
            (Some(data), None) => messages(data.clone())?,
            (None, Some(file)) => {
                let path = base.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("data-file {}: {e}", path.display()))?;
                let value: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("data-file {}: not JSON: {e}", path.display()))?;
                messages(value)?
            }
            (None, None) => vec![Value::Object(Default::default())],
        };
        for message in &data {
            check_templates(message)?;
        }
        let host = host
            .map(str::to_string)
            .or_else(|| self.host.clone())
            .ok_or("host is not set (in the config or with --host)")?;
        Ok(Plan {
            call: self.call.clone(),
            host,
            stop,
            concurrency: usize::try_from(concurrency).unwrap_or(usize::MAX),
            connections: usize::try_from(self.connections.unwrap_or(1).max(1)).unwrap_or(1),
            rps: self.rps.filter(|r| *r > 0.0),
            timeout,
            data,
            metadata: self.metadata.clone().unwrap_or_default(),
            name: self.name.clone(),
        })
    }
}

/// ghz's durations: Go's `300ms`, `1m30s`, and also plain seconds.
pub fn parse_duration(key: &str, text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        return Ok(Duration::from_secs_f64(seconds.max(0.0)));
    }
    engram_domain::parse_duration(text).map_err(|e| format!("{key}: {e}"))
}

/// `data` as ghz takes it: one object, or a non-empty array of objects.
fn messages(value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Object(_) => Ok(vec![value]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => Ok(items),
        Value::Array(items) if items.is_empty() => Err("data: the array must not be empty".into()),
        _ => Err("data: must be an object or an array of objects".into()),
    }
}

/// The template actions this runner fills in (ghz's call data).
const ACTIONS: [&str; 7] = [
    ".RequestNumber",
    ".WorkerID",
    ".TimestampUnix",
    ".TimestampUnixMilli",
    ".TimestampUnixNano",
    ".UUID",
    "newUUID",
];

fn check_templates(value: &Value) -> Result<(), String> {
    match value {
        Value::String(text) => {
            let mut rest = text.as_str();
            while let Some(start) = rest.find("{{") {
                let end = rest[start..]
                    .find("}}")
                    .ok_or_else(|| format!("data: unclosed template in {text:?}"))?;
                let action = rest[start + 2..start + end].trim();
                if !ACTIONS.contains(&action) {
                    return Err(format!(
                        "data: template {{{{{action}}}}} is not supported; known: {}",
                        ACTIONS.join(", ")
                    ));
                }
                rest = &rest[start + end + 2..];
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(check_templates),
        Value::Object(map) => map.values().try_for_each(check_templates),
        _ => Ok(()),
    }
}

/// What a request's templates are filled with.
#[derive(Debug, Clone, Copy)]
pub struct CallData {
    pub request_number: u64,
    pub worker_id: usize,
    pub unix_nanos: u128,
}

/// `template` with every action filled in.
pub fn render(template: &Value, data: &CallData) -> Value {
    match template {
        Value::String(text) if text.contains("{{") => {
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(start) = rest.find("{{") {
                out.push_str(&rest[..start]);
                let Some(end) = rest[start..].find("}}") else {
                    break;
                };
                let action = rest[start + 2..start + end].trim();
                match action {
                    ".RequestNumber" => out.push_str(&data.request_number.to_string()),
                    ".WorkerID" => out.push_str(&data.worker_id.to_string()),
                    ".TimestampUnix" => {
                        out.push_str(&(data.unix_nanos / 1_000_000_000).to_string())
                    }
                    ".TimestampUnixMilli" => {
                        out.push_str(&(data.unix_nanos / 1_000_000).to_string())
                    }
                    ".TimestampUnixNano" => out.push_str(&data.unix_nanos.to_string()),
                    _ => out.push_str(&uuid::Uuid::now_v7().to_string()),
                }
                rest = &rest[start + end + 2..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| render(v, data)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render(v, data)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ghz_config_is_planned_with_ghz_defaults() {
        let config: Config = serde_json::from_str(
            r#"{"proto":"memory.proto","call":"engram.v1.MemoryService.Recall","host":"h:1",
                "import-paths":["proto"],"insecure":true,"concurrency":4,"total":100,
                "timeout":"500ms","data":{"query":"q {{.RequestNumber}}"}}"#,
        )
        .unwrap();
        assert_eq!(config.ignored(), vec!["import-paths"]);
        let plan = config.plan(Path::new("."), None, None).unwrap();
        assert_eq!(plan.stop, Stop::Total(100));
        assert_eq!(plan.concurrency, 4);
        assert_eq!(plan.connections, 1);
        assert_eq!(plan.timeout, Some(Duration::from_millis(500)));
        let with_duration = config
            .plan(Path::new("."), Some(Duration::from_secs(3)), Some("x:2"))
            .unwrap();
        assert_eq!(with_duration.stop, Stop::Duration(Duration::from_secs(3)));
        assert_eq!(with_duration.host, "x:2");
    }

    #[test]
    fn durations_read_like_go() {
        for (text, expected) in [
            ("30s", 30_000),
            ("1m30s", 90_000),
            ("250ms", 250),
            ("2", 2_000),
        ] {
            assert_eq!(
                parse_duration("d", text).unwrap(),
                Duration::from_millis(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn templates_are_filled_and_unknown_ones_refused() {
        let template = serde_json::json!({"a": ["n{{.RequestNumber}}-w{{ .WorkerID }}"], "b": 1});
        check_templates(&template).unwrap();
        let data = CallData {
            request_number: 7,
            worker_id: 2,
            unix_nanos: 1_700_000_000_123_456_789,
        };
        assert_eq!(
            render(&template, &data),
            serde_json::json!({"a": ["n7-w2"], "b": 1})
        );
        let error = check_templates(&serde_json::json!({"a": "{{randomString 8}}"})).unwrap_err();
        assert!(error.contains("randomString"), "{error}");
    }
}
