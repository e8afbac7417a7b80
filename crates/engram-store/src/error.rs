use engram_domain::Error;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("vector store engine error during {operation}: {message}")]
    Engine {
        operation: &'static str,
        message: String,
    },
    #[error(
        "vector of memory {id} has dimension {got}, but the index holds {expected}-dimensional vectors"
    )]
    DimensionMismatch {
        id: String,
        expected: usize,
        got: usize,
    },
    #[error("sparse vector of {id} is invalid: {reason}")]
    InvalidVector { id: String, reason: String },
    #[error("memory {id} belongs to tenant {actual}, not to {expected} whose write this is")]
    TenantMismatch {
        id: String,
        expected: String,
        actual: String,
    },
    #[error("stored memory {id} cannot be read: {reason}")]
    CorruptPayload { id: String, reason: String },
    #[error("cannot open the index at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("vector store task failed: {0}")]
    Task(String),
    #[error("the vector store is closed")]
    Closed,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DimensionMismatch { .. } => Error::FailedPrecondition(e.to_string()),
            StoreError::TenantMismatch { .. } => Error::invalid("ops", e.to_string()),
            StoreError::InvalidVector { .. } => Error::invalid("sparse", e.to_string()),
            StoreError::Closed => Error::unavailable(e.to_string()),
            StoreError::Engine { .. }
            | StoreError::CorruptPayload { .. }
            | StoreError::Open { .. }
            | StoreError::Task(_) => Error::Internal(e.to_string()),
        }
    }
}
