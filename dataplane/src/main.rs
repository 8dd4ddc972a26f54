//! `distkv`: run a replica node, a router, or a whole local cluster (playground).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use dataplane::api::Limits;
use dataplane::idle::{self, IdleClosing};
use dataplane::node::{Node, NodeConfig};
use dataplane::playground::{self, PlaygroundConfig};
use dataplane::router::{Router, RouterConfig};
use dataplane::wire::AckMode;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "distkv",
    version,
    about = "Sharded, replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one replica: storage, replication and the API for its shard's slots.
    Node(NodeArgs),
    /// Run a router: hashes keys to shards and forwards to their leaders.
    Router(RouterArgs),
    /// Run a whole cluster on this machine: router, nodes and failover supervisor.
    Playground(PlaygroundArgs),
    /// Print where a stopped replica's disk space goes (tables, log, write-ahead log).
    Inspect {
        /// The replica's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Args, Clone)]
struct IdleArgs {
    /// Closes an HTTP connection once this long passes without a byte moving while the
    /// server waits on it (a half-sent request, a silent client).
    #[arg(long, default_value_t = dataplane::idle::DEFAULT_IDLE.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_ms: u64,
}

impl IdleArgs {
    /// The idle limit, which must exceed the longest a request may wait for its answer:
    /// a connection waiting on the server moves no bytes either.
    fn limit(&self, longest_wait_ms: u64, flag: &str) -> Result<Duration> {
        if self.idle_timeout_ms <= longest_wait_ms {
            bail!(
                "--idle-timeout-ms ({}) must be above {flag} ({longest_wait_ms}): a connection \
                 waiting that long for its answer would be closed first",
                self.idle_timeout_ms
            );
        }
        Ok(Duration::from_millis(self.idle_timeout_ms))
    }
}

#[derive(Args, Clone)]
struct LimitArgs {
    /// Longest key accepted, in bytes (1 to 32768: a key travels in the URL).
    #[arg(long, default_value_t = 1024, value_parser = |s: &str| byte_limit(s, dataplane::api::MAX_KEY_LIMIT))]
    max_key_bytes: usize,
    /// Largest value accepted, in bytes (1 to 67108864).
    #[arg(long, default_value_t = 1 << 20, value_parser = |s: &str| byte_limit(s, dataplane::api::MAX_VALUE_LIMIT))]
    max_value_bytes: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_key_bytes: self.max_key_bytes,
            max_value_bytes: self.max_value_bytes,
        }
    }
}

#[derive(Args)]
struct NodeArgs {
    /// Replica id, e.g. s0-r1. Without it, `s{--shard}-r{ordinal}` from the trailing
    /// number of $POD_NAME or the hostname (StatefulSet pods).
    #[arg(long)]
    id: Option<String>,
    /// Shard number, used to derive the id when --id is absent.
    #[arg(long)]
    shard: Option<u32>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// Data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Log entries kept for followers that come back; further behind means a snapshot.
    #[arg(long, default_value_t = dataplane::node::DEFAULT_LOG_RETAIN)]
    log_retain: u64,
    /// How long a sync write waits for the in-sync replicas before answering 503.
    #[arg(long, default_value_t = 5000)]
    replication_timeout_ms: u64,
    #[command(flatten)]
    idle: IdleArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct RouterArgs {
    /// Address of the public API (never serves /internal).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Address for topology pushes from the control plane.
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin_listen: String,
    /// Topology file to load at start and reload when a leader moves.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// How long a replica may take to answer a forwarded request before the client gets
    /// 504 (a write's outcome is then unknown).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_ms: u64,
    #[command(flatten)]
    idle: IdleArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct PlaygroundArgs {
    /// Number of shards.
    #[arg(long, default_value_t = 3)]
    shards: u32,
    /// Replicas per shard (one leader, the rest followers).
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Router port on 127.0.0.1 (0 picks a free port).
    #[arg(long, default_value_t = 5000)]
    port: u16,
    /// Where every replica keeps its data; starting again on it keeps all data.
    #[arg(long, default_value = "./distkv-data")]
    data_dir: PathBuf,
    /// Ack mode: sync (every in-sync replica has the write) or async (leader only).
    #[arg(long, default_value = "sync", value_parser = parse_mode)]
    mode: AckMode,
    /// Fewest in-sync replicas (leader included) with which a shard still takes writes.
    #[arg(long, default_value_t = 1)]
    min_in_sync: u32,
    /// Leader lease; a leader not renewed for this long stops serving.
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// Extra wait after a lease runs out before promoting another replica.
    #[arg(long, default_value_t = 300)]
    failover_grace_ms: u64,
    /// How often the supervisor polls every replica.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// A follower silent for this long leaves the in-sync set.
    #[arg(long, default_value_t = 1000)]
    in_sync_timeout_ms: u64,
    /// Extra flags passed to every node (e.g. --node-arg=--log-retain=1000). Set key and
    /// value limits with --max-key-bytes and --max-value-bytes, which reach the router too.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// Limits of the router and every node.
    #[command(flatten)]
    limits: LimitArgs,
}

fn parse_mode(s: &str) -> Result<AckMode, String> {
    match s {
        "sync" => Ok(AckMode::Sync),
        "async" => Ok(AckMode::Async),
        _ => Err(format!("mode must be sync or async, not {s}")),
    }
}

/// A size limit from 1 to `max` bytes.
fn byte_limit(s: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s} is not a number of bytes from 1 to {max}")),
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // For the person who ran it: one line with every cause, and no backtrace
            // whatever RUST_BACKTRACE says.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a playground's logs are files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // A playground packs many processes onto few cores; it asks its children for fewer
    // threads so they do not spend the cores waking each other. One thread means a
    // current-thread runtime: with no other worker to steal from, it spent 5-10% less CPU
    // per request than a one-worker multi-thread runtime (alternating runs at 64
    // connections).
    let threads = std::env::var("DISTKV_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut runtime = match threads {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Node(a) => run_node(a).await,
            Command::Router(a) => run_router(a).await,
            Command::Playground(a) => run_playground(a).await,
            Command::Inspect { data_dir } => {
                let report = dataplane::storage::inspect(&data_dir)
                    .with_context(|| format!("cannot read {}", data_dir.display()))?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            }
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn replica_id(args: &NodeArgs) -> Result<String> {
    if let Some(id) = &args.id {
        return Ok(id.clone());
    }
    let Some(shard) = args.shard else {
        bail!("give --id, or --shard to derive the id from the pod's ordinal");
    };
    let name = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name = name.trim();
    let digits: String = name
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let ordinal: u32 = digits
        .parse()
        .with_context(|| format!("cannot read a pod ordinal from name {name:?}"))?;
    Ok(format!("s{shard}-r{ordinal}"))
}

/// Binds, then announces the bound address on stdout (the playground reads it).
/// Listens on `addr`, `host:port` with a name (`localhost:0`) or an address.
async fn bind(addr: &str, label: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!("{label} {}", listener.local_addr()?);
    Ok(listener)
}

async fn run_node(args: NodeArgs) -> Result<()> {
    let id = replica_id(&args)?;
    let mut cfg = NodeConfig::new(id, &args.data_dir);
    cfg.limits = args.limits.limits();
    cfg.log_retain = args.log_retain;
    cfg.replication_timeout = Duration::from_millis(args.replication_timeout_ms);
    cfg.idle_timeout = args
        .idle
        .limit(args.replication_timeout_ms, "--replication-timeout-ms")?;
    let node = Node::open(cfg)
        .with_context(|| format!("cannot open data directory {}", args.data_dir.display()))?;
    let listener = bind(&args.listen, "listening").await?;
    dataplane::node::serve(node.clone(), listener, shutdown_signal()).await?;
    // A clean stop leaves nothing in the write-ahead log to replay. redb closes cleanly
    // when main drops the runtime, and with it every task's handle on the store.
    node.store().close().await?;
    tracing::info!("node stopped");
    Ok(())
}

async fn run_router(args: RouterArgs) -> Result<()> {
    let idle_limit = args
        .idle
        .limit(args.request_timeout_ms, "--request-timeout-ms")?;
    let router = Router::new(RouterConfig {
        limits: args.limits.limits(),
        topology_file: args.topology,
        timeout: Duration::from_millis(args.request_timeout_ms),
    });
    let public = bind(&args.listen, "listening").await?;
    let admin = bind(&args.admin_listen, "admin").await?;
    let admin_app = router.admin_app();
    tokio::spawn(async move {
        let forever = std::future::pending();
        if let Err(e) = idle::serve(IdleClosing::new(admin, idle_limit), admin_app, forever).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    idle::serve(
        IdleClosing::new(public, idle_limit),
        router.app(),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

async fn run_playground(args: PlaygroundArgs) -> Result<()> {
    if args.shards == 0 || args.replicas == 0 {
        bail!("--shards and --replicas must be at least 1");
    }
    let cfg = PlaygroundConfig {
        shards: args.shards,
        replicas: args.replicas,
        port: args.port,
        data_dir: args.data_dir,
        mode: args.mode,
        min_in_sync: args.min_in_sync,
        lease_ms: args.lease_ms,
        failover_grace_ms: args.failover_grace_ms,
        poll_ms: args.poll_ms,
        in_sync_timeout_ms: args.in_sync_timeout_ms,
        limits: args.limits.limits(),
        node_args: args.node_args,
        exe: std::env::current_exe()?,
    };
    playground::run(Arc::new(cfg), shutdown_signal()).await?;
    Ok(())
}
