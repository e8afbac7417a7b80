use engram_domain::Error;
use engram_resilience::CallError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot fetch the local embedding model into {dir}: {reason}")]
    Fetch { dir: String, reason: String },
    #[error("cannot load the local embedding model from {dir}: {reason}")]
    Load { dir: String, reason: String },
    #[error("embedding model {model} failed: {reason}")]
    Inference { model: String, reason: String },
    #[error("embedding model {model} has {queued} texts queued already")]
    Overloaded { model: String, queued: usize },
    #[error("embedding model {model} is shutting down")]
    Closed { model: String },
    #[error("{setting}: {reason}")]
    Config { setting: String, reason: String },
    #[error(transparent)]
    Provider(#[from] CallError),
    /// A stream that failed mid-answer: `reason` is for callers, `detail` (what the provider
    /// sent, which may quote prompts or its own internals) for the log only.
    #[error("{provider} {reason}")]
    Stream {
        provider: String,
        reason: String,
        detail: String,
    },
}

impl From<ModelError> for Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Provider(call) => Error::from(call),
            ModelError::Stream { ref detail, .. } => {
                if !detail.is_empty() {
                    tracing::warn!(error = %e, %detail, "chat stream failed mid-answer");
                }
                Error::unavailable(e.to_string())
            }
            ModelError::Closed { .. } => Error::unavailable(e.to_string()),
            ModelError::Overloaded { .. } => Error::ResourceExhausted {
                reason: e.to_string(),
                retry_after: Some(std::time::Duration::from_millis(50)),
            },
            ModelError::Config { setting, reason } => Error::invalid(setting, reason),
            ModelError::Fetch { .. } | ModelError::Load { .. } => {
                Error::FailedPrecondition(e.to_string())
            }
            ModelError::Inference { .. } => Error::Internal(e.to_string()),
        }
    }
}
