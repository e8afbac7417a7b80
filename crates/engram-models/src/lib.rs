//! Embedding models.
//!
//! [`EmbeddingProvider`] is one source of vectors: the local all-MiniLM-L6-v2 running on candle
//! ([`LocalEmbedder`]), and later remote OpenAI-compatible APIs. [`fetch`] puts the local
//! model's weights on the machine the first time they are needed.

mod error;
pub mod fetch;
mod local;

use async_trait::async_trait;

pub use error::ModelError;
pub use local::{DIMENSION as LOCAL_DIMENSION, LocalEmbedder, MODEL_ID as LOCAL_MODEL_ID};

/// A source of text embeddings.
#[async_trait]
pub trait EmbeddingProvider: Send + Sync + 'static {
    /// Identifies the model, e.g. `all-MiniLM-L6-v2`; part of embedding cache keys.
    fn model_id(&self) -> &str;
    fn dimension(&self) -> usize;
    /// One unit-length vector per text, in input order.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ModelError>;
}
