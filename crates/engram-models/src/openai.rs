//! Any OpenAI-compatible `POST {base_url}/embeddings` endpoint: OpenAI itself, HF
//! text-embeddings-inference, vLLM, Ollama.
//!
//! Every request goes through the provider's [`Outbound`] guard (timeouts, retries only for
//! retryable failures honouring `Retry-After`, circuit breaker, bulkhead), and every answer is
//! checked — one vector per input, each index once, the configured dimension, finite values —
//! before anything downstream (cache, index) sees it.

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use async_trait::async_trait;
use engram_domain::api::Purpose;
use engram_resilience::{Failure, Outbound, OutboundMetrics, Policy};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::EmbeddingProvider;
use crate::error::ModelError;

/// An API key. Never printed: `Debug` shows only that there is one.
#[derive(Clone)]
pub struct ProviderKey(String);

impl std::fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProviderKey(<redacted>)")
    }
}

impl ProviderKey {
    /// The key itself, for the `Authorization` header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// Read the key from the environment variable named `var`.
    pub fn from_env(setting: &str, var: &str) -> Result<Self, ModelError> {
        match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(Self(key.trim().to_string())),
            _ => Err(ModelError::Config {
                setting: setting.to_string(),
                reason: format!("names the environment variable {var}, which is not set"),
            }),
        }
    }

    /// Read the key from a file (as mounted from a Kubernetes Secret); surrounding whitespace
    /// is ignored.
    pub fn from_file(setting: &str, path: &Path) -> Result<Self, ModelError> {
        let key = std::fs::read_to_string(path).map_err(|e| ModelError::Config {
            setting: setting.to_string(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        if key.trim().is_empty() {
            return Err(ModelError::Config {
                setting: setting.to_string(),
                reason: format!("{} is empty", path.display()),
            });
        }
        Ok(Self(key.trim().to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The model name sent with each request, e.g. `text-embedding-3-small`.
    pub model: String,
    pub api_key: Option<ProviderKey>,
    /// The dimension every returned vector must have.
    pub dimension: usize,
    /// Most inputs per HTTP request; larger batches are split.
    pub max_inputs_per_request: usize,
    /// Longest input the provider takes, in cl100k_base tokens (OpenAI's embedding models:
    /// 8191); longer texts are cut to it before they are sent, so one long text cannot make the
    /// provider refuse a request. 0: sent whole.
    pub max_input_tokens: usize,
    pub policy: Policy,
}

#[derive(Serialize)]
struct EmbeddingsRequest<'a> {
    model: &'a str,
    input: &'a [String],
    encoding_format: &'static str,
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

pub struct OpenAiEmbedder {
    client: reqwest::Client,
    url: String,
    config: OpenAiConfig,
    outbound: Outbound,
    /// Cuts inputs to `max_input_tokens` (None: no limit).
    truncate: Option<crate::tokens::TokenCounter>,
}

impl std::fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("url", &self.url)
            .field("model", &self.config.model)
            .finish_non_exhaustive()
    }
}

/// reqwest is built without a bundled crypto provider; use ring, once per process.
pub(crate) fn install_tls_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Fails only if another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl OpenAiEmbedder {
    pub fn new(config: OpenAiConfig, metrics: &OutboundMetrics) -> Result<Self, ModelError> {
        install_tls_provider();
        let base = config.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ModelError::Config {
                setting: "ENGRAM_EMBEDDING_BASE_URL".into(),
                reason: format!("{:?} is not an http(s) URL", config.base_url),
            });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ModelError::Config {
                setting: "ENGRAM_EMBEDDING_BASE_URL".into(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        let outbound = Outbound::new(
            format!("embedding provider {}", config.model),
            config.policy,
            metrics,
        );
        let truncate = match config.max_input_tokens {
            0 => None,
            _ => Some(crate::tokens::TokenCounter::new(
                crate::tokens::TokenizerKind::Cl100kBase,
                &config.model,
            )?),
        };
        Ok(Self {
            client,
            url: format!("{base}/embeddings"),
            config,
            outbound,
            truncate,
        })
    }

    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    async fn request(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, Failure> {
        let mut request = self.client.post(&self.url).json(&EmbeddingsRequest {
            model: &self.config.model,
            input: inputs,
            encoding_format: "float",
        });
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(&key.0);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Failure::Connect(describe(&e)))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // A body that breaks off mid-way is a broken connection: retryable.
        let body = response
            .bytes()
            .await
            .map_err(|e| Failure::Connect(describe(&e)))?;
        if !status.is_success() {
            return Err(classify_status(status, retry_after, &body));
        }
        self.vectors(inputs.len(), &body)
    }

    /// Check the answer against the protocol and the configured dimension.
    fn vectors(&self, expected: usize, body: &[u8]) -> Result<Vec<Vec<f32>>, Failure> {
        let parsed: EmbeddingsResponse = serde_json::from_slice(body).map_err(|e| {
            Failure::Invalid(format!(
                "the body is not an embeddings response ({e}): {}",
                snippet(body)
            ))
        })?;
        if parsed.data.len() != expected {
            return Err(Failure::Invalid(format!(
                "{} embeddings for {expected} inputs",
                parsed.data.len()
            )));
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
        for item in parsed.data {
            let dimension = item.embedding.len();
            if dimension != self.config.dimension {
                return Err(Failure::Invalid(format!(
                    "{dimension}-dimensional vectors, expected {}",
                    self.config.dimension
                )));
            }
            if item.embedding.iter().any(|v| !v.is_finite()) {
                return Err(Failure::Invalid("a vector with non-finite values".into()));
            }
            match vectors.get_mut(item.index) {
                Some(slot @ None) => *slot = Some(item.embedding),
                Some(Some(_)) => {
                    return Err(Failure::Invalid(format!("index {} twice", item.index)));
                }
                None => {
                    return Err(Failure::Invalid(format!(
                        "index {} out of range",
                        item.index
                    )));
                }
            }
        }
        // Every slot is filled: `expected` distinct in-range indexes were seen.
        Ok(vectors.into_iter().flatten().collect())
    }
}

pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_string()
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by model providers).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

pub(crate) fn classify_status(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Failure {
    let message = snippet(body);
    if status == StatusCode::TOO_MANY_REQUESTS {
        Failure::RateLimited { retry_after }
    } else if status.is_server_error() {
        Failure::Server {
            status: status.as_u16(),
            retry_after,
            message,
        }
    } else {
        Failure::Rejected {
            status: status.as_u16(),
            message,
        }
    }
}

#[async_trait]
impl EmbeddingProvider for OpenAiEmbedder {
    fn model_id(&self) -> &str {
        &self.config.model
    }

    fn dimension(&self) -> usize {
        self.config.dimension
    }

    /// OpenAI's embedding models are symmetric; `purpose` is not sent.
    async fn embed(
        &self,
        texts: Vec<String>,
        _purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut vectors = Vec::with_capacity(texts.len());
        let max = self.config.max_input_tokens;
        let texts = match self.truncate {
            // Tokenising tens of kilobytes is CPU work: off the async runtime.
            Some(counter) if texts.iter().any(|t| t.len() > max) => {
                tokio::task::spawn_blocking(move || {
                    texts
                        .into_iter()
                        .map(|text| match counter.truncate(&text, max) {
                            std::borrow::Cow::Borrowed(_) => text,
                            std::borrow::Cow::Owned(cut) => cut,
                        })
                        .collect::<Vec<String>>()
                })
                .await
                .map_err(|e| ModelError::Inference {
                    model: self.config.model.clone(),
                    reason: format!("cutting inputs to {max} tokens failed: {e}"),
                })?
            }
            _ => texts,
        };
        for chunk in texts.chunks(self.config.max_inputs_per_request.max(1)) {
            let embedded = self.outbound.call(|| self.request(chunk)).await?;
            vectors.extend(embedded);
        }
        Ok(vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_for_retries() {
        let after = Some(Duration::from_secs(2));
        assert_eq!(
            classify_status(StatusCode::TOO_MANY_REQUESTS, after, b""),
            Failure::RateLimited { retry_after: after }
        );
        assert!(classify_status(StatusCode::SERVICE_UNAVAILABLE, after, b"down").retryable());
        assert!(classify_status(StatusCode::INTERNAL_SERVER_ERROR, None, b"").retryable());
        assert!(!classify_status(StatusCode::BAD_REQUEST, None, b"too long").retryable());
        assert!(!classify_status(StatusCode::UNAUTHORIZED, None, b"").retryable());
    }

    #[test]
    fn api_keys_are_never_printed() {
        let key = ProviderKey::new("sk-secret");
        assert!(!format!("{key:?}").contains("secret"));
    }
}
