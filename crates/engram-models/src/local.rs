//! all-MiniLM-L6-v2 on candle: BERT, mean pooling over the attention mask, L2 normalisation —
//! the same recipe as sentence-transformers, so vectors match the published model's.
//!
//! Inference runs on dedicated threads — one worker per core, each running one forward pass
//! at a time single-threaded (see `engram_runtime::server::main_entry`), never on the async
//! runtime. A request's texts are sorted by length and cut into forward batches of similar
//! lengths, so padding stays small and the workers share a large request. The queue is
//! bounded in texts; a request that would overfill it is refused at once
//! (RESOURCE_EXHAUSTED) rather than waiting behind an ever longer queue.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use engram_domain::api::Purpose;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

use crate::EmbeddingProvider;
use crate::error::ModelError;

pub const MODEL_ID: &str = "all-MiniLM-L6-v2";
pub const DIMENSION: usize = 384;
/// sentence-transformers' `max_seq_length` for this model; longer texts are truncated.
const MAX_TOKENS: usize = 256;
/// Texts waiting for or in inference, at most.
const QUEUE_CAPACITY: usize = 4096;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>;

/// One forward pass for a worker.
struct Job {
    texts: Vec<String>,
    reply: Reply,
}

/// How the local model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalOptions {
    /// Inference threads (0: one per core).
    pub workers: usize,
    /// Most texts per forward pass: bounds padding waste and peak memory. A request of fewer
    /// than `workers * max_batch` texts is shared evenly between the workers.
    pub max_batch: usize,
}

impl LocalOptions {
    /// The number of workers `workers` stands for.
    pub fn resolved_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            workers: 0,
            max_batch: 32,
        }
    }
}

pub struct LocalEmbedder {
    model: Arc<Model>,
    jobs: mpsc::Sender<Job>,
    /// Texts admitted and not yet embedded; bounded by `QUEUE_CAPACITY`.
    queued: Arc<AtomicUsize>,
    max_batch: usize,
    workers: usize,
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
    pub fn load(dir: &Path, options: LocalOptions) -> Result<Self, ModelError> {
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
        let model = Arc::new(Model { bert, tokenizer });
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let queued = Arc::new(AtomicUsize::new(0));
        for n in 0..options.resolved_workers() {
            let (model, queue, queued) = (model.clone(), queue.clone(), queued.clone());
            std::thread::Builder::new()
                .name(format!("engram-inference-{n}"))
                .spawn(move || {
                    // Ends when the embedder (the only sender) is dropped.
                    loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(Job { texts, reply }) = job else {
                            return;
                        };
                        // A caller that went away does not need its vectors.
                        if !reply.is_closed() {
                            let _ = reply.send(model.forward_batch(&texts));
                        }
                        queued.fetch_sub(texts.len(), Ordering::AcqRel);
                    }
                })
                .map_err(|e| load_error(format!("cannot start an inference thread: {e}")))?;
        }
        Ok(Self {
            model,
            jobs,
            queued,
            max_batch: options.max_batch.max(1),
            workers: options.resolved_workers(),
        })
    }

    /// Reserve queue room for `n` texts, or refuse.
    fn admit(&self, n: usize) -> Result<(), ModelError> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                // One request larger than the queue still runs when the queue is empty.
                (queued == 0 || queued + n <= QUEUE_CAPACITY).then_some(queued + n)
            })
            .map(drop)
            .map_err(|queued| ModelError::Overloaded {
                model: MODEL_ID.to_string(),
                queued,
            })
    }

    /// Embed on the calling thread (benchmarks, tests), batched as [`EmbeddingProvider::embed`]
    /// does; results come back in input order.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let (order, batches) = length_sorted_batches(texts, self.max_batch);
        let vectors = batches
            .iter()
            .map(|batch| self.model.forward_batch(batch))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(in_input_order(&order, vectors.into_iter().flatten()))
    }
}

/// The input positions sorted by text length, and the texts in that order cut into batches.
fn length_sorted_batches(texts: &[String], max_batch: usize) -> (Vec<usize>, Vec<Vec<String>>) {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let batches = order
        .chunks(max_batch)
        .map(|chunk| chunk.iter().map(|&i| texts[i].clone()).collect())
        .collect();
    (order, batches)
}

/// Put vectors produced in `order` back into input order.
fn in_input_order(order: &[usize], vectors: impl Iterator<Item = Vec<f32>>) -> Vec<Vec<f32>> {
    let mut out = vec![Vec::new(); order.len()];
    for (&i, vector) in order.iter().zip(vectors) {
        out[i] = vector;
    }
    out
}

impl Model {
    /// One forward pass over texts of similar lengths.
    fn forward_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let batch: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.forward(&batch)
            .map_err(|reason| ModelError::Inference {
                model: MODEL_ID.to_string(),
                reason,
            })
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

    /// all-MiniLM-L6-v2 embeds queries and documents alike.
    async fn embed(
        &self,
        texts: Vec<String>,
        _purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.admit(texts.len())?;
        // Enough forward passes that every worker has a share of a large request.
        let per_pass = self.max_batch.min(texts.len().div_ceil(self.workers));
        let (order, batches) = length_sorted_batches(&texts, per_pass);
        let mut answers = Vec::with_capacity(batches.len());
        for texts in batches {
            let (reply, answer) = oneshot::channel();
            if self.jobs.send(Job { texts, reply }).is_err() {
                return Err(ModelError::Closed {
                    model: MODEL_ID.to_string(),
                });
            }
            answers.push(answer);
        }
        let mut vectors = Vec::with_capacity(texts.len());
        for answer in answers {
            let batch = answer.await.map_err(|_| ModelError::Inference {
                model: MODEL_ID.to_string(),
                reason: "the inference thread stopped".to_string(),
            })??;
            vectors.extend(batch);
        }
        Ok(in_input_order(&order, vectors.into_iter()))
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
        LocalEmbedder::load(&dir, LocalOptions::default()).unwrap()
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

    #[tokio::test]
    async fn the_workers_return_each_text_its_own_vector_in_input_order() {
        let dir = std::env::var_os("ENGRAM_MODEL_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(fetch::default_model_dir);
        fetch::ensure_model(&dir).unwrap();
        let model = LocalEmbedder::load(
            &dir,
            LocalOptions {
                workers: 2,
                max_batch: 3,
            },
        )
        .unwrap();
        let texts: Vec<String> = (0..17)
            .map(|i| format!("{} item {i}", "longer and longer ".repeat((i * 5) % 11)))
            .collect();
        let pooled = model.embed(texts.clone(), Purpose::Document).await.unwrap();
        let direct = model.embed_blocking(&texts).unwrap();
        assert_eq!(pooled.len(), texts.len());
        for (i, (a, b)) in pooled.iter().zip(&direct).enumerate() {
            assert!(cosine(a, b) > 0.9999, "text {i}");
        }
        assert!(
            model
                .embed(Vec::new(), Purpose::Query)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(model.queued.load(Ordering::Acquire), 0, "the queue drains");
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let model = model();
        model.queued.store(QUEUE_CAPACITY - 1, Ordering::Release);
        assert!(matches!(
            model.admit(2),
            Err(ModelError::Overloaded { queued, .. }) if queued == QUEUE_CAPACITY - 1
        ));
        model.admit(1).unwrap();
        model.queued.store(0, Ordering::Release);
        model.admit(QUEUE_CAPACITY * 2).unwrap();
    }

    #[test]
    fn long_texts_are_truncated_not_refused() {
        let model = model();
        let long = "word ".repeat(5000);
        let v = model.embed_blocking(&[long]).unwrap();
        assert_eq!(v[0].len(), DIMENSION);
    }
}
