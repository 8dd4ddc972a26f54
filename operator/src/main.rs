//! `distkv-operator`: run the operator, print the CRD, or render a KvCluster's objects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::runtime::events::Reporter;
use tracing::{error, info};

use operator::leader::{self, ElectionConfig};
use operator::metrics::{self, Metrics};
use operator::reconcile::{self, Context};

/// The distkv Kubernetes operator.
#[derive(Parser)]
#[command(name = "distkv-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the KvCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print every object the operator would create for the KvCluster(s) in a file.
    Render {
        /// YAML file with one or more KvCluster documents (`-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Namespace for clusters whose manifest names none.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Run the operator against the cluster in the kubeconfig or the in-cluster config.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Watch only this namespace (all namespaces when empty).
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    watch_namespace: String,
    /// Elect one active replica through a Lease (needed when running more than one).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "distkv-operator")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Timeout of each call to a node or router.
    #[arg(long, default_value = "1000")]
    node_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", operator::crd::crd_yaml()),
        Command::Render { file, namespace } => {
            let input = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            print!("{}", operator::render::render(&input, &namespace)?);
        }
        Command::Run(args) => run(args).await?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colour only at a terminal: in a cluster, logs go to files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let metrics = Metrics::new();
    let server = tokio::spawn(metrics::serve(args.metrics_listen, metrics.clone()));
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (kubeconfig or in-cluster)")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("distkv-operator-{}", std::process::id()));

    let mut lost = None;
    if args.leader_election {
        info!(%identity, lease = %args.lease_name, "waiting for leadership");
        let api = kube::Api::namespaced(client.clone(), &args.lease_namespace);
        lost = Some(
            leader::acquire(
                api,
                ElectionConfig {
                    name: args.lease_name.clone(),
                    namespace: args.lease_namespace.clone(),
                    identity: identity.clone(),
                    lease_duration: Duration::from_secs(15),
                    retry_period: Duration::from_secs(3),
                },
            )
            .await,
        );
    }
    metrics.leader.set(1);

    let nodes = Arc::new(dataplane::client::AdminClient::new(Duration::from_millis(
        args.node_timeout_ms,
    )));
    let ctx = Context::new(
        client,
        nodes.clone(),
        nodes,
        Reporter {
            controller: "distkv-operator".into(),
            instance: Some(identity),
        },
        metrics.clone(),
    );
    let namespace = (!args.watch_namespace.is_empty()).then_some(args.watch_namespace);
    info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        "reconciling KvClusters"
    );
    let controller = reconcile::run(ctx, namespace);
    tokio::select! {
        () = controller => info!("controller stopped"),
        () = wait_lost(lost) => {
            metrics.leader.set(0);
            error!("lost leadership; exiting so another replica takes over");
            std::process::exit(1);
        }
        result = server => {
            result.context("metrics server task")?.context("metrics server")?;
        }
    }
    Ok(())
}

/// Resolves when leadership is lost; never when election is off.
async fn wait_lost(lost: Option<tokio::sync::watch::Receiver<bool>>) {
    let Some(mut rx) = lost else {
        return std::future::pending().await;
    };
    while *rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
