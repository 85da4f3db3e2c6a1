//! `cargo xtask fuzz`: runs every `cargo fuzz` target of `fuzz/` (one per parser) for a
//! bounded time and reports runs, coverage and crashes; `cargo xtask test` runs each one
//! briefly as a smoke test.
//!
//! libFuzzer starts from the seed corpus in `fuzz/corpus/<target>/` (kept in the
//! repository, read only) and writes what it learns to `fuzz/target/corpus/<target>/`
//! (kept between local runs, not committed). A crash leaves its input in
//! `fuzz/artifacts/<target>/`, named in the report.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup;

/// At most this many seconds per target in the smoke test of `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 30;
/// The smoke's inputs per target, from a fixed seed and only the committed corpus, so
/// it tries the same inputs on every machine: a CI run fails on a regression, not on a
/// crash that exploring happened to find first there (`cargo xtask fuzz` explores).
const SMOKE_RUNS: u64 = 30_000;
/// An input taking longer than this counts as a hang (libFuzzer's default is 20 minutes).
const INPUT_TIMEOUT_SECONDS: u64 = 5;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (default: every file in fuzz/fuzz_targets/).
    #[arg(long)]
    target: Option<String>,
    /// The smoke `cargo xtask test` runs: fixed seed and inputs, nothing learned before.
    #[arg(long)]
    smoke: bool,
}

/// What one target's run gave.
struct Outcome {
    target: String,
    seconds: u64,
    runs: Option<u64>,
    coverage: Option<u64>,
    corpus: Option<u64>,
    /// Inputs libFuzzer wrote because they crashed, hung or ran out of memory.
    reproducers: Vec<String>,
    failed: bool,
    log: PathBuf,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let all = targets()?;
    let chosen = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?}; the targets are {}", all.join(", ")),
        None => all,
    };
    if args.smoke {
        return fuzz(&chosen, SMOKE_SECONDS, true);
    }
    fuzz(&chosen, args.seconds, false)
}

/// Every target: the seed corpus, then [`SMOKE_RUNS`] inputs from a fixed seed.
pub fn smoke() -> Result<()> {
    run(&FuzzArgs {
        seconds: SMOKE_SECONDS,
        target: None,
        smoke: true,
    })
}

fn fuzz(targets: &[String], seconds: u64, smoke: bool) -> Result<()> {
    setup::cargo_fuzz()?;
    // One build of every target first, so the per-target runs only fuzz.
    crate::run(fuzz_command("build").args(flags(smoke)))?;
    let mut outcomes = Vec::new();
    for t in targets {
        outcomes.push(run_target(t, seconds, smoke)?);
    }
    eprintln!("\nxtask: fuzzing, {seconds} s per target");
    eprintln!(
        "{:<14} {:>7} {:>12} {:>9} {:>7}  result",
        "target", "seconds", "runs", "coverage", "corpus"
    );
    let shown = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    for o in &outcomes {
        let result = match (o.failed, o.reproducers.as_slice()) {
            (false, _) => "ok".to_string(),
            (true, []) => format!("FAILED, see {}", o.log.display()),
            (true, files) => format!("CRASH: {}", files.join(" ")),
        };
        eprintln!(
            "{:<14} {:>7} {:>12} {:>9} {:>7}  {result}",
            o.target,
            o.seconds,
            shown(o.runs),
            shown(o.coverage),
            shown(o.corpus)
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed).collect();
    if !failed.is_empty() {
        for o in &failed {
            for r in &o.reproducers {
                eprintln!(
                    "xtask: reproduce with `AYA_BUILD_SKIP=1 cargo +nightly fuzz run {} {} {r}`",
                    flags(smoke).join(" "),
                    o.target
                );
            }
        }
        bail!(
            "fuzzing failed: {}",
            failed
                .iter()
                .map(|o| o.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Build flags, the same for `build` and `run` so that `run` does not rebuild: optimised
/// with debug assertions and overflow checks (cargo-fuzz's default), and without a
/// sanitizer, since the parsers are safe Rust and uninstrumented code runs more inputs
/// per second. `fuzz/target` whatever CARGO_TARGET_DIR says: libFuzzer's flags would
/// churn the main target directory.
const RELEASE: &[&str] = &["--sanitizer", "none", "--target-dir", "fuzz/target"];
/// The same, unoptimised, for the smoke: the build is most of a smoke's time, and an
/// unoptimised build is much quicker than the runs it saves.
const DEV: &[&str] = &[
    "--dev",
    "--sanitizer",
    "none",
    "--target-dir",
    "fuzz/target",
];

fn flags(smoke: bool) -> &'static [&'static str] {
    if smoke {
        DEV
    } else {
        RELEASE
    }
}

/// `cargo +nightly fuzz <sub>` in the repository root, without the eBPF object, which
/// no parser needs.
fn fuzz_command(sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", sub])
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// The targets: the files of `fuzz/fuzz_targets/`, sorted.
fn targets() -> Result<Vec<String>> {
    let dir = Path::new("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    if names.is_empty() {
        bail!("no fuzz target in {}", dir.display());
    }
    Ok(names)
}

fn run_target(target: &str, seconds: u64, smoke: bool) -> Result<Outcome> {
    let learned = if smoke {
        // Nothing learned on this machine before: the same start everywhere.
        let fresh = PathBuf::from(format!("fuzz/target/smoke-corpus/{target}"));
        let _ = std::fs::remove_dir_all(&fresh);
        fresh
    } else {
        PathBuf::from(format!("fuzz/target/corpus/{target}"))
    };
    let seeds = PathBuf::from(format!("fuzz/corpus/{target}"));
    std::fs::create_dir_all(&learned)
        .with_context(|| format!("cannot create {}", learned.display()))?;
    std::fs::create_dir_all("fuzz/target/logs")?;
    let log = PathBuf::from(format!("fuzz/target/logs/{target}.log"));
    let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    eprintln!(
        "xtask: fuzzing {target} for {seconds} s (log: {})",
        log.display()
    );
    let mut cmd = fuzz_command("run");
    cmd.args(flags(smoke))
        .arg(target)
        // libFuzzer writes new inputs to the first directory only.
        .arg(&learned)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .args(if smoke {
            vec!["-seed=1".to_string(), format!("-runs={SMOKE_RUNS}")]
        } else {
            Vec::new()
        })
        .arg("-print_final_stats=1")
        .stdout(out.try_clone()?)
        .stderr(out);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let (runs, coverage, corpus) = figures(&text);
    let reproducers: Vec<String> = text
        .lines()
        .filter_map(|l| {
            l.split_once("Test unit written to ")
                .map(|(_, f)| f.trim().to_string())
        })
        .collect();
    let failed = !status.success();
    if failed {
        eprintln!("xtask: {target} failed ({status}):");
        for line in why(&text) {
            eprintln!("  {line}");
        }
    }
    Ok(Outcome {
        target: target.to_string(),
        seconds,
        runs,
        coverage,
        corpus,
        reproducers,
        failed,
        log,
    })
}

/// The lines of a failed run's log that say what went wrong: the panic and its message,
/// libFuzzer's verdict (crash, timeout, out of memory), the input it kept.
fn why(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            out.extend(lines.get(i..(i + 2).min(lines.len())).unwrap_or_default());
        } else if [
            "ERROR: libFuzzer",
            "ALARM:",
            "SUMMARY:",
            "Test unit written",
        ]
        .iter()
        .any(|m| line.contains(m))
        {
            out.push(*line);
        }
    }
    if out.is_empty() {
        // Something else failed (the build, cargo-fuzz itself): the end of the log.
        out = lines.iter().rev().take(20).rev().copied().collect();
    }
    out
}

/// Runs, edge coverage and corpus size from libFuzzer's log: the final statistics and
/// the last status line (`#N DONE cov: C ft: F corp: K/...`).
fn figures(log: &str) -> (Option<u64>, Option<u64>, Option<u64>) {
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok());
    let last = log.lines().rev().find(|l| l.contains(" cov: "));
    let after = |key: &str| {
        last.and_then(|l| l.split_once(key)).and_then(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
    };
    (runs, after(" cov: "), after(" corp: "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_figures() {
        let log = "#2\tINITED cov: 10 ft: 11 corp: 3/30b exec/s: 0 rss: 30Mb\n\
                   #9000\tDONE   cov: 812 ft: 2301 corp: 240/9Kb lim: 4096 exec/s: 900 rss: 60Mb\n\
                   Done 9000 runs in 10 second(s)\n\
                   stat::number_of_executed_units: 9012\n\
                   stat::average_exec_per_sec:     901\n";
        assert_eq!(figures(log), (Some(9012), Some(812), Some(240)));
        assert_eq!(figures(""), (None, None, None));
    }

    #[test]
    fn says_why_a_run_failed() {
        let log = "#1801\tREDUCE cov: 347\n\nthread '<unnamed>' panicked at src/x.rs:1:2:\n\
                   assertion failed\nstack backtrace:\n   0: f\n\
                   ==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='a/'; Test unit written to a/crash-1\n";
        assert_eq!(
            why(log),
            [
                "thread '<unnamed>' panicked at src/x.rs:1:2:",
                "assertion failed",
                "==1== ERROR: libFuzzer: deadly signal",
                "artifact_prefix='a/'; Test unit written to a/crash-1",
            ]
        );
        assert_eq!(why("build failed"), ["build failed"]);
    }
}
