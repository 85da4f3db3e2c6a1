//! Upstreams: immutable server-set snapshots swapped atomically, live per-server state
//! that survives swaps, and balancing over the current snapshot.
//!
//! The control plane (config reload, discovery, admin API) calls [`Upstream::set`];
//! the data path only calls [`Upstream::select`].

mod balance;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use tracing::warn;

use crate::config::{Balance, ServerSpec, UpstreamConfig};
use crate::health::active::ActiveHealth;
use crate::health::active::Report;
use crate::health::{FailOutcome, PassiveHealth, SavedWindow};
use crate::metrics::{UpstreamLabels, METRICS};

/// Where the current server set of an upstream came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    Config,
    DumpFile,
    Consul,
    ConsulHealth,
    Etcd,
    Admin,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Config => "config",
            Source::DumpFile => "dump_file",
            Source::Consul => "consul",
            Source::ConsulHealth => "consul_health",
            Source::Etcd => "etcd",
            Source::Admin => "admin",
        })
    }
}

/// Live state of one server, keyed by address and carried across snapshots so a
/// discovery update never resets connection counts or failure windows.
#[derive(Debug, Default)]
pub struct PeerState {
    active: AtomicU32,
    total: AtomicU64,
    /// Bytes client to server and back, added as each session ends.
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    connect_failures: AtomicU64,
    pub health: PassiveHealth,
    pub checks: ActiveHealth,
    /// Smooth weighted round-robin bookkeeping; only touched under the upstream's lock.
    current_weight: AtomicI64,
}

impl PeerState {
    pub fn active(&self) -> u32 {
        let n = self.active.load(Ordering::Relaxed);
        #[cfg(test)]
        tests::after_active_read(self);
        n
    }

    /// Connections handed to this server since it appeared.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed)
    }

    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(Ordering::Relaxed)
    }

    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    /// Whether passive and active health both let the server take a connection.
    pub fn is_available(&self, now: Instant) -> bool {
        self.checks.allows() && self.health.is_available(now)
    }
}

#[derive(Debug)]
pub struct Peer {
    pub spec: ServerSpec,
    pub state: Arc<PeerState>,
}

/// One immutable view of an upstream.
#[derive(Debug)]
pub struct Snapshot {
    pub balance: Balance,
    /// Deterministic order (as configured, or sorted by address for discovered sets) so
    /// that every instance of a fleet hashes alike.
    pub peers: Vec<Peer>,
    pub source: Source,
    ring: Option<balance::Ring>,
}

impl Snapshot {
    pub fn specs(&self) -> impl Iterator<Item = &ServerSpec> {
        self.peers.iter().map(|p| &p.spec)
    }
}

pub struct Upstream {
    pub name: String,
    current: ArcSwap<Snapshot>,
    /// Weak so a removed server's state lives exactly as long as sessions hold it.
    states: Mutex<HashMap<SocketAddr, Weak<PeerState>>>,
    /// Serialises selections that update round-robin weights.
    select_lock: Mutex<()>,
    /// Serialises changes of the server set: discovery, the admin API and a reload each
    /// read the current set and publish a new one, and none may undo another's.
    write_lock: Mutex<()>,
    /// The configuration this upstream was built from (for reload decisions).
    config: ArcSwap<UpstreamConfig>,
    /// Bumped on every published change, for control-plane followers (health checks).
    changes: tokio::sync::watch::Sender<()>,
    /// This upstream's backend connect times.
    pub connect_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A connection slot on a chosen server: counts as active until dropped.
#[derive(Debug)]
pub struct Lease {
    pub spec: ServerSpec,
    pub state: Arc<PeerState>,
    /// Whether its connect failures count towards `max_fails`: not for the only server
    /// of an upstream with no backup, which nginx never takes out (taking it out would
    /// refuse every client for `fail_timeout` after one failed connect).
    counts_failures: bool,
}

impl Lease {
    /// A lease on a server no upstream lists any more: its state is its own.
    pub fn detached(addr: SocketAddr) -> Self {
        let state = Arc::new(PeerState::default());
        state.active.fetch_add(1, Ordering::Relaxed);
        Lease {
            spec: ServerSpec::new(addr),
            state,
            counts_failures: true,
        }
    }

    fn new(peer: &Peer, counts_failures: bool) -> Self {
        peer.state.active.fetch_add(1, Ordering::Relaxed);
        peer.state.total.fetch_add(1, Ordering::Relaxed);
        Lease {
            spec: peer.spec.clone(),
            state: Arc::clone(&peer.state),
            counts_failures,
        }
    }

    pub fn connect_succeeded(&self) {
        self.state.health.record_success();
    }

    /// Adds a finished session's bytes to the server's totals.
    pub fn add_bytes(&self, up: u64, down: u64) {
        self.state.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.state.bytes_down.fetch_add(down, Ordering::Relaxed);
    }

    /// Counts a connect failure against the server (nginx's `max_fails`).
    pub fn connect_failed(&self, upstream: &str) {
        self.state.connect_failures.fetch_add(1, Ordering::Relaxed);
        if !self.counts_failures {
            return;
        }
        let outcome = self.state.health.record_failure(
            Instant::now(),
            self.spec.max_fails,
            self.spec.fail_timeout,
        );
        if let FailOutcome::MarkedUnavailable { fails } = outcome {
            warn!(
                upstream,
                server = %self.spec.addr,
                fails,
                fail_timeout = ?self.spec.fail_timeout,
                "server marked unavailable"
            );
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, source: Source) -> Arc<Self> {
        let up = Upstream {
            name: config.name.clone(),
            current: ArcSwap::from_pointee(Snapshot {
                balance: config.balance,
                peers: Vec::new(),
                source,
                ring: None,
            }),
            states: Mutex::new(HashMap::new()),
            select_lock: Mutex::new(()),
            write_lock: Mutex::new(()),
            config: ArcSwap::from_pointee(config.clone()),
            changes: tokio::sync::watch::Sender::new(()),
            connect_seconds: METRICS
                .connect_seconds
                .get_or_create_owned(&UpstreamLabels {
                    upstream: config.name.as_str().into(),
                }),
        };
        // The servers a process starts with are in service at once, as in nginx;
        // checks then take down the ones that fail.
        up.publish(config.balance, config.servers.clone(), source, false);
        Arc::new(up)
    }

    /// Wakes when the server set changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn config(&self) -> Arc<UpstreamConfig> {
        self.config.load_full()
    }

    /// Replaces the server set; returns false (and swaps nothing) when nothing changed.
    /// With health checks configured, a server new to the upstream gets no traffic until
    /// it has passed a check. Callers hold `write_lock`.
    fn set(&self, balance: Balance, servers: Vec<ServerSpec>, source: Source) -> bool {
        let checked = self.config.load().health_check.is_some();
        self.publish(balance, servers, source, checked)
    }

    /// Swaps in a new set; callers hold `write_lock` (or are building the upstream).
    fn publish(
        &self,
        balance: Balance,
        servers: Vec<ServerSpec>,
        source: Source,
        checked: bool,
    ) -> bool {
        let old = self.current.load();
        if old.balance == balance
            && old.source == source
            && old.peers.len() == servers.len()
            && old.specs().zip(&servers).all(|(a, b)| a == b)
        {
            return false;
        }
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|_, w| w.strong_count() > 0);
        let fresh = || PeerState {
            checks: if checked {
                ActiveHealth::pending()
            } else {
                ActiveHealth::default()
            },
            ..PeerState::default()
        };
        let peers: Vec<Peer> = servers
            .into_iter()
            .map(|spec| {
                let state = match states.get(&spec.addr).and_then(Weak::upgrade) {
                    Some(s) => {
                        // Back in the set while sessions of its earlier stay still hold
                        // its state: counts go on, but its checks start over, as for
                        // any server new to the set.
                        if !old.peers.iter().any(|p| p.spec.addr == spec.addr) {
                            s.checks.restart(checked);
                        }
                        s
                    }
                    None => {
                        let s = Arc::new(fresh());
                        states.insert(spec.addr, Arc::downgrade(&s));
                        s
                    }
                };
                Peer { spec, state }
            })
            .collect();
        let ring = matches!(balance, Balance::Hash { consistent: true })
            .then(|| balance::Ring::build(&peers));
        self.current.store(Arc::new(Snapshot {
            balance,
            peers,
            source,
            ring,
        }));
        self.changes.send_replace(());
        true
    }

    /// Keeps the balance method, replaces the servers (discovery and admin updates).
    pub fn set_servers(&self, servers: Vec<ServerSpec>, source: Source) -> bool {
        let _writing = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let balance = self.config.load().balance;
        self.set(balance, servers, source)
    }

    /// Changes the server set from the one current under the write lock, so no other
    /// writer (discovery, a reload) can come between the read and the write: `change`
    /// sees the configuration and that set, and its error leaves the set as it is.
    /// Also returns whether the set changed.
    pub fn update<T, E>(
        &self,
        source: Source,
        change: impl FnOnce(&UpstreamConfig, Vec<ServerSpec>) -> Result<(Vec<ServerSpec>, T), E>,
    ) -> Result<(T, bool), E> {
        let _writing = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.config.load_full();
        let current = self.current.load().specs().cloned().collect();
        let (servers, answer) = change(&config, current)?;
        Ok((answer, self.set(config.balance, servers, source)))
    }

    /// Applies a reloaded `[upstream.NAME]`. A discovered set is kept while the upstream
    /// has an upsync source (a changed source replaces it on its first answer), so a
    /// reload never loses what discovery learned; a set changed through the admin API is
    /// kept while the configured servers did not change.
    pub fn reconfigure(&self, config: &UpstreamConfig) -> bool {
        let _writing = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.config.swap(Arc::new(config.clone()));
        let snap = self.current.load();
        let keep = match snap.source {
            Source::Config => false,
            Source::Admin => {
                config.upsync.is_none() && old.upsync.is_none() && old.servers == config.servers
            }
            _ => config.upsync.is_some() && old.upsync.is_some(),
        };
        if keep {
            let servers = snap.specs().cloned().collect();
            let source = snap.source;
            drop(snap);
            self.set(config.balance, servers, source)
        } else {
            drop(snap);
            self.set(config.balance, config.servers.clone(), Source::Config)
        }
    }

    /// Picks a server for a new connection, skipping those in `tried`.
    ///
    /// Leases are only taken under `select_lock`, so while it is held active counts can
    /// only fall (sessions ending): a server under its `max_conns` stays under it until
    /// the lease is taken. The counts are read once, into the candidates, and every rule
    /// of the decision works on those values.
    pub fn select(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<Lease> {
        let _guard = self.select_lock.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.current.load();
        let now = Instant::now();
        // nginx's `single`: one server and no backup is never taken out by max_fails.
        let single = matches!(&snap.peers[..], [only] if !only.spec.backup);
        let mut primaries = Vec::with_capacity(snap.peers.len());
        let mut backups = Vec::new();
        for (index, peer) in snap.peers.iter().enumerate() {
            let active = peer.state.active();
            let spec = &peer.spec;
            let healthy = if single {
                peer.state.checks.allows()
            } else {
                peer.state.is_available(now)
            };
            let eligible = !spec.down
                && !tried.contains(&spec.addr)
                && (spec.max_conns == 0 || active < spec.max_conns)
                && healthy;
            if eligible {
                let candidate = balance::Candidate {
                    peer,
                    index,
                    active,
                };
                if spec.backup {
                    backups.push(candidate);
                } else {
                    primaries.push(candidate);
                }
            }
        }
        // nginx's hash methods have no backups; fall back to weighted round-robin there.
        let backup_balance = match snap.balance {
            Balance::Hash { .. } => Balance::RoundRobin,
            other => other,
        };
        let ring = snap.ring.as_ref();
        let peer = balance::choose(snap.balance, &snap.peers, ring, &primaries, client)
            .or_else(|| balance::choose(backup_balance, &snap.peers, None, &backups, client))?;
        if !single {
            peer.state.health.picked(now, peer.spec.fail_timeout);
        }
        Some(Lease::new(peer, !single))
    }
}

/// All upstreams by name; the map itself is swapped whole on reload.
#[derive(Default)]
pub struct Upstreams {
    map: ArcSwap<BTreeMap<String, Arc<Upstream>>>,
}

impl Upstreams {
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.map.load().get(name).cloned()
    }

    pub fn all(&self) -> Arc<BTreeMap<String, Arc<Upstream>>> {
        self.map.load_full()
    }

    /// Creates, reconfigures or drops upstreams to match a (re)loaded configuration.
    /// Sessions on a dropped upstream keep their leases and finish normally.
    pub fn apply(&self, configs: &BTreeMap<String, UpstreamConfig>) {
        let old = self.map.load_full();
        let next = configs
            .iter()
            .map(|(name, cfg)| {
                let up = match old.get(name) {
                    Some(up) => {
                        up.reconfigure(cfg);
                        Arc::clone(up)
                    }
                    None => Upstream::new(cfg, Source::Config),
                };
                (name.clone(), up)
            })
            .collect();
        self.map.store(Arc::new(next));
        // A removed upstream's series leave /metrics (sessions still on it observe into
        // a handle of their own).
        for name in old.keys().filter(|n| !configs.contains_key(*n)) {
            METRICS.connect_seconds.remove(&UpstreamLabels {
                upstream: name.as_str().into(),
            });
        }
    }
}

/// What a binary upgrade carries of an upstream: its server set and where it came
/// from, and each server's live state (its active count travels with the sessions).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct UpstreamState {
    pub name: String,
    pub source: Source,
    pub servers: Vec<ServerSpec>,
    pub peers: Vec<PeerSaved>,
    /// Where its discovery watch stood (filled in by the daemon, which runs discovery).
    #[serde(default)]
    pub position: Option<crate::discovery::Position>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerSaved {
    pub addr: SocketAddr,
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub connect_failures: u64,
    pub passive: SavedWindow,
    pub active: Report,
}

impl Upstream {
    fn save(&self, now: Instant) -> UpstreamState {
        // After any change in flight: the set sent is the last one published.
        let _writing = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let snap = self.snapshot();
        UpstreamState {
            name: self.name.clone(),
            source: snap.source,
            servers: snap.specs().cloned().collect(),
            peers: snap
                .peers
                .iter()
                .map(|p| PeerSaved {
                    addr: p.spec.addr,
                    total: p.state.total(),
                    bytes_up: p.state.bytes_up(),
                    bytes_down: p.state.bytes_down(),
                    connect_failures: p.state.connect_failures(),
                    passive: p.state.health.save(now),
                    active: p.state.checks.report(),
                })
                .collect(),
            position: None,
        }
    }

    /// Takes over another process's state. The set it learned (discovery, admin API)
    /// is kept while the upstream still has an upsync source, or, for an admin change,
    /// no source at all; unlike a reload, whether the configured servers changed is not
    /// known here (the old process's file may differ), so an admin change stays.
    fn restore(&self, saved: &UpstreamState, now: Instant) {
        let upsync = self.config().upsync.is_some();
        let keep = match saved.source {
            Source::Config => false,
            Source::Admin => !upsync,
            _ => upsync,
        };
        if keep {
            self.set_servers(saved.servers.clone(), saved.source);
        }
        for peer in &self.snapshot().peers {
            let Some(s) = saved.peers.iter().find(|s| s.addr == peer.spec.addr) else {
                continue;
            };
            let st = &peer.state;
            st.total.store(s.total, Ordering::Relaxed);
            st.bytes_up.store(s.bytes_up, Ordering::Relaxed);
            st.bytes_down.store(s.bytes_down, Ordering::Relaxed);
            st.connect_failures
                .store(s.connect_failures, Ordering::Relaxed);
            st.health.restore(&s.passive, now);
            st.checks.restore(&s.active);
        }
    }

    /// A lease on the server at `addr` for a session another process opened: counted
    /// like any other (least_conn continues), or on its own if the server left the set.
    pub fn lease_for(&self, spec_addr: SocketAddr) -> Lease {
        let snap = self.snapshot();
        match snap.peers.iter().find(|p| p.spec.addr == spec_addr) {
            Some(peer) => {
                let lease = Lease::new(peer, true);
                // Not a new connection: the handed-over total already counts it.
                peer.state.total.fetch_sub(1, Ordering::Relaxed);
                lease
            }
            None => Lease::detached(spec_addr),
        }
    }
}

impl Upstreams {
    /// Every upstream's state, for a binary upgrade.
    pub fn save(&self) -> Vec<UpstreamState> {
        let now = Instant::now();
        self.all().values().map(|up| up.save(now)).collect()
    }

    /// Applies what [`Upstreams::save`] gave in another process to the upstreams of
    /// the same name (an upstream the new configuration lacks is skipped).
    pub fn restore(&self, saved: &[UpstreamState]) {
        let now = Instant::now();
        for s in saved {
            if let Some(up) = self.get(&s.name) {
                up.restore(s, now);
            }
        }
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
