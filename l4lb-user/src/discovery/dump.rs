//! The dump file: the last discovered server set as nginx `server ...;` lines, so nginx
//! can `include` it and l4lb can start from it when the source is unreachable.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context};

use crate::admin::show::server_line;
use crate::config::{units, ServerSpec};
use crate::upstream::Source;

/// Replaces the file atomically (temporary file in the same directory, then rename), so
/// a reader never sees half a set.
pub async fn write(
    path: &Path,
    upstream: &str,
    source: Source,
    servers: &[ServerSpec],
) -> anyhow::Result<()> {
    let text = render(upstream, source, servers);
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomic(&path, text.as_bytes()))
        .await
        .context("dump writer task failed")?
}

/// The file's text: a comment naming the upstream and source, then one line a server.
pub fn render(upstream: &str, source: Source, servers: &[ServerSpec]) -> String {
    let mut text = format!(
        "# l4lb: servers of upstream {upstream} from {source}; rewritten on every change\n"
    );
    for s in servers {
        text.push_str(&server_line(s));
        text.push('\n');
    }
    text
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    // Per process and write: during a binary upgrade the old and the new process both
    // write, and after a reload an old task may still finish a write as the new starts.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    // The rename itself reaches the disk only with its directory: after a power loss
    // the start that falls back to this file would otherwise find the older set.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    }
    Ok(())
}

/// The servers of `upstream`'s dump file; `None` when there is no file. A file l4lb
/// wrote for another upstream (a renamed one, a path that moved) is refused; one without
/// l4lb's first line (written by hand or by nginx-upsync) is read.
pub async fn read(path: &Path, upstream: &str) -> anyhow::Result<Option<Vec<ServerSpec>>> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if let Some(owner) = owner(&text).filter(|o| *o != upstream) {
        bail!("{}: written for upstream {owner}", path.display());
    }
    parse(&text)
        .with_context(|| format!("{}", path.display()))
        .map(Some)
}

/// The upstream named by the first line [`render`] writes.
fn owner(text: &str) -> Option<&str> {
    text.lines()
        .next()?
        .strip_prefix("# l4lb: servers of upstream ")?
        .split_whitespace()
        .next()
}

pub fn parse(text: &str) -> anyhow::Result<Vec<ServerSpec>> {
    let mut servers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        servers.push(parse_line(line).with_context(|| format!("line {}", i + 1))?);
    }
    Ok(servers)
}

fn parse_line(line: &str) -> anyhow::Result<ServerSpec> {
    let Some(body) = line.strip_suffix(';') else {
        bail!("missing ';' at the end")
    };
    let mut words = body.split_whitespace();
    if words.next() != Some("server") {
        bail!("expected `server ADDRESS [PARAMETERS];`");
    }
    let address = words.next().context("missing address")?;
    let addr: SocketAddr = address
        .parse()
        .map_err(|_| anyhow::anyhow!("{address:?} is not an ip:port address"))?;
    let mut spec = ServerSpec::new(addr);
    for word in words {
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("{word:?}: not a number"))
        };
        match word.split_once('=') {
            Some(("weight", v)) => spec.weight = number(v)?.max(1),
            Some(("max_fails", v)) => spec.max_fails = number(v)?,
            Some(("max_conns", v)) => spec.max_conns = number(v)?,
            Some(("fail_timeout", v)) => {
                spec.fail_timeout = units::parse_duration(v).map_err(anyhow::Error::msg)?
            }
            None if word == "down" => spec.down = true,
            None if word == "backup" => spec.backup = true,
            _ => bail!("unknown parameter {word:?}"),
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trips_through_server_lines() {
        let mut a = ServerSpec::new("10.0.0.1:3306".parse().unwrap());
        a.weight = 3;
        a.max_fails = 2;
        a.fail_timeout = Duration::from_secs(30);
        a.backup = true;
        let mut b = ServerSpec::new("[::1]:6379".parse().unwrap());
        b.down = true;
        b.max_conns = 7;
        let text = format!("# comment\n{}\n\n{}\n", server_line(&a), server_line(&b));
        assert_eq!(parse(&text).unwrap(), vec![a, b]);
    }

    #[tokio::test]
    async fn a_file_written_for_another_upstream_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.conf");
        let a = ServerSpec::new("10.0.0.1:3306".parse().unwrap());
        write(&path, "db", Source::Consul, std::slice::from_ref(&a))
            .await
            .unwrap();
        assert_eq!(read(&path, "db").await.unwrap(), Some(vec![a.clone()]));
        let err = read(&path, "cache").await.unwrap_err().to_string();
        assert!(err.contains("written for upstream db"), "{err}");
        // Hand-written (or nginx-upsync's): no first line of ours, read as it is.
        std::fs::write(&path, format!("{}\n", server_line(&a))).unwrap();
        assert_eq!(read(&path, "cache").await.unwrap(), Some(vec![a]));
    }

    /// Found by the fuzz targets' round trip: a 500ms fail_timeout from Consul was
    /// dumped as `fail_timeout=0s`, so a restart from the dump changed the server.
    #[test]
    fn a_sub_second_fail_timeout_survives_the_dump() {
        let mut a = ServerSpec::new("10.0.0.1:3306".parse().unwrap());
        a.fail_timeout = Duration::from_millis(500);
        assert_eq!(
            server_line(&a),
            "server 10.0.0.1:3306 weight=1 max_fails=1 fail_timeout=500ms;"
        );
        assert_eq!(parse(&server_line(&a)).unwrap(), vec![a]);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("server 10.0.0.1:1;\nserver 10.0.0.2:1 wieght=2;\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        assert!(parse("server 10.0.0.1:1").is_err());
        assert!(parse("server db:1;").is_err());
    }

    #[tokio::test]
    async fn write_replaces_and_read_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.conf");
        assert!(read(&path, "db").await.unwrap().is_none());
        let s = vec![ServerSpec::new("127.0.0.1:1".parse().unwrap())];
        write(&path, "db", Source::Consul, &s).await.unwrap();
        write(&path, "db", Source::Consul, &s).await.unwrap();
        assert_eq!(read(&path, "db").await.unwrap().unwrap(), s);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
