//! l4lb: a layer-4 (TCP/UDP) load balancer with nginx stream semantics whose
//! established TCP sessions are spliced in the kernel by eBPF.

use l4lb::{daemon, import_nginx, logging, panic, upgrade};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// See `splice/dormant.rs`: freed pages go back to the kernel, where glibc's malloc
/// kept them pinned by the small objects that stay.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks for transparent huge pages, and khugepaged then fills the 2 MiB
/// around a few live objects: 5,000 sleeping sessions went from 2.6 to 4.8 KiB of RSS
/// each some 15 s after they fell asleep. The daemon's heap is small; its bytes live in
/// the kernel's socket buffers, which this does not touch.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only sets a flag.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "l4lb: cannot disable transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How often a worker thread that goes idle gives its freed pages back.
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// mimalloc returns a thread's freed pages only when that thread next allocates: a
/// worker whose sessions all fell asleep could keep them for hours (5,000 sleeping
/// sessions kept 6.4 KiB of RSS each with two workers, 1.3 with one). So a worker
/// collects its heap when it parks, at most once per [`COLLECT_EVERY`].
fn collect_when_idle() {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    LAST.with(|last| {
        if last
            .get()
            .is_some_and(|t| now.duration_since(t) < COLLECT_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // SAFETY: no arguments; collects the calling thread's heap.
        unsafe { libmimalloc_sys::mi_collect(false) };
    });
}

#[derive(Parser)]
#[command(name = "l4lb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer.
    Run {
        /// Configuration file: by default config/l4lb.toml when the working directory
        /// has one, else /etc/l4lb/l4lb.toml.
        #[arg(short, long, default_value_os_t = default_config())]
        config: PathBuf,
    },
    /// Check a configuration file and exit (like `nginx -t`).
    Check {
        /// Configuration file, with the same default as `run`.
        #[arg(short, long, default_value_os_t = default_config())]
        config: PathBuf,
    },
    /// Upgrade the running daemon to the binary now at its path, without dropping a
    /// session (the same as `kill -USR2 <pid>`); waits until the new process runs.
    Upgrade {
        /// Configuration file whose `[global] pid_file` names the running process.
        #[arg(short, long, default_value_os_t = default_config())]
        config: PathBuf,
        /// Seconds to wait for the new process to take over.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Convert an nginx configuration (its stream block) to an l4lb configuration.
    ImportNginx {
        /// The nginx configuration file, e.g. /etc/nginx/nginx.conf.
        file: PathBuf,
        /// Where to write the l4lb configuration (standard output when absent).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

/// The working directory's config/l4lb.toml (a checkout, `cargo xtask run`) when it
/// exists, else the installed /etc/l4lb/l4lb.toml: one rule for `run` and `check`.
fn default_config() -> PathBuf {
    let local = PathBuf::from("config/l4lb.toml");
    if local.exists() {
        local
    } else {
        PathBuf::from("/etc/l4lb/l4lb.toml")
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::ImportNginx { file, output } => match import_nginx_cmd(&file, output.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => check_cmd(&config),
        Command::Run { config } => run_cmd(&config),
        Command::Upgrade { config, timeout } => {
            match upgrade::request(&config, std::time::Duration::from_secs(timeout)) {
                Ok((old, new)) => {
                    println!("l4lb: upgraded: process {old} handed over to {new}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("l4lb: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_cmd(config: &Path) -> ExitCode {
    let errors = match daemon::load_checked(config) {
        // As `nginx -t` opens its log files: a path the daemon cannot write would
        // otherwise pass here and stop every start.
        Ok(loaded) => logging::can_open(&loaded.global.access_log)
            .err()
            .map(|e| vec![format!("{}: global.access_log: {e}", config.display())])
            .unwrap_or_default(),
        Err(errors) => errors,
    };
    if errors.is_empty() {
        println!("l4lb: configuration file {} syntax is ok", config.display());
        return ExitCode::SUCCESS;
    }
    for e in &errors {
        eprintln!("{e}");
    }
    eprintln!(
        "l4lb: configuration file {} test failed ({} error{})",
        config.display(),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    ExitCode::FAILURE
}

fn run_cmd(path: &Path) -> ExitCode {
    // Before any thread starts: it edits the environment.
    let predecessor = match upgrade::wire::inherited_fd() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("l4lb: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exe = match upgrade::Exe::current() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("l4lb: cannot read this binary's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match daemon::load_checked(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let access_log = match logging::init(&config.global) {
        Ok(sink) => sink,
        Err(e) => {
            eprintln!("l4lb: {e}");
            return ExitCode::FAILURE;
        }
    };
    panic::install_hook();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.on_thread_park(collect_when_idle);
    if let Some(n) = config.global.worker_threads {
        rt.worker_threads(n);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("l4lb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let signals = daemon::EarlySignals::catch()?;
        let daemon = daemon::Daemon::start(path, config, access_log, exe, predecessor).await?;
        // Loading the kernel path parsed the kernel's BTF (megabytes, freed at once):
        // give those pages back now, not whenever this thread next allocates (they
        // showed as 8 MiB of RSS on an idle daemon).
        // SAFETY: no arguments; collects this thread's heap.
        unsafe { libmimalloc_sys::mi_collect(false) };
        daemon.run(signals).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("l4lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Notes go to stderr; the configuration to `output` or stdout, only when there is no
/// error.
fn import_nginx_cmd(
    file: &std::path::Path,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let imported = match import_nginx::import(file) {
        Ok(i) => i,
        Err(errors) => {
            let n = errors.0.len();
            anyhow::bail!(
                "{errors}\nl4lb: {} cannot be converted ({n} error{})",
                file.display(),
                if n == 1 { "" } else { "s" }
            );
        }
    };
    for note in &imported.notes {
        eprintln!("{note}");
    }
    match output {
        Some(out) => {
            std::fs::write(out, &imported.toml)
                .with_context(|| format!("l4lb: cannot write {}", out.display()))?;
            eprintln!(
                "l4lb: converted {} ({} file{}) to {}",
                file.display(),
                imported.files.len(),
                if imported.files.len() == 1 { "" } else { "s" },
                out.display()
            );
        }
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(imported.toml.as_bytes())
                .context("l4lb: cannot write to standard output")?;
        }
    }
    Ok(())
}
