//! Models: embedding models behind one trait, [`EmbeddingProvider`], a streamed chat model
//! ([`ChatModel`]) and the token counter prompt budgets use ([`TokenCounter`]).
//!
//! Embedding providers:
//!
//! - [`LocalEmbedder`]: all-MiniLM-L6-v2 on candle, on a dedicated inference thread fed by a
//!   bounded queue (never on the async runtime); [`fetch`] puts its weights on the machine.
//! - [`OpenAiEmbedder`]: any OpenAI-compatible `/v1/embeddings` endpoint (OpenAI, HF
//!   text-embeddings-inference, vLLM, Ollama), every call through `engram-resilience`, every
//!   response checked (count, order, dimension, finite values) before it is used.

pub mod chat;
mod error;
pub mod fetch;
mod local;
mod openai;
pub mod tokens;

use async_trait::async_trait;
use engram_domain::api::Purpose;

pub use chat::{
    ChatChunk, ChatConfig, ChatMessage, ChatModel, ChatModelArgs, ChatRequest, ChatStream,
    Completion,
};
pub use error::ModelError;
pub use local::{
    DIMENSION as LOCAL_DIMENSION, LocalEmbedder, LocalOptions, MODEL_ID as LOCAL_MODEL_ID,
};
pub use openai::{OpenAiConfig, OpenAiEmbedder, ProviderKey};
pub use tokens::{TokenCounter, TokenizerKind};

/// A source of text embeddings.
#[async_trait]
pub trait EmbeddingProvider: Send + Sync + 'static {
    /// Identifies the model, e.g. `all-MiniLM-L6-v2`; part of embedding cache keys.
    fn model_id(&self) -> &str;
    fn dimension(&self) -> usize;
    /// One vector of [`Self::dimension`] per text, in input order.
    async fn embed(
        &self,
        texts: Vec<String>,
        purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}
