//! `engram-embedding`: engram's embedding service, as its own process.

engram_runtime::service_binary! {
    name: "engram-embedding",
    about: "engram's embedding service",
    listen: engram_embedding::Listen,
    args: engram_embedding::EmbeddingArgs,
    config: engram_embedding::Config::from_args,
    serve: engram_embedding::serve,
}
