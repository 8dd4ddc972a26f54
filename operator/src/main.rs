//! `distkv-operator`: run the operator, print the CRD, or render a KvCluster's objects.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
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
    }
    Ok(())
}
