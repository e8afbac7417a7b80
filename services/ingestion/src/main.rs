//! `engram-ingestion`: engram's ingestion service, as its own process.

engram_runtime::service_binary! {
    name: "engram-ingestion",
    about: "engram's ingestion service",
    listen: engram_ingestion::Listen,
    args: engram_ingestion::IngestionArgs,
    config: engram_ingestion::Config::from_args,
    serve: engram_ingestion::serve,
}
