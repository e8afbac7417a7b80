//! `engram-gateway`: engram's gateway: the public MemoryService API, as its own process.

engram_runtime::service_binary! {
    name: "engram-gateway",
    about: "engram's gateway: the public MemoryService API",
    listen: engram_gateway::Listen,
    args: engram_gateway::GatewayArgs,
    config: engram_gateway::Config::from_args,
    serve: engram_gateway::serve,
}
