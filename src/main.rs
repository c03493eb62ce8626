//! The `cubicle` command: the operator, and tools around it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cubicle::devenv::{DevCluster, DevOptions};
use tokio::io::AsyncReadExt;

#[derive(Parser)]
#[command(
    name = "cubicle",
    version,
    about = "Kasm-style workspaces on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A local development environment (no cluster needed).
    #[command(subcommand)]
    Dev(DevCommand),
    /// Print the CustomResourceDefinitions of the Cubicle API as one multi-document YAML stream,
    /// or write one file per CRD (`<plural>.cubicle.dev.yaml`) into a directory.
    Crds {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start the project's own local Kubernetes control plane with fake nodes and storage, and
    /// keep it running until interrupted (Ctrl-C). Prints the KUBECONFIG to use.
    Up {
        /// Working directory: PKI, kubeconfig, component logs.
        #[arg(long, default_value = ".cubicle/dev")]
        dir: PathBuf,
        /// Number of fake nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Number of zones (`zone-a`, `zone-b`, ...) the nodes are spread over.
        #[arg(long, default_value_t = 3)]
        zones: usize,
        /// Seconds to wait for the control plane to become ready.
        #[arg(long, default_value_t = 240)]
        timeout: u64,
        /// Also stop when standard input closes (used by the test harness).
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,cubicle=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(DevCommand::Up {
            dir,
            nodes,
            zones,
            timeout,
            exit_on_stdin_eof,
        }) => dev_up(dir, nodes, zones, timeout, exit_on_stdin_eof).await,
        Command::Crds { dir } => crds(dir),
    }
}

async fn dev_up(
    dir: PathBuf,
    nodes: usize,
    zones: usize,
    timeout: u64,
    exit_on_stdin_eof: bool,
) -> ExitCode {
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let opts = DevOptions {
        dir: dir.clone(),
        nodes,
        zones,
        timeout: Duration::from_secs(timeout),
    };
    let cluster = match DevCluster::start(&opts).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle dev up: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let ready_path = dir.join("dev-ready");
    let tmp = dir.join("dev-ready.tmp");
    let body = serde_json::to_string_pretty(&cluster.ready).expect("serializable");
    if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, &ready_path)) {
        eprintln!(
            "cubicle dev up: failed to write {}: {e}",
            ready_path.display()
        );
        cluster.stop().await;
        return ExitCode::FAILURE;
    }
    println!(
        "local control plane ready in {:.1}s ({} nodes in {}): {}\n  export KUBECONFIG={}\n  component logs: {}",
        cluster.ready.startup_ms as f64 / 1000.0,
        cluster.ready.nodes.len(),
        cluster.ready.zones.join(", "),
        cluster.ready.server,
        cluster.ready.kubeconfig.display(),
        cluster.ready.log_dir.display(),
    );
    let stdin_closed = async {
        if exit_on_stdin_eof {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
        _ = stdin_closed => {},
    }
    eprintln!("stopping the local control plane");
    let _ = std::fs::remove_file(&ready_path);
    cluster.stop().await;
    ExitCode::SUCCESS
}

fn crds(dir: Option<PathBuf>) -> ExitCode {
    match dir {
        None => {
            print!("{}", cubicle::crd::render_all_yaml());
            ExitCode::SUCCESS
        }
        Some(dir) => match cubicle::crd::write_dir(&dir) {
            Ok(paths) => {
                for p in paths {
                    eprintln!("wrote {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cubicle crds: writing {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
