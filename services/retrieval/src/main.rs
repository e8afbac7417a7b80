//! `engram-retrieval`: engram's retrieval service, as its own process.

engram_runtime::service_binary! {
    name: "engram-retrieval",
    about: "engram's retrieval service",
    listen: engram_retrieval::Listen,
    args: engram_retrieval::BinaryArgs,
    config: engram_retrieval::Config::from_args,
    serve: engram_retrieval::serve,
}
