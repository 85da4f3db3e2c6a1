//! Dynamic upstreams (nginx-upsync semantics): one task per upstream with an upsync
//! source (Consul KV, Consul health, etcd v3) that publishes each changed server set
//! through [`Upstream::set_servers`] and mirrors it to the dump file.
//!
//! A source only fetches and parses; this module decides what to apply, keeps the last
//! good set on any error, paces retries, and starts/stops tasks on reload.

pub(crate) mod consul;
pub(crate) mod consul_health;
pub mod dump;
pub(crate) mod etcd;
mod http;
pub mod params;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ServerSpec, UpsyncConfig, UpsyncKind};
use crate::upstream::{Source as Origin, Upstream, Upstreams};
use params::{ServerParams, Strictness};

/// Tries a `strong_dependency` source gets at start before l4lb gives up.
const STARTUP_TRIES: u32 = 3;

/// Why a fetch produced no server set. The caller keeps the last good set either way;
/// the kind tells an operator whether to look at the network or at the data.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("bad data at key {key:?}: {reason}")]
    BadData { key: String, reason: String },
}

impl SourceError {
    pub fn bad(key: impl Into<String>, reason: impl Into<String>) -> Self {
        SourceError::BadData {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// One discovery backend.
pub trait Source: Send + 'static {
    /// The whole current server set. The first call answers at once; later calls wait
    /// until the source reports a change (or its long poll ends). A source paces itself
    /// so that calling this in a loop never spins.
    fn next(&mut self) -> impl Future<Output = Result<Vec<ServerSpec>, SourceError>> + Send;

    /// Where the source's watch stands after the last answer (Consul's index); 0 when
    /// it has no such thing. A binary upgrade carries it to the new process.
    fn position(&self) -> u64 {
        0
    }

    /// Continues from a position another process reached for the same URL, whose
    /// answer it handed over: the next call waits for a change.
    fn resume_at(&mut self, _position: u64) {}
}

/// Where an upstream's discovery watch stood when a binary upgrade handed it over.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub url: String,
    pub at: u64,
}

/// Reads nginx-upsync keys `<prefix><ip:port>` and their values. Keys outside `prefix`
/// and the prefix's own folder key are skipped; any other bad key or value rejects the
/// whole set, naming the key.
pub fn servers_from_kv<'a>(
    prefix: &str,
    entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Vec<ServerSpec>, SourceError> {
    let mut servers = Vec::new();
    for (key, value) in entries {
        let key = std::str::from_utf8(key)
            .map_err(|_| SourceError::bad(String::from_utf8_lossy(key), "key is not UTF-8"))?;
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        let addr: SocketAddr = rest
            .parse()
            .map_err(|_| SourceError::bad(key, format!("{rest:?} is not an ip:port address")))?;
        let params = parse_value(value).map_err(|reason| SourceError::bad(key, reason))?;
        servers.push(params.to_spec(rest.to_string(), addr));
    }
    Ok(servers)
}

fn parse_value(value: &[u8]) -> Result<ServerParams, String> {
    if value.iter().all(u8::is_ascii_whitespace) {
        return Ok(ServerParams::default());
    }
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    ServerParams::from_json(&json, Strictness::Upsync).map_err(|e| format!("value field {e}"))
}

/// Sorted by address so every instance of a fleet orders (and hashes) alike.
fn normalise(mut servers: Vec<ServerSpec>) -> Vec<ServerSpec> {
    servers.sort_by_key(|s| s.addr);
    servers.dedup_by_key(|s| s.addr);
    servers
}

fn origin(kind: UpsyncKind) -> Origin {
    match kind {
        UpsyncKind::Consul => Origin::Consul,
        UpsyncKind::ConsulHealth => Origin::ConsulHealth,
        UpsyncKind::Etcd => Origin::Etcd,
    }
}

/// The URL as logged and shown by the admin API: without a user:password part or the
/// value of a `token` parameter (Consul takes its ACL token there too).
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            if u.query_pairs().any(|(k, _)| k == "token") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "token" { "(hidden)".into() } else { v };
                        (k.into_owned(), v.into_owned())
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// A URL path with its `%XX` escapes decoded: key prefixes may hold characters a URL
/// escapes.
fn decoded_path(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

/// What the admin API and the metrics show of a discovery task.
#[derive(Debug, Default)]
pub struct TaskStatus {
    /// The source's position after its last good answer (see [`Source::position`]).
    position: AtomicU64,
    pub updates: AtomicU64,
    pub errors: AtomicU64,
    /// Of `errors`, answers whose data was unusable (bad JSON, key, address, base64).
    pub bad_data: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_success_unix: AtomicU64,
}

impl TaskStatus {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Seconds since the epoch of the last good answer from the source (0 = none yet).
    pub fn last_success_unix(&self) -> u64 {
        self.last_success_unix.load(Ordering::Relaxed)
    }

    fn succeeded(&self, position: u64) {
        self.position.store(position, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success_unix.store(now, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A good answer that was not applied: counted with the errors, and shown.
    fn refused(&self, why: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn failed(&self, e: &SourceError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if matches!(e, SourceError::BadData { .. }) {
            self.bad_data.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

/// Status of every running discovery task by upstream name, for the admin API.
#[derive(Debug, Default)]
pub struct Board {
    tasks: Mutex<BTreeMap<String, Arc<TaskStatus>>>,
}

impl Board {
    pub fn get(&self, upstream: &str) -> Option<Arc<TaskStatus>> {
        self.lock().get(upstream).cloned()
    }

    /// Every running task's status, by upstream name.
    pub fn all(&self) -> Vec<(String, Arc<TaskStatus>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<TaskStatus>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An upsync source, built and not started.
enum Built {
    Kv(consul::ConsulKv),
    Health(consul_health::ConsulHealth),
    Etcd(Box<etcd::Etcd>),
}

impl Built {
    fn new(cfg: &UpsyncConfig) -> anyhow::Result<Built> {
        Ok(match cfg.kind {
            UpsyncKind::Consul => Built::Kv(consul::ConsulKv::new(cfg)?),
            UpsyncKind::ConsulHealth => Built::Health(consul_health::ConsulHealth::new(cfg)?),
            UpsyncKind::Etcd => Built::Etcd(Box::new(etcd::Etcd::new(cfg)?)),
        })
    }
}

/// Builds the source of every `[upstream.NAME.upsync]` of `config` without starting it:
/// a URL of the wrong shape or an unreadable CA file fails `l4lb check` and a reload,
/// rather than a reload stopping an upstream's discovery and starting none.
pub fn check(config: &Config) -> Result<(), Vec<String>> {
    let errors: Vec<String> = config
        .upstreams
        .iter()
        .filter_map(|(name, up)| {
            let cfg = up.upsync.as_ref()?;
            Built::new(cfg)
                .err()
                .map(|e| format!("upstream {name}: upsync {}: {e:#}", shown_url(&cfg.url)))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Applies what a source reports to one upstream.
struct Runner {
    upstream: Arc<Upstream>,
    cfg: UpsyncConfig,
    origin: Origin,
    status: Arc<TaskStatus>,
    /// The set last written to the dump file by this task.
    dumped: Option<Vec<ServerSpec>>,
}

impl Runner {
    async fn apply(&mut self, servers: Vec<ServerSpec>, position: u64) {
        let servers = normalise(servers);
        let serving = self.upstream.snapshot().peers.len();
        if servers.is_empty() && serving > 0 {
            // As nginx-upsync ("cannot delete all peers"): a deleted prefix or a service
            // with no passing instance is more likely a mistake or an outage than an
            // intent, and applying it would refuse every session.
            self.status.succeeded(position);
            self.status.refused(format!(
                "the source lists no servers; the last {serving} stay in service"
            ));
            warn!(upstream = %self.upstream.name, source = %self.origin, servers = serving, "source lists no servers; keeping the last set (as nginx-upsync)");
            return;
        }
        // Under the upstream's write lock: an answer that lands as a reload replaces or
        // removes this source is not applied.
        let applied = self.upstream.update(self.origin, |config, _| {
            if config.upsync.as_ref() != Some(&self.cfg) {
                return Err(());
            }
            Ok((servers.clone(), ()))
        });
        let Ok(((), changed)) = applied else {
            debug!(upstream = %self.upstream.name, source = %self.origin, "answer from a source the configuration no longer has; not applied");
            return;
        };
        // After the set: a binary upgrade reads positions before sets, so the new
        // process never gets a position newer than the set it waits from.
        self.status.succeeded(position);
        if changed {
            self.status.updates.fetch_add(1, Ordering::Relaxed);
            info!(upstream = %self.upstream.name, source = %self.origin, servers = servers.len(), "server set updated");
        }
        // Whenever the file may not hold this set: a task's first answer (a dump_path
        // just added, a set carried over by an upgrade) and after a failed write, not
        // only when the set changed.
        if let Some(path) = &self.cfg.dump_path {
            if self.dumped.as_ref() != Some(&servers) {
                match dump::write(path, &self.upstream.name, self.origin, &servers).await {
                    Ok(()) => self.dumped = Some(servers),
                    Err(e) => {
                        error!(upstream = %self.upstream.name, path = %path.display(), error = %format!("{e:#}"), "cannot write the dump file; trying again with the next answer");
                    }
                }
            }
        }
    }

    fn failed(&self, e: &SourceError) {
        self.status.failed(e);
        warn!(
            upstream = %self.upstream.name,
            source = %self.origin,
            error = %e,
            retry_in = ?self.cfg.interval,
            "discovery fetch failed; keeping the last good server set"
        );
    }

    /// `strong_dependency`: the source must answer before l4lb serves.
    async fn initial<S: Source>(&mut self, src: &mut S) -> anyhow::Result<()> {
        let mut last = None;
        for attempt in 1..=STARTUP_TRIES {
            match src.next().await {
                Ok(servers) => {
                    self.apply(servers, src.position()).await;
                    return Ok(());
                }
                Err(e) => {
                    self.failed(&e);
                    last = Some(e);
                    if attempt < STARTUP_TRIES {
                        tokio::time::sleep(self.cfg.interval).await;
                    }
                }
            }
        }
        let reason = last.map_or_else(String::new, |e| e.to_string());
        anyhow::bail!(
            "upstream {}: upsync source {} did not answer after {STARTUP_TRIES} tries and strong_dependency = true: {reason}",
            self.upstream.name,
            shown_url(&self.cfg.url)
        )
    }

    /// Without `strong_dependency`, start from the last set written to the dump file.
    async fn load_dump(&self) {
        let Some(path) = &self.cfg.dump_path else {
            return;
        };
        match dump::read(path, &self.upstream.name).await {
            Ok(Some(servers))
                if servers.is_empty() && !self.upstream.snapshot().peers.is_empty() =>
            {
                // An empty set is never applied over servers (as a source's answer).
                info!(upstream = %self.upstream.name, path = %path.display(), "the dump file lists no servers; the configured ones stay");
            }
            Ok(Some(servers)) => {
                let n = servers.len();
                self.upstream
                    .set_servers(normalise(servers), Origin::DumpFile);
                info!(upstream = %self.upstream.name, path = %path.display(), servers = n, "servers loaded from the dump file");
            }
            Ok(None) => {}
            Err(e) => {
                warn!(upstream = %self.upstream.name, error = %format!("{e:#}"), "dump file ignored")
            }
        }
    }

    async fn run<S: Source>(mut self, mut src: S, stop: CancellationToken) {
        loop {
            let fetched = tokio::select! {
                _ = stop.cancelled() => break,
                r = src.next() => r,
            };
            match fetched {
                Ok(servers) => self.apply(servers, src.position()).await,
                Err(e) => {
                    self.failed(&e);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(self.cfg.interval) => {}
                    }
                }
            }
        }
        info!(upstream = %self.upstream.name, source = %self.origin, "discovery stopped");
    }
}

struct Task {
    cfg: UpsyncConfig,
    upstream: Arc<Upstream>,
    stop: CancellationToken,
}

/// The running discovery tasks, one per upstream with an upsync source.
#[derive(Default)]
pub struct Discovery {
    tasks: HashMap<String, Task>,
    board: Arc<Board>,
}

/// Whether a task starts with the process (strong_dependency is honoured; with the
/// position a binary upgrade handed over, if any) or on reload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start(Option<u64>),
    Reload,
}

impl Discovery {
    pub fn board(&self) -> Arc<Board> {
        Arc::clone(&self.board)
    }

    /// Starts every upsync task; fails when a `strong_dependency` source does not answer.
    /// `handed` holds the positions a binary upgrade handed over, by upstream.
    pub async fn start(
        &mut self,
        upstreams: &Upstreams,
        handed: &HashMap<String, Position>,
    ) -> anyhow::Result<()> {
        // All at once: a strong_dependency source that does not answer takes its tries
        // (tens of seconds), and several in a row would outlast a service manager's
        // start timeout before the daemon could say which failed.
        let mut starting = tokio::task::JoinSet::new();
        for (name, up) in upstreams.all().iter() {
            if let Some(cfg) = up.config().upsync.clone() {
                let from = handed.get(name).filter(|p| p.url == cfg.url).map(|p| p.at);
                starting.spawn(prepare(Arc::clone(up), cfg, Phase::Start(from)));
            }
        }
        while let Some(joined) = starting.join_next().await {
            let started = joined.context("a discovery task failed to start")??;
            self.register(started);
        }
        Ok(())
    }

    /// Where the upstream's watch stands, for a binary upgrade to hand over.
    pub fn position(&self, upstream: &str) -> Option<Position> {
        let task = self.tasks.get(upstream)?;
        let at = self.board.get(upstream)?.position.load(Ordering::Relaxed);
        (at > 0).then(|| Position {
            url: task.cfg.url.clone(),
            at,
        })
    }

    /// After a reload: tasks whose upstream is gone or whose upsync settings changed stop,
    /// new ones start, unchanged ones keep running (and keep their long poll).
    pub async fn reconcile(&mut self, upstreams: &Upstreams) {
        let all = upstreams.all();
        let stale: Vec<String> = self
            .tasks
            .iter()
            .filter(|(name, task)| match all.get(*name) {
                Some(up) => {
                    !Arc::ptr_eq(up, &task.upstream)
                        || up.config().upsync.as_ref() != Some(&task.cfg)
                }
                None => true,
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.stop(&name);
        }
        for (name, up) in all.iter() {
            let Some(cfg) = up.config().upsync.clone() else {
                continue;
            };
            if self.tasks.contains_key(name) {
                continue;
            }
            match prepare(Arc::clone(up), cfg, Phase::Reload).await {
                Ok(started) => self.register(started),
                Err(e) => {
                    error!(upstream = %name, error = %format!("{e:#}"), "cannot start discovery")
                }
            }
        }
    }

    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.tasks.keys().cloned().collect();
        for name in names {
            self.stop(&name);
        }
    }

    fn stop(&mut self, name: &str) {
        if let Some(task) = self.tasks.remove(name) {
            task.stop.cancel();
            self.board.lock().remove(name);
        }
    }

    fn register(&mut self, started: Started) {
        let name = started.task.upstream.name.clone();
        self.board.lock().insert(name.clone(), started.status);
        self.tasks.insert(name, started.task);
    }
}

/// A discovery task that runs, for [`Discovery`] to keep.
struct Started {
    task: Task,
    status: Arc<TaskStatus>,
}

/// Starts the task of `up`'s source (with `strong_dependency` at start: once it
/// answered).
async fn prepare(up: Arc<Upstream>, cfg: UpsyncConfig, phase: Phase) -> anyhow::Result<Started> {
    let context = || format!("upstream {}: upsync {}", up.name, shown_url(&cfg.url));
    match Built::new(&cfg).with_context(context)? {
        Built::Kv(src) => prepare_with(src, up, cfg, phase).await,
        Built::Health(src) => prepare_with(src, up, cfg, phase).await,
        Built::Etcd(src) => prepare_with(*src, up, cfg, phase).await,
    }
}

async fn prepare_with<S: Source>(
    mut src: S,
    upstream: Arc<Upstream>,
    cfg: UpsyncConfig,
    phase: Phase,
) -> anyhow::Result<Started> {
    let mut runner = Runner {
        upstream: Arc::clone(&upstream),
        cfg: cfg.clone(),
        origin: origin(cfg.kind),
        status: Arc::new(TaskStatus::default()),
        dumped: None,
    };
    info!(
        upstream = %upstream.name,
        source = %runner.origin,
        url = %shown_url(&cfg.url),
        strong_dependency = cfg.strong_dependency,
        "discovery started"
    );
    // A set handed over by a binary upgrade is already the source's last answer:
    // the new process does not wait for it again (nor fail if it is down now).
    let has_set = upstream.snapshot().source != Origin::Config;
    if has_set {
        if let Phase::Start(Some(at)) = phase {
            // Its answer came with the set: wait for the next change from there.
            info!(upstream = %upstream.name, position = at, "discovery continues from the position the previous process reached");
            src.resume_at(at);
            runner.status.position.store(at, Ordering::Relaxed);
        }
    } else if cfg.strong_dependency && matches!(phase, Phase::Start(_)) {
        runner.initial(&mut src).await?;
    } else {
        // Only when nothing was discovered yet: on reload a discovered set is newer.
        runner.load_dump().await;
    }
    let stop = CancellationToken::new();
    let status = Arc::clone(&runner.status);
    tokio::spawn(runner.run(src, stop.clone()));
    Ok(Started {
        task: Task {
            cfg,
            upstream,
            stop,
        },
        status,
    })
}

#[cfg(test)]
mod tests;
