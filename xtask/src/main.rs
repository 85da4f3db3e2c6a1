//! Project tasks: `cargo xtask run`, `cargo xtask test`, `cargo xtask setup`,
//! `cargo xtask bench`, `cargo xtask fuzz`.
//! Every task first installs what a fresh machine lacks, idempotently.

mod bench;
mod fuzz;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and system packages the project needs.
    Setup,
    /// Build in release mode and run the daemon on config/l4lb.toml (or --config).
    Run {
        #[arg(short, long, default_value = "config/l4lb.toml")]
        config: PathBuf,
    },
    /// Formatting, lints, every test (unit and end-to-end, kernel path included) and a
    /// short run of every fuzz target.
    Test,
    /// Benchmark l4lb against nginx stream, haproxy and a direct connection.
    Bench(bench::BenchArgs),
    /// Fuzz every parser (or one) with cargo fuzz; fails naming the input of any crash.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> Result<()> {
    let root = project_root()?;
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Setup => setup::all(setup::Purpose::Test),
        Task::Run { config } => {
            let bin = build_daemon(&root)?;
            let status = Command::new(&bin)
                .arg("run")
                .arg("-c")
                .arg(&config)
                .status()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            if !status.success() {
                bail!("l4lb exited with {status}");
            }
            Ok(())
        }
        Task::Bench(args) => bench::run(args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Test => {
            setup::all(setup::Purpose::Test)?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo(&["test", "--workspace", "--no-fail-fast"])?;
            fuzz::smoke()
        }
    }
}

/// Installs the build prerequisites and builds the release daemon; returns its path.
/// `run` and `bench` share it so both get the same binary (kernel path included).
pub fn build_daemon(root: &Path) -> Result<PathBuf> {
    setup::all(setup::Purpose::Run)?;
    cargo(&["build", "--release", "-p", "l4lb"])?;
    Ok(root.join("target/release/l4lb"))
}

fn project_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Runs cargo with the stable toolchain the project builds with.
pub fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
