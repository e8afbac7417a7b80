//! BM25 term weights for keyword search, with qdrant-edge's BM25 embedder.
//!
//! The store computes a memory's document weights from its text as it writes the point, and
//! keeps them as the sparse vector [`crate::KEYWORDS`]; retrieval computes a query's terms the
//! same way. The sparse vector is indexed with the IDF modifier, so the
//! engine weighs rare terms up at query time from the shard's own statistics.
//!
//! Tuned for memories, which are short (a chat turn or a fact, typically 10–30 words): the
//! average document length is [`AVERAGE_LENGTH`] tokens rather than the engine's 256, so length
//! normalisation treats a 12-token memory as typical. English tokenisation: words, lower-cased,
//! English stop words removed, Snowball-stemmed ("painted" and "painting" meet at "paint").

use qdrant_edge::bm25_embed::{EdgeBm25, EdgeBm25Config};
use qdrant_edge::external::ordered_float::NotNan;

/// Average memory length, in tokens after stop words are removed.
pub const AVERAGE_LENGTH: f64 = 12.0;
/// Term-frequency saturation (the usual BM25 k1).
const K1: f64 = 1.2;
/// Length normalisation (the usual BM25 b).
const B: f64 = 0.75;
/// Tokens longer than this (hashes, base64) are not words.
const MAX_TOKEN_LEN: usize = 40;

/// A sparse vector: token ids (ascending, unique) and their weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseVector {
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

/// The BM25 encoder of documents (the stores, as they write points) and queries (retrieval).
#[derive(Debug)]
pub struct Keywords {
    bm25: EdgeBm25,
}

impl Default for Keywords {
    fn default() -> Self {
        Self::new()
    }
}

impl Keywords {
    pub fn new() -> Self {
        let config = EdgeBm25Config {
            k: not_nan(K1),
            b: not_nan(B),
            avg_len: not_nan(AVERAGE_LENGTH),
            max_token_len: Some(MAX_TOKEN_LEN),
            ..EdgeBm25Config::default()
        };
        let bm25 = EdgeBm25::new(config).unwrap_or_else(|e| {
            unreachable!("the BM25 settings are constants the engine accepts: {e}")
        });
        Self { bm25 }
    }

    /// Term weights of a memory's text.
    pub fn document(&self, text: &str) -> SparseVector {
        let v = self.bm25.embed_document(text);
        SparseVector {
            indices: v.indices,
            values: v.values,
        }
    }

    /// The terms of a query (each weighted 1; IDF comes from the index).
    pub fn query(&self, text: &str) -> SparseVector {
        let v = self.bm25.embed_query(text);
        SparseVector {
            indices: v.indices,
            values: v.values,
        }
    }
}

fn not_nan(value: f64) -> NotNan<f64> {
    NotNan::new(value).unwrap_or_else(|_| unreachable!("{value} is a constant, not NaN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_and_drops_stop_words() {
        let k = Keywords::new();
        let doc = k.document("Melanie painted a sunrise over the lake");
        let query = k.query("painting sunrise");
        assert_eq!(doc.indices.len(), doc.values.len());
        assert!(doc.indices.windows(2).all(|w| w[0] < w[1]), "{doc:?}");
        assert!(query.indices.iter().all(|i| doc.indices.contains(i)));
        assert!(k.query("the a of").indices.is_empty());
    }
}
