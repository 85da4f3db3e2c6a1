//! Installs what the build and tests need on a fresh Debian 12 machine, and nothing
//! that is already there: the nightly toolchain with rust-src (eBPF is built with
//! `-Z build-std=core`), Debian's LLVM 22 and `bpf-linker` built against it, the
//! servers the end-to-end tests start for real, and cargo-fuzz for the fuzz targets.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::run;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Run,
    Test,
}

/// Debian packages for building the eBPF linker.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Debian packages the tests use: a real etcd, `ip` and `ss`, openssl for test
/// certificates, real redis and MariaDB servers for the health checks (the *-core
/// packages carry mariadbd without a system service that would start; the client one
/// has `my_print_defaults`, without which `mariadb-install-db` fails), `setpriv`
/// (util-linux) to run the daemon with chosen capabilities, `systemd-analyze` to
/// verify the unit, `strace` to hold the daemon's system calls against the unit's
/// filter.
const TEST_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "iproute2",
    "openssl",
    "redis-server",
    "mariadb-server-core",
    "mariadb-client-core",
    "util-linux",
    "systemd",
    "strace",
];

pub fn all(purpose: Purpose) -> Result<()> {
    let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
    if purpose == Purpose::Test {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    apt_install(&packages)?;
    nightly_rust_src()?;
    nightly_llvm_is_22()?;
    bpf_linker()
}

/// bpf-linker is built against Debian's LLVM 22 and reads the bitcode rustc emits:
/// a nightly on a newer LLVM (rustup installs the latest) makes it fail with an
/// obscure bitcode error. Said here plainly, with the way out.
fn nightly_llvm_is_22() -> Result<()> {
    let out = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .context("cannot run rustc +nightly")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string);
    match major.as_deref() {
        Some("22") => Ok(()),
        other => bail!(
            "the nightly toolchain uses LLVM {}, but bpf-linker is built against Debian's LLVM 22: \
             install a nightly on LLVM 22 under the name nightly (e.g. rustup toolchain install \
             nightly-2026-05-20 --profile minimal -c rust-src, then rustup toolchain link nightly \
             \"$(rustc +nightly-2026-05-20 --print sysroot)\")",
            other.unwrap_or("(unknown)")
        ),
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages that are missing (apt-get update first, once).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages {}: run `sudo apt-get install -y {}` or run xtask as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// cargo-fuzz for `cargo xtask fuzz` and the fuzz smoke test (it runs on nightly).
pub fn cargo_fuzz() -> Result<()> {
    nightly_rust_src()?;
    if succeeds(Command::new("cargo").args(["+nightly", "fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (for the fuzz targets; once)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn nightly_rust_src() -> Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed to install the nightly toolchain")?;
    if !String::from_utf8_lossy(&has_nightly.stdout).contains("nightly") {
        eprintln!("xtask: installing the nightly toolchain (for the eBPF build)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        eprintln!("xtask: adding rust-src to nightly (eBPF builds core from source)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker against Debian's LLVM 22 (a few minutes, once)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}
