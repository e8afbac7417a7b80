//! Token counting for prompt budgets, with the BPE tokenizer of the chat model's family
//! (`tiktoken-rs`, whose vocabularies are compiled in: nothing is fetched).
//!
//! | `ENGRAM_CHAT_TOKENIZER` | vocabulary | models |
//! | --- | --- | --- |
//! | `o200k_base` | 200k | gpt-4o, gpt-4.1, gpt-5, o1/o3/o4 |
//! | `cl100k_base` | 100k | gpt-4, gpt-3.5-turbo |
//! | `auto` (default) | from `ENGRAM_CHAT_MODEL` | the two rows above by name; any other model (Llama, Mistral, Qwen served by vLLM or Ollama) is counted with `o200k_base`, whose counts for those families are within a few per cent of their own tokenizers' for English prose — keep a margin in budgets for them |

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::ModelError;

/// Which vocabulary counts tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenizerKind {
    /// From the chat model's name.
    Auto,
    #[value(name = "o200k_base")]
    O200kBase,
    #[value(name = "cl100k_base")]
    Cl100kBase,
}

impl TokenizerKind {
    /// The vocabulary for `model` when `self` is `Auto`.
    pub fn resolve(self, model: &str) -> TokenizerKind {
        if self != TokenizerKind::Auto {
            return self;
        }
        let model = model.to_ascii_lowercase();
        let model = model.rsplit('/').next().unwrap_or(&model);
        if model.starts_with("gpt-4o")
            || model.starts_with("gpt-4.1")
            || model.starts_with("gpt-5")
            || model.starts_with("o1")
            || model.starts_with("o3")
            || model.starts_with("o4")
        {
            TokenizerKind::O200kBase
        } else if model.starts_with("gpt-4") || model.starts_with("gpt-3.5") {
            TokenizerKind::Cl100kBase
        } else {
            TokenizerKind::O200kBase
        }
    }
}

/// Counts tokens; cheap to clone (the vocabulary is loaded once per process).
#[derive(Clone, Copy)]
pub struct TokenCounter {
    name: &'static str,
    bpe: &'static CoreBPE,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TokenCounter").field(&self.name).finish()
    }
}

static O200K: OnceLock<Result<CoreBPE, String>> = OnceLock::new();
static CL100K: OnceLock<Result<CoreBPE, String>> = OnceLock::new();

impl TokenCounter {
    /// The counter for `kind` (resolved against `model`); the first call per vocabulary
    /// loads it (about 100 ms), so services build theirs at start-up.
    pub fn new(kind: TokenizerKind, model: &str) -> Result<Self, ModelError> {
        let (name, cell, load): (_, _, fn() -> anyhow_free::Loaded) = match kind.resolve(model) {
            TokenizerKind::Cl100kBase => ("cl100k_base", &CL100K, anyhow_free::cl100k),
            TokenizerKind::O200kBase | TokenizerKind::Auto => {
                ("o200k_base", &O200K, anyhow_free::o200k)
            }
        };
        match cell.get_or_init(load) {
            Ok(bpe) => Ok(Self { name, bpe }),
            Err(reason) => Err(ModelError::Config {
                setting: "ENGRAM_CHAT_TOKENIZER".into(),
                reason: format!("cannot load the {name} vocabulary: {reason}"),
            }),
        }
    }

    /// The vocabulary's name, e.g. `o200k_base`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Tokens of `text` (special tokens are counted as text).
    pub fn count(&self, text: &str) -> usize {
        self.bpe.encode_ordinary(text).len()
    }

    /// The longest prefix of `text` of at most `max_tokens` tokens that ends on a character
    /// boundary (`text` itself when it fits).
    pub fn truncate<'a>(&self, text: &'a str, max_tokens: usize) -> std::borrow::Cow<'a, str> {
        // Every token is at least one byte: a text of at most `max_tokens` bytes fits.
        if text.len() <= max_tokens {
            return text.into();
        }
        let tokens = self.bpe.encode_ordinary(text);
        if tokens.len() <= max_tokens {
            return text.into();
        }
        let Ok(bytes) = self.bpe.decode_bytes(&tokens[..max_tokens]) else {
            // Cannot happen for tokens it encoded; a byte cut is still within the limit.
            return text[..text.floor_char_boundary(max_tokens)]
                .to_string()
                .into();
        };
        // A token may end inside a character: keep the whole characters before it.
        let valid = match std::str::from_utf8(&bytes) {
            Ok(prefix) => prefix.len(),
            Err(e) => e.valid_up_to(),
        };
        let end = text.floor_char_boundary(valid.min(text.len()));
        text[..end].to_string().into()
    }
}

/// tiktoken-rs reports errors as `anyhow::Error`; keep them as strings.
mod anyhow_free {
    pub type Loaded = Result<tiktoken_rs::CoreBPE, String>;

    pub fn o200k() -> Loaded {
        tiktoken_rs::o200k_base().map_err(|e| e.to_string())
    }

    pub fn cl100k() -> Loaded {
        tiktoken_rs::cl100k_base().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_a_prefix_of_whole_characters_within_the_limit() {
        let counter = TokenCounter::new(TokenizerKind::Cl100kBase, "").expect("cl100k");
        let short = "fits easily";
        assert!(matches!(
            counter.truncate(short, 100),
            std::borrow::Cow::Borrowed(_)
        ));
        for text in [
            "word ".repeat(500),
            "日本語のテキスト、絵文字 🐈🐈‍⬛ も含む。".repeat(40),
        ] {
            let cut = counter.truncate(&text, 50);
            assert!(counter.count(&cut) <= 50, "{cut}");
            assert!(counter.count(&cut) >= 40, "kept most of the budget: {cut}");
            assert!(text.starts_with(cut.as_ref()));
        }
    }

    #[test]
    fn model_names_choose_their_vocabulary() {
        assert_eq!(
            TokenizerKind::Auto.resolve("gpt-4o-mini"),
            TokenizerKind::O200kBase
        );
        assert_eq!(
            TokenizerKind::Auto.resolve("openai/gpt-4-turbo"),
            TokenizerKind::Cl100kBase
        );
        assert_eq!(
            TokenizerKind::Auto.resolve("llama3.1:8b"),
            TokenizerKind::O200kBase
        );
        assert_eq!(
            TokenizerKind::Cl100kBase.resolve("gpt-4o"),
            TokenizerKind::Cl100kBase
        );
    }

    #[test]
    fn counts_are_the_real_tokenizers() -> Result<(), ModelError> {
        // Reference counts from OpenAI's tiktoken.
        let o200k = TokenCounter::new(TokenizerKind::O200kBase, "")?;
        assert_eq!(o200k.count("hello world"), 2);
        assert_eq!(o200k.count(""), 0);
        let cl100k = TokenCounter::new(TokenizerKind::Cl100kBase, "")?;
        assert_eq!(cl100k.count("tiktoken is great!"), 6);
        Ok(())
    }
}
