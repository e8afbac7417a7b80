//! `engram-gateway`: the gateway as its own process.

use clap::Parser;
use engram_core::config::{CommonArgs, shutdown_signal};
use engram_gateway::{Config, GatewayPeers, Listen, serve};
use engram_telemetry::LogConfig;

#[derive(Parser)]
#[command(name = "engram-gateway", version, about = "engram's gateway")]
struct Cli {
    #[command(flatten)]
    listen: Listen,
    #[command(flatten)]
    peers: GatewayPeers,
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    log: LogConfig,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    engram_core::server::run_main(&cli.log, cli.common, |common| async move {
        let listeners = cli.listen.bind().await?;
        let config = Config::from_args(&cli.peers, common);
        serve(config, listeners, shutdown_signal()).await
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
