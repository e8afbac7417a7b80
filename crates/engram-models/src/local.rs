//! all-MiniLM-L6-v2 on candle: BERT, mean pooling over the attention mask, L2 normalisation —
//! the same recipe as sentence-transformers, so vectors match the published model's.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::Semaphore;

use crate::EmbeddingProvider;
use crate::error::ModelError;

pub const MODEL_ID: &str = "all-MiniLM-L6-v2";
pub const DIMENSION: usize = 384;
/// sentence-transformers' `max_seq_length` for this model; longer texts are truncated.
const MAX_TOKENS: usize = 256;
/// Texts per forward pass: bounds padding waste and peak memory.
const MAX_MODEL_BATCH: usize = 32;

pub struct LocalEmbedder {
    model: Arc<Model>,
    /// One forward pass at a time: candle already spreads a pass over the cores.
    running: Arc<Semaphore>,
}

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("model", &MODEL_ID)
            .finish()
    }
}

impl LocalEmbedder {
    /// Load from a directory holding `config.json`, `tokenizer.json` and `model.safetensors`.
    /// Blocking (reads about 90 MB); call it off the async runtime.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let load_error = |reason: String| ModelError::Load {
            dir: dir.display().to_string(),
            reason,
        };
        let config_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| load_error(format!("config.json: {e}")))?;
        let config: Config = serde_json::from_str(&config_text)
            .map_err(|e| load_error(format!("config.json: {e}")))?;
        if config.hidden_size != DIMENSION {
            return Err(load_error(format!(
                "config.json describes a {}-dimensional model, expected {DIMENSION} ({MODEL_ID})",
                config.hidden_size
            )));
        }
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_error(format!("tokenizer.json: {e}")))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| load_error(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let weights = std::fs::read(dir.join("model.safetensors"))
            .map_err(|e| load_error(format!("model.safetensors: {e}")))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| load_error(format!("model.safetensors: {e}")))?;
        let bert =
            BertModel::load(vb, &config).map_err(|e| load_error(format!("BERT weights: {e}")))?;
        Ok(Self {
            model: Arc::new(Model { bert, tokenizer }),
            running: Arc::new(Semaphore::new(1)),
        })
    }

    /// Embed on the calling thread. Texts are sorted by length and run in batches of similar
    /// lengths so padding stays small; results come back in input order.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.model.embed(texts)
    }
}

impl Model {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(MAX_MODEL_BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
            let vectors = self
                .forward(&batch)
                .map_err(|reason| ModelError::Inference {
                    model: MODEL_ID.to_string(),
                    reason,
                })?;
            for (&i, vector) in chunk.iter().zip(vectors) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    fn forward(&self, batch: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let encodings = self
            .tokenizer
            .encode_batch(batch.to_vec(), true)
            .map_err(|e| format!("tokenizing: {e}"))?;
        let rows = encodings.len();
        let cols = encodings.first().map_or(0, |e| e.get_ids().len());
        let flatten = |get: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| get(e).iter().copied())
                .collect()
        };
        let device = Device::Cpu;
        let tensor = |data: Vec<u32>| {
            Tensor::from_vec(data, (rows, cols), &device).map_err(|e| e.to_string())
        };
        let ids = tensor(flatten(tokenizers::Encoding::get_ids))?;
        let type_ids = tensor(flatten(tokenizers::Encoding::get_type_ids))?;
        let mask = tensor(flatten(tokenizers::Encoding::get_attention_mask))?;
        let hidden = self
            .bert
            .forward(&ids, &type_ids, Some(&mask))
            .map_err(|e| format!("forward pass: {e}"))?;
        mean_pool_normalize(&hidden, &mask).map_err(|e| format!("pooling: {e}"))
    }
}

/// Mean of the token vectors that the attention mask keeps, scaled to unit length.
fn mean_pool_normalize(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    let mean = summed.broadcast_div(&counts)?;
    let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norms)?.to_vec2::<f32>()
}

#[async_trait]
impl EmbeddingProvider for LocalEmbedder {
    fn model_id(&self) -> &str {
        MODEL_ID
    }

    fn dimension(&self) -> usize {
        DIMENSION
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ModelError> {
        let _permit =
            self.running
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ModelError::Closed {
                    model: MODEL_ID.to_string(),
                })?;
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || model.embed(&texts))
            .await
            .map_err(|e| ModelError::Inference {
                model: MODEL_ID.to_string(),
                reason: format!("inference task failed: {e}"),
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch;

    fn model() -> LocalEmbedder {
        let dir = std::env::var_os("ENGRAM_MODEL_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(fetch::default_model_dir);
        fetch::ensure_model(&dir).unwrap();
        LocalEmbedder::load(&dir).unwrap()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_are_unit_length_and_semantic() {
        let model = model();
        let texts: Vec<String> = [
            "I adopted a cat named Miso",
            "what pet do I have",
            "The quarterly revenue report is due on Friday",
        ]
        .map(String::from)
        .to_vec();
        let v = model.embed_blocking(&texts).unwrap();
        for vector in &v {
            assert_eq!(vector.len(), DIMENSION);
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        }
        assert!(cosine(&v[0], &v[1]) > cosine(&v[2], &v[1]) + 0.1);
    }

    #[test]
    fn batching_and_padding_do_not_change_vectors() {
        let model = model();
        let texts: Vec<String> = (0..40)
            .map(|i| format!("sentence number {i} {}", "with more words ".repeat(i % 7)))
            .collect();
        let batched = model.embed_blocking(&texts).unwrap();
        for (i, text) in texts.iter().enumerate().step_by(9) {
            let single = model.embed_blocking(std::slice::from_ref(text)).unwrap();
            let similarity = cosine(&single[0], &batched[i]);
            assert!(similarity > 0.9999, "text {i}: cosine {similarity}");
        }
    }

    #[test]
    fn long_texts_are_truncated_not_refused() {
        let model = model();
        let long = "word ".repeat(5000);
        let v = model.embed_blocking(&[long]).unwrap();
        assert_eq!(v[0].len(), DIMENSION);
    }
}
