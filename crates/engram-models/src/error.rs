use engram_core::Error;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot fetch the local embedding model into {dir}: {reason}")]
    Fetch { dir: String, reason: String },
    #[error("cannot load the local embedding model from {dir}: {reason}")]
    Load { dir: String, reason: String },
    #[error("embedding model {model} failed: {reason}")]
    Inference { model: String, reason: String },
    #[error("embedding model {model} is shutting down")]
    Closed { model: String },
}

impl From<ModelError> for Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Closed { .. } => Error::unavailable(e.to_string()),
            ModelError::Fetch { .. } | ModelError::Load { .. } => {
                Error::FailedPrecondition(e.to_string())
            }
            ModelError::Inference { .. } => Error::Internal(e.to_string()),
        }
    }
}
