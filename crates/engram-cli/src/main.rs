//! `engram`: run the whole cluster locally, and remember, recall, get, list and forget against
//! a running gateway.

mod client;
mod output;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "engram",
    version,
    about = "Memory and retrieval for LLM applications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole cluster locally: gateway, retrieval, ingestion and embedding in one
    /// process, with the embedded vector store in the data directory.
    Up(Box<up::UpArgs>),
    /// Store memories for a user (one per TEXT argument).
    Remember(client::RememberArgs),
    /// Find the memories most relevant to a query.
    Recall(client::RecallArgs),
    /// Show memories by id.
    Get(client::GetArgs),
    /// Page through a scope's memories, oldest first.
    List(client::ListArgs),
    /// Remove memories by id, or every memory of a scope.
    Forget(client::ForgetArgs),
    /// Manage the local embedding model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measure recall quality against a running gateway.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Ingest LoCoMo conversations (one user each) and score evidence recall@k, all-recall@k,
    /// MRR and latency of their questions in HYBRID, SEMANTIC and KEYWORD modes.
    Locomo(client::LocomoArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download the local model (all-MiniLM-L6-v2) if it is not already there, and verify it.
    Fetch {
        /// Where to put it. Default: ~/.cache/engram/models/all-MiniLM-L6-v2.
        #[arg(long = "model-dir", env = "ENGRAM_MODEL_DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

fn fetch_model(dir: Option<std::path::PathBuf>) -> ExitCode {
    let dir = dir.unwrap_or_else(engram_models::fetch::default_model_dir);
    match engram_models::fetch::ensure_model(&dir) {
        Ok(()) => {
            println!("{}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Model(ModelCommand::Fetch { dir }) = cli.command {
        return fetch_model(dir);
    }
    engram_core::server::main_entry(|| async move {
        match cli.command {
            Command::Up(args) => up::run(*args).await,
            Command::Remember(args) => client::run(client::remember(args)).await,
            Command::Recall(args) => client::run(client::recall(args)).await,
            Command::Get(args) => client::run(client::get(args)).await,
            Command::List(args) => client::run(client::list(args)).await,
            Command::Forget(args) => client::run(client::forget(args)).await,
            Command::Model(ModelCommand::Fetch { dir }) => fetch_model(dir),
            Command::Eval(EvalCommand::Locomo(args)) => {
                client::run(client::eval_locomo(args)).await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
