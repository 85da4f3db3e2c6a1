//! `cargo xtask install`: the release daemon and what a host (or an image) needs to run
//! it as a service: PREFIX/bin/l4lb, /etc/l4lb/l4lb.toml (never overwritten), the
//! systemd unit, the state directory for upsync dump files, the `l4lb` system user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// The path the shipped unit runs the daemon from; rewritten for another prefix.
const UNIT_BINARY: &str = "/usr/local/bin/l4lb";
const UNIT_SOURCE: &str = "deploy/systemd/l4lb.service";
const CONFIG_SOURCE: &str = "config/l4lb.toml";
const CONFIG: &str = "/etc/l4lb/l4lb.toml";
const UNIT: &str = "/etc/systemd/system/l4lb.service";
const STATE_DIR: &str = "/var/lib/l4lb";
const SERVICE_USER: &str = "l4lb";

#[derive(clap::Args)]
pub struct InstallArgs {
    /// The binary goes to PREFIX/bin/l4lb.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage every file under this directory instead of / (packages, the container
    /// build); no user is created then.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
}

pub fn install(root: &Path, args: &InstallArgs) -> Result<()> {
    if !args.prefix.is_absolute() {
        bail!("--prefix must be an absolute path");
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if args.destdir.is_none() && unsafe { libc::geteuid() } != 0 {
        bail!("installing into / needs root (or stage it with --destdir DIR)");
    }
    let bin = crate::build_daemon(root)?;
    let layout = Layout {
        root: root.to_path_buf(),
        prefix: args.prefix.clone(),
        destdir: args.destdir.clone(),
    };
    layout.install_files(&bin)?;
    if args.destdir.is_none() {
        service_user()?;
        run(Command::new("chown")
            .arg(format!("{SERVICE_USER}:{SERVICE_USER}"))
            .arg(STATE_DIR))?;
        next_steps(&layout.binary());
    }
    Ok(())
}

/// Where each file goes; separate from the build so it can be tried in a directory.
struct Layout {
    root: PathBuf,
    prefix: PathBuf,
    destdir: Option<PathBuf>,
}

impl Layout {
    /// The installed binary's path as the running system sees it.
    fn binary(&self) -> PathBuf {
        self.prefix.join("bin/l4lb")
    }

    /// `path` under DESTDIR, when there is one.
    fn staged(&self, path: &Path) -> PathBuf {
        match &self.destdir {
            Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }

    fn install_files(&self, bin: &Path) -> Result<()> {
        let target = self.staged(&self.binary());
        replace(
            &target,
            &fs::read(bin).with_context(|| format!("reading {}", bin.display()))?,
            0o755,
        )?;
        eprintln!("xtask: installed {}", target.display());

        let config = self.staged(Path::new(CONFIG));
        if config.exists() {
            eprintln!(
                "xtask: kept {} (an existing configuration is never overwritten)",
                config.display()
            );
        } else {
            let text = fs::read(self.root.join(CONFIG_SOURCE))?;
            replace(&config, &text, 0o644)?;
            eprintln!(
                "xtask: installed the default configuration as {}",
                config.display()
            );
        }

        // The unit belongs to the install: it is replaced on upgrade, local changes go in
        // a drop-in (`systemctl edit l4lb`).
        let unit_text = fs::read_to_string(self.root.join(UNIT_SOURCE))?;
        let binary = self.binary();
        let binary = binary.to_str().context("the prefix is not UTF-8")?;
        let unit = self.staged(Path::new(UNIT));
        replace(
            &unit,
            unit_text.replace(UNIT_BINARY, binary).as_bytes(),
            0o644,
        )?;
        eprintln!("xtask: installed the systemd unit as {}", unit.display());

        let state = self.staged(Path::new(STATE_DIR));
        fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        fs::set_permissions(&state, fs::Permissions::from_mode(0o750))?;
        eprintln!(
            "xtask: state directory (upsync dump files) {}",
            state.display()
        );
        Ok(())
    }
}

/// Writes `path` through a temporary file and a rename: a running daemon keeps its
/// binary (writing over it in place fails with ETXTBSY), a reader never sees half a file.
fn replace(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .context("a file to install has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    fs::write(tmp.path(), content)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The system user the unit runs as, created once.
fn service_user() -> Result<()> {
    let exists = Command::new("getent")
        .args(["passwd", SERVICE_USER])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return Ok(());
    }
    eprintln!("xtask: creating the system user {SERVICE_USER}");
    run(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--home-dir",
        STATE_DIR,
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        SERVICE_USER,
    ]))
}

fn next_steps(binary: &Path) {
    let systemd = Path::new("/run/systemd/system").exists();
    eprintln!(
        "xtask: done. Check the configuration: {} check -c {CONFIG}",
        binary.display()
    );
    if systemd {
        eprintln!("xtask: first install: systemctl daemon-reload && systemctl enable --now l4lb");
        eprintln!(
            "xtask: upgrade without ending a session: systemctl kill -s USR2 --kill-whom=main l4lb (a changed unit file: systemctl daemon-reload first; a restart would refuse new clients while sessions drain)"
        );
    } else {
        eprintln!(
            "xtask: systemd is not running here; the unit is in {UNIT} for hosts where it is"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dest: &Path, prefix: &str) -> Layout {
        Layout {
            root: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
            prefix: PathBuf::from(prefix),
            destdir: Some(dest.to_path_buf()),
        }
    }

    #[test]
    fn stages_binary_config_unit_and_state_dir() {
        let dest = tempfile::tempdir().expect("tempdir");
        let bin = dest.path().join("built-l4lb");
        fs::write(&bin, b"binary").expect("write");
        layout(dest.path(), "/opt/l4lb")
            .install_files(&bin)
            .expect("install");

        let installed = dest.path().join("opt/l4lb/bin/l4lb");
        assert_eq!(fs::read(&installed).expect("binary"), b"binary");
        assert_eq!(
            fs::metadata(&installed).expect("meta").permissions().mode() & 0o777,
            0o755
        );
        let unit =
            fs::read_to_string(dest.path().join("etc/systemd/system/l4lb.service")).expect("unit");
        assert!(unit.contains("ExecStart=/opt/l4lb/bin/l4lb run"), "{unit}");
        assert!(!unit.contains(UNIT_BINARY), "{unit}");
        let config = fs::read_to_string(dest.path().join("etc/l4lb/l4lb.toml")).expect("config");
        assert!(config.contains("[upstream.app_backend]"));
        let state = fs::metadata(dest.path().join("var/lib/l4lb")).expect("state dir");
        assert!(state.is_dir());
    }

    #[test]
    fn an_existing_config_is_kept_and_the_binary_replaced() {
        let dest = tempfile::tempdir().expect("tempdir");
        let config = dest.path().join("etc/l4lb/l4lb.toml");
        fs::create_dir_all(config.parent().expect("parent")).expect("mkdir");
        fs::write(&config, "# the operator's own\n").expect("write");
        let bin = dest.path().join("built-l4lb");
        for version in ["v1", "v2"] {
            fs::write(&bin, version).expect("write");
            layout(dest.path(), "/usr/local")
                .install_files(&bin)
                .expect("install");
        }
        assert_eq!(
            fs::read_to_string(&config).expect("config"),
            "# the operator's own\n"
        );
        assert_eq!(
            fs::read_to_string(dest.path().join("usr/local/bin/l4lb")).expect("binary"),
            "v2"
        );
    }
}
