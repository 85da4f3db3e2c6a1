//! The error log (stderr) and the access log (off, stderr or a file), each as text or
//! JSON lines. Sessions write their access line as a `tracing` event with target
//! `access`; a layer of its own sends those to the access log's current sink, which a
//! reload can change and SIGUSR1 reopens (nginx semantics: rotate by renaming the file,
//! then signal).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{AccessLog, Global, LogFormat};

/// Target of the access log's events.
pub const ACCESS: &str = "access";

enum Sink {
    Off,
    Stderr,
    File { path: PathBuf, file: Mutex<File> },
}

/// Where access lines go now; shared by the logging layer and the daemon.
pub struct AccessSink {
    current: ArcSwap<Sink>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessSink {
    fn new(target: &AccessLog) -> io::Result<Self> {
        let sink = AccessSink {
            current: ArcSwap::from_pointee(Sink::Off),
        };
        sink.set(target)?;
        Ok(sink)
    }

    /// Whether sessions should write access lines at all.
    pub fn enabled(&self) -> bool {
        !matches!(**self.current.load(), Sink::Off)
    }

    /// Points the log at `target` (a reload); on error the current sink stays.
    pub fn set(&self, target: &AccessLog) -> io::Result<()> {
        let next = match target {
            AccessLog::Off => Sink::Off,
            AccessLog::Stderr => Sink::Stderr,
            AccessLog::File(path) => {
                if let Sink::File { path: open, .. } = &**self.current.load() {
                    if open == path {
                        return Ok(());
                    }
                }
                Sink::File {
                    path: path.clone(),
                    file: Mutex::new(open_append(path).map_err(|e| {
                        io::Error::new(e.kind(), format!("access log {}: {e}", path.display()))
                    })?),
                }
            }
        };
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Reopens the file at its path (after a rename by logrotate); stderr and off have
    /// nothing to reopen.
    pub fn reopen(&self) -> io::Result<()> {
        let current = self.current.load_full();
        if let Sink::File { path, .. } = &*current {
            let file = open_append(path).map_err(|e| {
                io::Error::new(e.kind(), format!("access log {}: {e}", path.display()))
            })?;
            self.current.store(Arc::new(Sink::File {
                path: path.clone(),
                file: Mutex::new(file),
            }));
        }
        Ok(())
    }
}

/// Whether the access log `target` can be opened: an existing file for appending, or
/// else its directory. Nothing is created: a file `l4lb check` made as root would then
/// be one the daemon's own user could not open.
pub fn can_open(target: &AccessLog) -> io::Result<()> {
    let AccessLog::File(path) = target else {
        return Ok(());
    };
    let failed =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()));
    if path.exists() {
        return OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(failed);
    }
    match path.parent() {
        Some(dir) if dir.is_dir() => Ok(()),
        _ => Err(failed(io::Error::new(
            io::ErrorKind::NotFound,
            "its directory does not exist",
        ))),
    }
}

/// A handle on the sink as it was when one line began.
pub struct SinkWriter(Arc<Sink>);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &*self.0 {
            Sink::Off => Ok(buf.len()),
            Sink::Stderr => io::stderr().write(buf),
            Sink::File { file, .. } => file.lock().unwrap_or_else(|p| p.into_inner()).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &*self.0 {
            Sink::Off => Ok(()),
            Sink::Stderr => io::stderr().flush(),
            Sink::File { file, .. } => file.lock().unwrap_or_else(|p| p.into_inner()).flush(),
        }
    }
}

/// Lets the formatting layer write to whatever the sink is at that moment.
#[derive(Clone)]
pub struct SinkHandle(Arc<AccessSink>);

impl<'a> MakeWriter<'a> for SinkHandle {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter(self.0.current.load_full())
    }
}

/// Installs the process's logging from `[global]`; returns the access log's sink.
/// `L4LB_LOG` (a `tracing` filter) overrides `log_level` for the error log.
pub fn init(global: &Global) -> io::Result<Arc<AccessSink>> {
    let sink = Arc::new(AccessSink::new(&global.access_log)?);
    let level = std::env::var("L4LB_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| global.log_level.clone());
    // Access lines have their own layer; keep them out of the error log.
    let errors_filter = EnvFilter::try_new(format!("{level},{ACCESS}=off"))
        .unwrap_or_else(|_| EnvFilter::new("info,access=off"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let errors = match global.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(io::stderr)
            .boxed(),
    };
    let writer = SinkHandle(Arc::clone(&sink));
    let access = match global.access_log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed(),
    };
    Registry::default()
        .with(errors.with_filter(errors_filter))
        .with(access.with_filter(Targets::new().with_target(ACCESS, Level::INFO)))
        .init();
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_follows_a_renamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let sink = AccessSink::new(&AccessLog::File(path.clone())).unwrap();
        let handle = SinkHandle(Arc::new(sink));
        handle.make_writer().write_all(b"one\n").unwrap();
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        handle.make_writer().write_all(b"two\n").unwrap();
        handle.0.reopen().unwrap();
        handle.make_writer().write_all(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }

    #[test]
    fn an_unwritable_path_keeps_the_current_sink() {
        let sink = AccessSink::new(&AccessLog::Stderr).unwrap();
        let bad = AccessLog::File(PathBuf::from("/nonexistent-dir/access.log"));
        let err = sink.set(&bad).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/access.log"),
            "{err}"
        );
        assert!(sink.enabled());
    }
}
