//! `engram`: run the whole cluster locally, and remember, recall, get, list and forget against
//! a running gateway.

mod client;
mod mcp;
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

/// Every command: those that run on the async runtime (the cluster, its clients) and those
/// that do not (local files only).
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Online(Box<Online>),
    #[command(flatten)]
    Offline(Offline),
}

#[derive(Subcommand)]
enum Online {
    /// Run the whole cluster locally: gateway, retrieval, ingestion and embedding in one
    /// process, with the embedded vector store in the data directory.
    Up(Box<up::UpArgs>),
    /// Store memories for a user (one per TEXT argument).
    Remember(client::RememberArgs),
    /// Find the memories most relevant to a query.
    Recall(client::RecallArgs),
    /// The context for a prompt: relevant memories and the session's recent turns, packed
    /// into a token budget (BuildContext).
    Context(client::ContextArgs),
    /// Ask the configured chat model with the user's memories and the session's history; the
    /// answer streams to stdout and the turn is remembered (Converse).
    Chat(client::ChatArgs),
    /// Show memories by id.
    Get(client::GetArgs),
    /// Page through a scope's memories, oldest first.
    List(client::ListArgs),
    /// Remove memories by id, or every memory of a scope.
    Forget(client::ForgetArgs),
    /// Load-test a gateway with a ghz configuration file (the keys ghz reads) and write ghz's
    /// JSON report.
    Bench(engram_cli::loadtest::BenchArgs),
    /// Measure recall quality against a running gateway.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// How the cluster is doing now: per public RPC the rate, errors and p50/p95/p99 over an
    /// interval, cache hit rates, the write log's backlog, circuit breakers and each service's
    /// memory, read from the four admin ports (no Prometheus needed).
    Stats(engram_cli::stats::StatsArgs),
    /// Serve engram's memory to agents as Model Context Protocol tools (remember, recall,
    /// build_context, list, forget) over stdio, or streamable HTTP with --listen.
    Mcp(mcp::McpArgs),
}

#[derive(Subcommand)]
enum Offline {
    /// Manage the local embedding model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Turn ghz JSON reports into a Markdown table (stdout) and an SVG latency chart.
    BenchReport(engram_cli::loadtest::ReportArgs),
    /// Manage the gateway's API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Ingest LoCoMo conversations (one user each) and score evidence recall@k, all-recall@k,
    /// MRR and latency of their questions in HYBRID, SEMANTIC and KEYWORD modes.
    Locomo(client::LocomoArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new random API key: prints the key once (give it to the caller) and, on stderr,
    /// the entry to append to the key file, which holds only its SHA-256.
    New {
        /// Tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// What the key may do.
        #[arg(long, value_enum, default_value_t = RoleArg::Write)]
        role: RoleArg,
        /// Name of the key in logs and errors (default: `<tenant>-<role>`).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Read,
    Write,
    Admin,
}

fn new_key(tenant: &str, role: RoleArg, name: Option<String>) -> ExitCode {
    use engram_gateway::Role;
    let tenant = match engram_domain::model::TenantId::parse(tenant) {
        Ok(tenant) => tenant,
        Err(e) => {
            eprintln!("error: --tenant: {e}");
            return ExitCode::from(2);
        }
    };
    let role = match role {
        RoleArg::Read => Role::Read,
        RoleArg::Write => Role::Write,
        RoleArg::Admin => Role::Admin,
    };
    let name = name.unwrap_or_else(|| format!("{}-{}", tenant.as_str(), role.as_str()));
    let (key, entry) = engram_gateway::new_key(&name, &tenant, role);
    eprintln!("# append to the API key file (ENGRAM_API_KEYS_FILE); the gateway reloads it:");
    eprintln!("{entry}");
    println!("{key}");
    ExitCode::SUCCESS
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download the local model (all-MiniLM-L6-v2) if it is not already there, and verify it.
    Fetch {
        /// Where to put it. Default: ~/.cache/engram/models/all-MiniLM-L6-v2.
        #[arg(long = "model-dir", env = engram_domain::settings::env::MODEL_DIR)]
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
    match Cli::parse().command {
        Command::Offline(command) => offline(command),
        Command::Online(command) => {
            engram_runtime::server::main_entry(|| async move { online(*command).await })
        }
    }
}

fn offline(command: Offline) -> ExitCode {
    match command {
        Offline::Model(ModelCommand::Fetch { dir }) => fetch_model(dir),
        Offline::Keys(KeysCommand::New { tenant, role, name }) => new_key(&tenant, role, name),
        Offline::BenchReport(args) => match engram_cli::loadtest::report_command(args) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn online(command: Online) -> ExitCode {
    match command {
        Online::Up(args) => up::run(*args).await,
        Online::Remember(args) => client::run(client::remember(args)).await,
        Online::Recall(args) => client::run(client::recall(args)).await,
        Online::Get(args) => client::run(client::get(args)).await,
        Online::Context(args) => client::run(client::context(args)).await,
        Online::Chat(args) => client::run(client::chat(args)).await,
        Online::List(args) => client::run(client::list(args)).await,
        Online::Forget(args) => client::run(client::forget(args)).await,
        Online::Bench(args) => match engram_cli::loadtest::command(args).await {
            Ok(report) => {
                print!("{}", report.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Online::Eval(EvalCommand::Locomo(args)) => client::run(client::eval_locomo(args)).await,
        Online::Stats(args) => engram_cli::stats::run(args).await,
        Online::Mcp(args) => mcp::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
