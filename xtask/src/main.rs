//! Project tasks: `cargo xtask run`, `cargo xtask test`, `cargo xtask setup`,
//! `cargo xtask install`, `cargo xtask bench`, `cargo xtask soak`, `cargo xtask fuzz`.
//! Every task first installs what a fresh machine lacks, idempotently.

mod bench;
mod demo;
mod fuzz;
mod install;
mod setup;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and system packages the project needs.
    Setup {
        /// Only what building the daemon needs (no test servers): the container build.
        #[arg(long)]
        build_only: bool,
    },
    /// Build in release mode and run the daemon on config/l4lb.toml (or --config);
    /// with the default configuration, demo backends answer on its upstream's ports.
    Run {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Build in release mode and install the daemon, its configuration (if absent), the
    /// systemd unit and the state directory.
    Install(install::InstallArgs),
    /// Formatting, lints, every test (unit and end-to-end, kernel path included) and a
    /// short run of every fuzz target.
    Test,
    /// Benchmark l4lb against nginx stream, haproxy and a direct connection.
    Bench(bench::BenchArgs),
    /// Sessions streaming through churn and faults for a while; figures and bounds
    /// (tests/soak.rs). `cargo xtask test` runs its quick form.
    Soak {
        /// How long (10 minutes unless --quick).
        #[arg(long)]
        minutes: Option<u64>,
        /// About a minute, as CI runs it.
        #[arg(long)]
        quick: bool,
        /// Client sessions streaming at once (500; 100 with --quick).
        #[arg(long)]
        sessions: Option<u64>,
    },
    /// Fuzz every parser (or one) with cargo fuzz; fails naming the input of any crash.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> Result<()> {
    let root = project_root()?;
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Setup { build_only } => setup::all(if build_only {
            setup::Purpose::Run
        } else {
            setup::Purpose::Test
        }),
        Task::Run { config } => run_daemon(&root, &config),
        Task::Install(args) => install::install(&root, &args),
        Task::Bench(args) => bench::run(args),
        Task::Soak {
            minutes,
            quick,
            sessions,
        } => {
            setup::all(setup::Purpose::Test)?;
            let seconds = match (minutes, quick) {
                (Some(m), _) => m * 60,
                (None, true) => 45,
                (None, false) => 600,
            };
            let sessions = sessions.unwrap_or(if quick { 100 } else { 500 });
            run(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args(["test", "-p", "l4lb", "--test", "soak", "--", "--nocapture"])
                    .env("L4LB_SOAK_SECONDS", seconds.to_string())
                    .env("L4LB_SOAK_SESSIONS", sessions.to_string()),
            )
        }
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

const DEFAULT_CONFIG: &str = "config/l4lb.toml";

/// Runs the daemon in the foreground until it exits. SIGINT, SIGTERM and SIGHUP are
/// passed on to it, so stopping xtask drains the daemon first and the demo backends
/// (threads of this process) outlive its sessions.
fn run_daemon(root: &Path, config: &Path) -> Result<()> {
    let bin = build_daemon(root)?;
    if config == Path::new(DEFAULT_CONFIG) {
        demo::start_where_free()?;
    }
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("-c").arg(config);
    // SAFETY: prctl(2) is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            // Should xtask be killed outright, the daemon must not linger without it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            // SAFETY: kill(2) on our own child has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
    });
    let status = child.wait();
    handle.close();
    // The forwarder ends once its handle is closed; a panic in it changes nothing here.
    let _ = forwarder.join();
    let status = status.context("waiting for l4lb")?;
    if !status.success() {
        bail!("l4lb exited with {status}");
    }
    Ok(())
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
