//! The running process: binds listeners, applies reloads as diffs (SIGHUP), drains on
//! SIGTERM, hands everything to a new binary on SIGUSR2 (`upgrade`). Established
//! sessions are separate tasks that hold their own snapshot of their listener's
//! settings, so neither a reload nor a removed listener drops them.

mod upgrade;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::AdminServer;
use crate::config::{self, Config, Protocol, ServerConfig, SpliceMode};
use crate::discovery::Discovery;
use crate::health::HealthChecks;
use crate::logging::AccessSink;
use crate::metrics::ListenerMetrics;
use crate::notify;
use crate::proxy::{tcp, udp, ListenerCtx, SharedCtx};
use crate::runtime::{Alarm, DataPath, Handover};
use crate::splice::Splicer;
use crate::upgrade::wire::{Channel, Msg};
use crate::upgrade::Exe;
use crate::upstream::Upstreams;
use crate::xdp::XdpFilter;
use prometheus_client::registry::Registry;
use upgrade::Inherited;

/// Pending connections the kernel queues per listener (nginx's default on Linux is 511).
const LISTEN_BACKLOG: u32 = 4096;

struct Listener {
    ctx: SharedCtx,
    stop: CancellationToken,
    /// A duplicate of the listening socket, for a binary upgrade to pass on.
    socket: OwnedFd,
    udp: Option<UdpListener>,
}

/// What a UDP listener's tasks share, so an upgrade can pause them and hand the
/// sessions over (or resume them).
struct UdpListener {
    socket: Arc<UdpSocket>,
    sessions: udp::Sessions,
    pause: CancellationToken,
    /// The task reading its socket (see `udp::serve`).
    receiver: JoinHandle<()>,
}

/// A removed UDP listener that still serves its open sessions (see `udp::serve`). Its
/// socket stays bound until the last one ends, so a reload that adds the address back
/// takes the socket and the sessions over rather than fail to bind it.
struct DrainingUdp {
    /// Its settings: what outlives a reload (open sessions per client for `limit_conn`,
    /// metric handles) goes on with the listener that takes it back.
    ctx: SharedCtx,
    socket: Weak<UdpSocket>,
    sessions: udp::Sessions,
    pause: CancellationToken,
    receiver: JoinHandle<()>,
}

pub struct Daemon {
    config_path: PathBuf,
    exe: Exe,
    /// What the process this one replaced handed over and startup has not used yet.
    inherited: Inherited,
    /// To the process this one replaces, until its sessions are here.
    predecessor: Option<Channel>,
    config: Config,
    upstreams: Arc<Upstreams>,
    dp: Arc<DataPath>,
    listeners: HashMap<(Protocol, SocketAddr), Listener>,
    draining_udp: HashMap<SocketAddr, DrainingUdp>,
    discovery: Discovery,
    health: HealthChecks,
    xdp: Option<Arc<Mutex<XdpFilter>>>,
    registry: Arc<Registry>,
    admin: Option<AdminServer>,
}

/// Starts (or, after an upgrade that did not happen, restarts) a UDP listener's tasks:
/// its sessions' reply tasks and its receive loop, whose handle it returns.
fn serve_udp(
    dp: &Arc<DataPath>,
    ctx: &SharedCtx,
    socket: &Arc<UdpSocket>,
    sessions: &udp::Sessions,
    pause: &CancellationToken,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    udp::resume(&ctx.load_full(), dp, socket, sessions, pause);
    tokio::spawn(udp::serve(
        Arc::clone(socket),
        Arc::clone(sessions),
        Arc::clone(ctx),
        Arc::clone(dp),
        stop.clone(),
        pause.clone(),
    ))
}

/// Loads the kernel path if any TCP server block may use it.
fn load_splicer(config: &Config) -> anyhow::Result<Option<Arc<Splicer>>> {
    let wants = |m: SpliceMode| {
        config
            .servers
            .iter()
            .any(|s| s.protocol == Protocol::Tcp && s.splice == m)
    };
    if !wants(SpliceMode::Auto) && !wants(SpliceMode::Required) {
        return Ok(None);
    }
    match Splicer::load(config.global.max_connections) {
        Ok(s) => {
            info!("kernel splice path loaded");
            Ok(Some(Arc::new(s)))
        }
        Err(e) if wants(SpliceMode::Required) => {
            Err(e.context("splice = \"required\" but the kernel path cannot be loaded"))
        }
        Err(e) => {
            warn!(reason = %format!("{e:#}"), "kernel splice path unavailable; all TCP sessions use the userspace copy path");
            Ok(None)
        }
    }
}

/// A port below 1024 refused for lack of a capability says which one.
fn bind_error(e: std::io::Error, addr: SocketAddr) -> anyhow::Error {
    let privileged = addr.port() < 1024 && e.kind() == std::io::ErrorKind::PermissionDenied;
    let e = anyhow::Error::from(e);
    if privileged {
        e.context(format!(
            "ports below 1024 need {}",
            crate::capabilities::LOW_PORTS
        ))
    } else {
        e
    }
}

/// The TCP listener on `addr`: the one inherited from the predecessor, else a new one.
/// Either way the sockets it accepts have TCP_NODELAY, as nginx's stream module sets
/// on both sides: Linux copies a listener's options to the sockets it accepts, so set
/// here once it saves every session a setsockopt call (and a run of the kernel path's
/// setsockopt hook). An inherited listener gets it too: an older binary did not set it.
fn tcp_listener(addr: SocketAddr, inherited: Option<OwnedFd>) -> anyhow::Result<TcpListener> {
    let listener = match inherited {
        Some(fd) => crate::upgrade::tcp_listener(fd)?,
        None => {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr).map_err(|e| bind_error(e, addr))?;
            socket.listen(LISTEN_BACKLOG)?
        }
    };
    socket2::SockRef::from(&listener)
        .set_tcp_nodelay(true)
        .with_context(|| format!("setting TCP_NODELAY on the listener {addr}"))?;
    Ok(listener)
}

/// Loads `path` as `l4lb check` and a reload judge it: the file itself, then every
/// upsync source built (not started). One message per error.
pub fn load_checked(path: &Path) -> Result<Config, Vec<String>> {
    let config = config::load(path).map_err(|e| e.each().collect::<Vec<_>>())?;
    crate::discovery::check(&config).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect::<Vec<_>>()
    })?;
    Ok(config)
}

impl Daemon {
    /// Starts serving `config`. With `predecessor`, this process is the new binary of
    /// an upgrade: it takes over the listeners and state of the running one.
    pub async fn start(
        config_path: &Path,
        config: Config,
        access_log: Arc<AccessSink>,
        exe: Exe,
        predecessor: Option<OwnedFd>,
    ) -> anyhow::Result<Daemon> {
        let mut splicer = load_splicer(&config)?;
        let (inherited, predecessor) = match predecessor {
            Some(fd) => {
                let mut channel = Channel::new(fd).context("handover channel")?;
                let identity = splicer.as_ref().map(|s| s.identity().to_string());
                let mut inherited = Inherited::receive(&mut channel, identity).await?;
                if let Some(shared) = inherited.kernel.take() {
                    splicer = upgrade::share_kernel(&channel, splicer, shared, &config).await?;
                }
                (inherited, Some(channel))
            }
            None => (Inherited::default(), None),
        };
        let xdp = match &config.global.xdp_interface {
            Some(interface) => {
                let filter = XdpFilter::attach(interface, &config.servers)?;
                info!(%interface, "XDP access filter attached");
                Some(Arc::new(Mutex::new(filter)))
            }
            None => None,
        };
        let dp = Arc::new(DataPath {
            splicer,
            conn_limit: Arc::new(Semaphore::new(config.global.max_connections)),
            sessions: TaskTracker::new(),
            shutdown: Alarm::default(),
            accepting: Alarm::default(),
            access_log,
            handover: Handover::default(),
        });
        let upstreams = Arc::new(Upstreams::default());
        upstreams.apply(&config.upstreams);
        upstreams.restore(&inherited.upstreams);
        // Sources first: a strong_dependency source that does not answer stops the start
        // before any listener opens.
        let mut discovery = Discovery::default();
        let handed = inherited
            .upstreams
            .iter()
            .filter_map(|u| Some((u.name.clone(), u.position.clone()?)))
            .collect();
        discovery.start(&upstreams, &handed).await?;
        let mut health = HealthChecks::default();
        health.reconcile(&upstreams);
        let registry = Arc::new(crate::metrics::registry(
            Arc::clone(&upstreams),
            discovery.board(),
            dp.splicer.clone(),
            xdp.clone(),
        ));
        let mut inherited = inherited;
        let admin = match &config.admin {
            Some(cfg) => Some(
                AdminServer::start(
                    cfg,
                    Arc::clone(&upstreams),
                    discovery.board(),
                    Arc::clone(&registry),
                    inherited.admin.remove(&cfg.listen),
                )
                .await?,
            ),
            None => None,
        };
        let mut daemon = Daemon {
            config_path: config_path.to_path_buf(),
            exe,
            inherited,
            predecessor,
            config: config.clone(),
            upstreams,
            dp,
            listeners: HashMap::new(),
            draining_udp: HashMap::new(),
            discovery,
            health,
            xdp,
            registry,
            admin,
        };
        for server in &config.servers {
            daemon.open_listener(server, None).await.with_context(|| {
                format!("cannot listen on {} ({:?})", server.listen, server.protocol)
            })?;
        }
        // Whatever the new configuration does not listen on closes with the old process.
        daemon.inherited.listeners.clear();
        daemon.dp.accepting.raise();
        if let Some(admin) = &daemon.admin {
            admin.freeze(false);
        }
        let gone = daemon
            .inherited
            .udp
            .drain()
            .flat_map(|(_, sessions)| sessions);
        let why = "its listener is not in this configuration";
        let gone: Vec<_> = gone.map(|(saved, _)| (saved, why.to_string())).collect();
        daemon.inherited.udp_not_taken.extend(gone);
        daemon.inherited.admin.clear();
        match daemon.predecessor.as_mut() {
            Some(channel) => channel
                .send(&Msg::Serving, &[])
                .await
                .context("cannot tell the running process that this one serves")?,
            None => daemon.write_pid_file(),
        }
        for (saved, why) in std::mem::take(&mut daemon.inherited.udp_not_taken) {
            udp::not_taken(&daemon.dp, &saved, &why);
        }
        info!(
            config = %config_path.display(),
            listeners = daemon.listeners.len(),
            upstreams = config.upstreams.len(),
            "l4lb started"
        );
        Ok(daemon)
    }

    /// A listener's settings; `previous` carries what outlives a reload (open
    /// sessions per client for `limit_conn`, metric handles).
    fn ctx_for(&self, server: &ServerConfig, previous: Option<&ListenerCtx>) -> ListenerCtx {
        ListenerCtx {
            metrics: previous.map_or_else(
                || ListenerMetrics::new(&server.listen.to_string(), server.protocol.as_str()),
                |p| p.metrics.clone(),
            ),
            conn_limits: previous.map_or_else(Arc::default, |p| Arc::clone(&p.conn_limits)),
            server: server.clone(),
            upstream: server
                .proxy_pass
                .as_deref()
                .and_then(|n| self.upstreams.get(n)),
        }
    }

    /// Opens a listener for `server`, on the socket the previous process handed over,
    /// else on `bound` (the replaced listener's), else on a removed UDP listener's that
    /// still drains, else on a new one.
    async fn open_listener(
        &mut self,
        server: &ServerConfig,
        bound: Option<OwnedFd>,
    ) -> anyhow::Result<()> {
        let ctx: SharedCtx = Arc::new(ArcSwap::from_pointee(self.ctx_for(server, None)));
        let stop = CancellationToken::new();
        let inherited = self.inherited.listeners.remove(&server.key()).or(bound);
        let (socket, udp) = match server.protocol {
            Protocol::Tcp => {
                let listener = tcp_listener(server.listen, inherited)?;
                let dup = listener.as_fd().try_clone_to_owned()?;
                if server.upstream_show {
                    tokio::spawn(crate::admin::serve_upstream_show(
                        listener,
                        Arc::clone(&ctx),
                        Arc::clone(&self.upstreams),
                        stop.clone(),
                    ));
                } else {
                    tokio::spawn(tcp::serve(
                        listener,
                        Arc::clone(&ctx),
                        Arc::clone(&self.dp),
                        stop.clone(),
                    ));
                }
                (dup, None)
            }
            Protocol::Udp => {
                let (socket, sessions) = match inherited {
                    Some(fd) => (
                        Arc::new(crate::upgrade::udp_socket(fd)?),
                        udp::Sessions::default(),
                    ),
                    None => match self.take_back_udp(server.listen).await {
                        Some((socket, sessions, old)) => {
                            let next = self.ctx_for(server, Some(&old.load()));
                            ctx.store(Arc::new(next));
                            (socket, sessions)
                        }
                        None => (
                            Arc::new(
                                UdpSocket::bind(server.listen)
                                    .await
                                    .map_err(|e| bind_error(e, server.listen))?,
                            ),
                            udp::Sessions::default(),
                        ),
                    },
                };
                let dup = socket.as_fd().try_clone_to_owned()?;
                let current = ctx.load_full();
                for (saved, fd) in self
                    .inherited
                    .udp
                    .remove(&server.listen)
                    .unwrap_or_default()
                {
                    if let Err(why) = udp::adopt(&current, &self.dp, &sessions, &saved, fd) {
                        self.inherited.udp_not_taken.push((saved, why));
                    }
                }
                let pause = CancellationToken::new();
                let receiver = serve_udp(&self.dp, &ctx, &socket, &sessions, &pause, &stop);
                let udp = UdpListener {
                    socket,
                    sessions,
                    pause,
                    receiver,
                };
                (dup, Some(udp))
            }
        };
        self.listeners.insert(
            server.key(),
            Listener {
                ctx,
                stop,
                socket,
                udp,
            },
        );
        Ok(())
    }

    /// Stops a listener accepting. A UDP listener serves its open sessions until they
    /// end (kept in `draining_udp` meanwhile); a TCP listener's socket is returned, for
    /// a listener replacing it on the same address: the task accepting on it closes
    /// its own descriptor only once it sees the stop, and until then the address
    /// cannot be bound again.
    fn retire(&mut self, key: (Protocol, SocketAddr), l: Listener) -> Option<OwnedFd> {
        l.stop.cancel();
        match l.udp {
            Some(udp) => {
                self.draining_udp.retain(|_, d| d.socket.strong_count() > 0);
                self.draining_udp.insert(
                    key.1,
                    DrainingUdp {
                        ctx: l.ctx,
                        socket: Arc::downgrade(&udp.socket),
                        sessions: udp.sessions,
                        pause: udp.pause,
                        receiver: udp.receiver,
                    },
                );
                None
            }
            None => Some(l.socket),
        }
    }

    /// The socket and sessions of a removed UDP listener on `listen` that still drains,
    /// its tasks stopped: its sessions go on with the listener added back.
    async fn take_back_udp(
        &mut self,
        listen: SocketAddr,
    ) -> Option<(Arc<UdpSocket>, udp::Sessions, SharedCtx)> {
        let draining = self.draining_udp.remove(&listen)?;
        let socket = draining.socket.upgrade()?;
        draining.pause.cancel();
        // Ended before its sessions are taken back: it marks them as winding down when
        // it sees its stop, and that must not come after `rejoin`.
        if let Err(e) = draining.receiver.await {
            warn!(%listen, error = %e, "the draining UDP listener's task failed");
        }
        let sessions = udp::rejoin(&draining.sessions);
        info!(%listen, sessions, "UDP listener added back while it drained: its open sessions go on with it");
        Some((socket, draining.sessions, draining.ctx))
    }

    /// Runs until SIGTERM or SIGINT, reloading on SIGHUP and reopening the access log
    /// file on SIGUSR1 (whose default action would end the process).
    pub async fn run(mut self, early: EarlySignals) -> anyhow::Result<()> {
        let mut sig = Signals {
            hup: early.hup,
            usr1: early.usr1,
            usr2: early.usr2,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        };
        if let Some(channel) = self.predecessor.take() {
            self.take_sessions(channel).await;
            // A SIGUSR2 that reached this process while it started was the one that
            // started it, sent to the whole unit (`systemctl kill` without
            // --kill-whom=main): acted on, it would start a second upgrade at once.
            if tokio::time::timeout(std::time::Duration::ZERO, sig.usr2.recv())
                .await
                .is_ok()
            {
                info!("SIGUSR2 received while taking over ignored: it asked for this upgrade");
            }
        }
        notify::ready(&self.status());
        let ending = loop {
            tokio::select! {
                _ = sig.hup.recv() => self.reload().await,
                _ = sig.usr2.recv() => {
                    if let Some(ending) = self.upgrade_on_signal(&mut sig).await {
                        break ending;
                    }
                }
                _ = sig.usr1.recv() => self.reopen_logs(),
                _ = sig.term.recv() => break Ending::Stop,
                _ = sig.int.recv() => break Ending::Stop,
            }
        };
        // After an upgrade the service goes on in the new process, which the service
        // manager now follows (NotifyAccess=all would let this stop it); a stop asked
        // for during the upgrade went to the new process too.
        if matches!(ending, Ending::Stop) {
            notify::stopping();
        }
        // Sessions the new process did not take stay here until they end; only a stop
        // signal (also one sent during the upgrade) puts them under the grace period.
        let stop_signal = async {
            tokio::select! {
                _ = sig.term.recv() => {}
                _ = sig.int.recv() => {}
            }
        };
        self.drain(
            matches!(ending, Ending::Replaced).then_some(stop_signal),
            &mut sig.usr1,
        )
        .await;
        Ok(())
    }

    fn reopen_logs(&self) {
        match self.dp.access_log.reopen() {
            Ok(()) => info!("log files reopened"),
            Err(e) => error!(error = %e, "cannot reopen the access log; writing to the old file"),
        }
    }

    /// One line for `systemctl status`.
    fn status(&self) -> String {
        format!(
            "{} listeners, {} upstreams",
            self.listeners.len(),
            self.config.upstreams.len()
        )
    }

    /// Re-reads the file and applies the difference; on any error keeps running as is.
    /// The service manager hears RELOADING=1 first and READY=1 when done either way.
    async fn reload(&mut self) {
        notify::reloading();
        self.apply_reload().await;
        notify::ready(&self.status());
    }

    async fn apply_reload(&mut self) {
        info!(config = %self.config_path.display(), "reloading configuration");
        // Off the runtime: loading reads files and resolves server names.
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || load_checked(&path)).await;
        let config = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(errors)) => {
                for e in errors {
                    error!("{e}");
                }
                error!("reload rejected; the running configuration stays in force");
                return;
            }
            Err(e) => {
                error!(error = %e, "reload rejected; the running configuration stays in force");
                return;
            }
        };
        let (new, old) = (&config.global, &self.config.global);
        if new.max_connections != old.max_connections
            || new.worker_threads != old.worker_threads
            || new.log_level != old.log_level
            || new.log_format != old.log_format
            || new.access_log_format != old.access_log_format
            || new.splice != old.splice
            || new.xdp_interface != old.xdp_interface
        {
            warn!("changes to global max_connections, worker_threads, log_level, log_format, access_log_format, splice or xdp_interface take effect at restart");
        }
        if let Some(xdp) = &self.xdp {
            let mut filter = xdp.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = filter.update(&config.servers) {
                error!(error = %format!("{e:#}"), "XDP access filter not updated; userspace access rules apply");
            }
        }
        if let Err(e) = self.dp.access_log.set(&new.access_log) {
            error!(error = %e, "access log unchanged");
        }
        self.upstreams.apply(&config.upstreams);
        self.discovery.reconcile(&self.upstreams).await;
        self.health.reconcile(&self.upstreams);
        self.reload_admin(&config).await;

        let wanted: HashMap<_, _> = config.servers.iter().map(|s| (s.key(), s)).collect();
        let removed: Vec<_> = self
            .listeners
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in removed {
            if let Some(l) = self.listeners.remove(&key) {
                self.retire(key, l);
                info!(listen = %key.1, protocol = ?key.0, "listener closed; its sessions continue");
            }
        }
        let mut failed = 0;
        for server in &config.servers {
            match self.listeners.get(&server.key()) {
                Some(l) if l.ctx.load().server.upstream_show == server.upstream_show => {
                    let next = self.ctx_for(server, Some(&l.ctx.load()));
                    l.ctx.store(Arc::new(next));
                }
                _ => {
                    let bound = self
                        .listeners
                        .remove(&server.key())
                        .and_then(|old| self.retire(server.key(), old));
                    if let Err(e) = self.open_listener(server, bound).await {
                        failed += 1;
                        error!(listen = %server.listen, error = %e, "cannot open listener");
                    }
                }
            }
        }
        self.config = config;
        info!(
            listeners = self.listeners.len(),
            failed, "configuration reloaded"
        );
    }

    /// Best effort: a new `[admin] listen` that cannot be bound leaves the old one open.
    async fn reload_admin(&mut self, config: &Config) {
        self.admin = match (self.admin.take(), &config.admin) {
            (Some(admin), cfg) => admin.reload(cfg.as_ref()).await,
            (None, Some(cfg)) => {
                let started = AdminServer::start(
                    cfg,
                    Arc::clone(&self.upstreams),
                    self.discovery.board(),
                    Arc::clone(&self.registry),
                    None,
                )
                .await;
                match started {
                    Ok(a) => Some(a),
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "admin API not started");
                        None
                    }
                }
            }
            (None, None) => None,
        };
    }

    /// Stops accepting and lets the sessions end: within `worker_shutdown_timeout`, or
    /// after a binary upgrade (`until_stopped`) at their own pace until that resolves.
    /// Stops accepting and lets the sessions end: at their own pace while `until_stopped`
    /// is pending (a replaced process), then within the grace period. SIGUSR1 still
    /// reopens the access log meanwhile: a replaced process may serve for days.
    async fn drain(mut self, until_stopped: Option<impl Future<Output = ()>>, usr1: &mut Signal) {
        let grace = self.config.global.worker_shutdown_timeout;
        self.discovery.stop_all();
        self.health.stop_all();
        if let Some(admin) = &self.admin {
            admin.stop();
        }
        // Dropped, not only stopped: the duplicate each keeps for an upgrade would
        // leave the socket listening.
        for (_, l) in self.listeners.drain() {
            l.stop.cancel();
        }
        if let Some(path) = &self.config.global.pid_file {
            crate::upgrade::remove_pid_file(path);
        }
        self.dp.sessions.close();
        if let Some(stopped) = until_stopped {
            info!(
                sessions = self.dp.sessions.len(),
                "replaced: serving the sessions that stayed here until they end"
            );
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    () = self.dp.sessions.wait() => {
                        info!("stopped");
                        return;
                    }
                    () = &mut stopped => break,
                    _ = usr1.recv() => self.reopen_logs(),
                }
            }
        }
        info!(sessions = self.dp.sessions.len(), grace = ?grace, "stopping: no new connections, draining sessions");
        let deadline = tokio::time::Instant::now() + grace;
        let in_time = loop {
            tokio::select! {
                () = self.dp.sessions.wait() => break true,
                () = tokio::time::sleep_until(deadline) => break false,
                _ = usr1.recv() => self.reopen_logs(),
            }
        };
        if !in_time {
            warn!(
                sessions = self.dp.sessions.len(),
                "grace period over; closing remaining sessions"
            );
            self.dp.shutdown.raise();
            self.dp.wake_dormant();
            self.dp.sessions.wait().await;
        }
        info!("stopped");
    }
}

/// SIGHUP, SIGUSR1 and SIGUSR2, caught before the daemon starts: their default action
/// ends the process, and a reload, a log rotation or an upgrade request may come while
/// it starts (DNS, the kernel path, discovery with strong_dependency). One that came
/// then is acted on once it serves. SIGTERM and SIGINT keep their default until then:
/// a start has nothing to drain.
pub struct EarlySignals {
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl EarlySignals {
    pub fn catch() -> std::io::Result<EarlySignals> {
        Ok(EarlySignals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// The signals the daemon acts on, also while a binary upgrade runs.
struct Signals {
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
    term: Signal,
    int: Signal,
}

/// How the serving loop ended.
enum Ending {
    /// A binary upgrade replaced this process: what stayed here runs to its end.
    Replaced,
    /// A stop signal (also one that came during an upgrade): what is left ends within
    /// `worker_shutdown_timeout`.
    Stop,
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::tcp_listener;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_on_new_and_inherited_listeners() {
        let fresh = tcp_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plain_addr = plain.local_addr().unwrap();
        let inherited = tcp_listener(plain_addr, Some(OwnedFd::from(plain))).unwrap();
        for listener in [fresh, inherited] {
            let addr = listener.local_addr().unwrap();
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(
                accepted.nodelay().unwrap(),
                "accepted on {addr} without TCP_NODELAY"
            );
        }
    }
}
