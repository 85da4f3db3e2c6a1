//! The daemon's side of a binary upgrade (see `crate::upgrade` for the protocol): what
//! the old process sends and the new one takes over.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tracing::{error, info, warn};

use super::{Daemon, Ending, Signals};

use crate::config::Protocol;
use crate::discovery::Position;
use crate::proxy::tcp;
use crate::runtime::Parked;
use crate::splice::{Shared, Splicer};
use crate::upgrade::wire::{self, Channel, Msg};
use crate::upgrade::{self as up, Spawned};
use crate::upstream::UpstreamState;

/// What the old process sent before the new one opened its listeners.
#[derive(Default)]
pub(super) struct Inherited {
    pub upstreams: Vec<UpstreamState>,
    pub listeners: HashMap<(Protocol, SocketAddr), OwnedFd>,
    pub admin: HashMap<SocketAddr, OwnedFd>,
    pub udp: HashMap<SocketAddr, Vec<(wire::UdpSession, OwnedFd)>>,
    /// UDP sessions this process could not take, and why: they end (and are logged)
    /// only once it serves, since the old process resumes them if it fails to start.
    pub udp_not_taken: Vec<(wire::UdpSession, String)>,
    /// The running process's kernel path, to share (same object and settings).
    pub kernel: Option<Shared>,
}

/// The new process's answer to the running kernel path it was offered: it shares it
/// (dropping the instance it loaded, before anything used it), or keeps its own and
/// says why, in which case spliced sessions move as they did before sharing existed.
pub(super) async fn share_kernel(
    channel: &Channel,
    own: Option<Arc<Splicer>>,
    shared: Shared,
    config: &crate::config::Config,
) -> anyhow::Result<Option<Arc<Splicer>>> {
    let (splicer, why) = match Splicer::adopt(shared, config.global.max_connections) {
        Ok(s) => {
            info!("sharing the running process's kernel path: spliced sessions move without leaving the kernel");
            (Some(Arc::new(s)), None)
        }
        Err(e) => {
            let why = format!("{e:#}");
            warn!(error = %why, "cannot share the running process's kernel path; spliced sessions pause while they move");
            (own, Some(why))
        }
    };
    channel.send(&Msg::KernelShared { why }, &[]).await?;
    Ok(splicer)
}

/// One descriptor, or an error naming the message that lacked it.
fn one_fd(fds: Vec<OwnedFd>, what: &str) -> anyhow::Result<OwnedFd> {
    let n = fds.len();
    match <[OwnedFd; 1]>::try_from(fds) {
        Ok([fd]) => Ok(fd),
        Err(_) => bail!("handover message {what} came with {n} descriptors, not 1"),
    }
}

impl Inherited {
    /// The new process's first steps: hello (its configuration checked out and the
    /// kernel path loaded), then the state and listeners.
    pub async fn receive(
        channel: &mut Channel,
        kernel: Option<String>,
    ) -> anyhow::Result<Inherited> {
        let hello = Msg::Hello {
            version: wire::VERSION,
            pid: std::process::id(),
            kernel,
        };
        channel.send(&hello, &[]).await?;
        let mut got = Inherited::default();
        loop {
            let (msg, fds) = channel.recv().await?;
            match msg {
                Msg::Refused { why } => bail!("the running process refused the upgrade: {why}"),
                Msg::Upstream(state) => got.upstreams.push(state),
                Msg::Listener { protocol, listen } => {
                    let fd = one_fd(fds, "listener")?;
                    got.listeners.insert((protocol, listen), fd);
                }
                Msg::Admin { listen } => {
                    got.admin.insert(listen, one_fd(fds, "admin")?);
                }
                Msg::Kernel { .. } => {
                    got.kernel = Some(Shared::from_fds(fds).context("handover message kernel")?);
                }
                Msg::Udp(session) => {
                    let fd = one_fd(fds, "udp session")?;
                    got.udp
                        .entry(session.listen)
                        .or_default()
                        .push((session, fd));
                }
                Msg::ListenersDone => break,
                other => bail!("unexpected handover message before the listeners: {other:?}"),
            }
        }
        info!(
            listeners = got.listeners.len(),
            upstreams = got.upstreams.len(),
            udp_sessions = got.udp.values().map(Vec::len).sum::<usize>(),
            "taking over from the running process"
        );
        Ok(got)
    }
}

impl Daemon {
    pub(super) fn write_pid_file(&self) {
        if let Some(path) = &self.config.global.pid_file {
            if let Err(e) = up::write_pid_file(path, std::process::id()) {
                error!(path = %path.display(), error = %e, "cannot write the pid file");
            }
        }
    }

    /// The new process: takes each TCP session the old one sends until it is done,
    /// then writes the pid file and tells the old process and the service manager.
    pub(super) async fn take_sessions(&mut self, channel: Channel) {
        let began = Instant::now();
        let (mut taken, mut refused) = (0u64, 0u64);
        let result: anyhow::Result<()> = async {
            loop {
                let (msg, fds) = channel.recv().await?;
                match msg {
                    Msg::Tcp(session) => match self.adopt_tcp(session, fds) {
                        Ok(pending) => {
                            // Confirmed first: once the old process reads this, it
                            // lets go; until then it still owns the session.
                            if let Err(e) = channel.send(&Msg::Adopted, &[]).await {
                                pending.abandon();
                                return Err(e.into());
                            }
                            pending.start();
                            taken += 1;
                        }
                        Err(why) => {
                            refused += 1;
                            channel.send(&Msg::NotAdopted { why }, &[]).await?;
                        }
                    },
                    Msg::Ring => {
                        if let Some(s) = &self.dp.splicer {
                            s.take_ring()?;
                        }
                    }
                    Msg::Done => return Ok(()),
                    other => bail!("unexpected handover message among sessions: {other:?}"),
                }
            }
        }
        .await;
        if let Some(s) = &self.dp.splicer {
            if !s.reads_ring() {
                // The old process is gone or said it is done: nobody reads the ring.
                if let Err(e) = s.take_ring() {
                    error!(error = %format!("{e:#}"), "cannot read the shared kernel path's events; new sessions stay on the copy path");
                }
            }
            s.sessions_arrived();
        }
        // The old process hands over and drains once told this one serves, whatever
        // happens to the sessions after: this process is the main one from here, also
        // when the handover broke (else the service manager, seeing the old main pid
        // exit, stops the unit and this process with it). Claimed before `Started`,
        // after which the old process may exit at once.
        self.write_pid_file();
        crate::notify::main_pid(std::process::id());
        match result {
            Ok(()) => {
                let started = Msg::Started {
                    pid: std::process::id(),
                };
                if let Err(e) = channel.send(&started, &[]).await {
                    warn!(error = %e, "cannot tell the old process that this one runs");
                }
                info!(
                    sessions = taken,
                    refused,
                    took_ms = began.elapsed().as_millis() as u64,
                    "upgrade complete: this process runs"
                );
            }
            Err(e) => error!(
                error = %format!("{e:#}"),
                sessions = taken,
                "the handover broke; this process serves the listeners and the sessions it took, the old one keeps the rest"
            ),
        }
    }

    fn adopt_tcp(
        &self,
        session: wire::TcpSession,
        fds: Vec<OwnedFd>,
    ) -> Result<tcp::Pending, String> {
        let [client, backend] = <[OwnedFd; 2]>::try_from(fds)
            .map_err(|fds| format!("came with {} descriptors, not 2", fds.len()))?;
        let (client, backend) = (
            std::net::TcpStream::from(client),
            std::net::TcpStream::from(backend),
        );
        let listener = self
            .listeners
            .get(&(Protocol::Tcp, session.listen))
            .ok_or_else(|| format!("no TCP listener on {} here", session.listen))?;
        let adopted = tcp::Adopted {
            session,
            client,
            backend,
        };
        tcp::adopt(listener.ctx.load_full(), &self.dp, adopted)
    }

    /// Runs an upgrade on SIGUSR2, refusing a second one meanwhile. A reload, log
    /// reopening or stop asked for meanwhile is done by whichever process runs
    /// afterwards: passed on to the new one, or done here when the upgrade failed.
    /// `None`: the upgrade failed and this process serves on.
    pub(super) async fn upgrade_on_signal(&mut self, sig: &mut Signals) -> Option<Ending> {
        let (mut reload, mut reopen, mut stop) = (false, false, false);
        let outcome = {
            let upgrading = self.upgrade();
            tokio::pin!(upgrading);
            loop {
                tokio::select! {
                    o = &mut upgrading => break o,
                    _ = sig.usr2.recv() => warn!("upgrade refused: one is already running"),
                    _ = sig.hup.recv() => reload = true,
                    _ = sig.usr1.recv() => reopen = true,
                    _ = sig.term.recv() => stop = true,
                    _ = sig.int.recv() => stop = true,
                }
            }
        };
        if let Some(path) = &self.config.global.pid_file {
            match &outcome {
                Upgrade::Replaced { pid } => up::write_status(path, &format!("ok {pid}")),
                Upgrade::Kept(e) => up::write_status(path, &format!("failed: {e:#}")),
            }
        }
        match outcome {
            Upgrade::Replaced { pid } => {
                use nix::sys::signal::Signal as Sig;
                let target = nix::unistd::Pid::from_raw(pid as i32);
                // It may have read the file, or opened the log, before they were asked for.
                for (asked, signal, what) in [
                    (reload, Sig::SIGHUP, "reload"),
                    (reopen, Sig::SIGUSR1, "log reopening"),
                    (stop, Sig::SIGTERM, "stop"),
                ] {
                    if !asked {
                        continue;
                    }
                    info!(
                        pid,
                        what, "passing what was asked during the upgrade to the new process"
                    );
                    if let Err(e) = nix::sys::signal::kill(target, signal) {
                        error!(pid, what, error = %e, "cannot pass it on; signal the new process");
                    }
                }
                // This process writes the lines of the sessions that stayed.
                if reopen {
                    self.reopen_logs();
                }
                Some(if stop { Ending::Stop } else { Ending::Replaced })
            }
            Upgrade::Kept(e) => {
                error!(error = %format!("{e:#}"), "upgrade failed; this process keeps serving everything");
                if reload {
                    self.reload().await;
                }
                if reopen {
                    self.reopen_logs();
                }
                stop.then_some(Ending::Stop)
            }
        }
    }

    /// The old process's side of an upgrade.
    async fn upgrade(&mut self) -> Upgrade {
        info!(binary = %self.exe.path.display(), "upgrade: starting the new binary");
        let began = Instant::now();
        let mut spawned = match Spawned::start(&self.exe) {
            Ok(s) => s,
            Err(e) => return Upgrade::Kept(e),
        };
        // Before the sets are sent: a change after it would be answered and lost.
        self.freeze_admin(true);
        let before_serving = async {
            let (pid, kernel) = spawned.hello().await?;
            info!(pid, "upgrade: the new process checked its configuration");
            self.xdp_filter(false)?;
            let shared = self.send_listeners(&mut spawned, kernel).await?;
            Ok::<(u32, bool), anyhow::Error>((pid, shared))
        }
        .await;
        let (pid, shared) = match before_serving {
            Ok(got) => got,
            Err(e) => {
                spawned.abandon().await;
                self.freeze_admin(false);
                self.resume_udp();
                if let Err(e) = self.xdp_filter(true) {
                    error!(error = %format!("{e:#}"), "XDP access filter not attached again; userspace access rules apply");
                }
                return Upgrade::Kept(e);
            }
        };
        // The new process serves every listener: from here it is the one that runs.
        for l in self.listeners.values() {
            l.stop.cancel();
        }
        if let Some(admin) = &self.admin {
            admin.stop();
        }
        self.discovery.stop_all();
        self.health.stop_all();
        if shared {
            self.pass_ring(&spawned).await;
        }
        let (moved, kept, broken) = self.send_sessions(&spawned).await;
        let Moved {
            all: moved,
            in_kernel,
        } = moved;
        let finished = match broken {
            Some(e) => Err(e),
            None => up::finish(&mut spawned).await,
        };
        match finished {
            Ok(_) => info!(
                pid,
                sessions = moved,
                in_kernel,
                kept,
                took_ms = began.elapsed().as_millis() as u64,
                "upgrade: handed over"
            ),
            Err(e) => error!(
                error = %format!("{e:#}"),
                sessions = moved,
                kept,
                "upgrade: the handover broke after the new process started serving; this process keeps the sessions it still has and exits when they end"
            ),
        }
        Upgrade::Replaced { pid }
    }

    fn freeze_admin(&self, frozen: bool) {
        if let Some(admin) = &self.admin {
            admin.freeze(frozen);
        }
    }

    /// Detaches (or puts back) the XDP access filter: an interface holds one XDP
    /// program, and the new process attaches its own as it starts its listeners.
    fn xdp_filter(&self, attached: bool) -> anyhow::Result<()> {
        let Some(xdp) = &self.xdp else {
            return Ok(());
        };
        let mut filter = xdp.lock().unwrap_or_else(|p| p.into_inner());
        if attached {
            filter.reattach()
        } else {
            info!("upgrade: XDP access filter detached for the new process; userspace access rules apply meanwhile");
            filter.detach()
        }
    }

    /// Sends the state and listeners; returns whether the new process shares the
    /// kernel path (it loaded the same one, `kernel`, and took its descriptors).
    async fn send_listeners(
        &self,
        spawned: &mut Spawned,
        kernel: Option<String>,
    ) -> anyhow::Result<bool> {
        let ch = &spawned.channel;
        // Positions first: discovery records one after publishing its set, so a
        // position read before the sets is never ahead of them.
        let positions: HashMap<String, Option<Position>> = self
            .upstreams
            .all()
            .keys()
            .map(|name| (name.clone(), self.discovery.position(name)))
            .collect();
        for mut state in self.upstreams.save() {
            state.position = positions.get(&state.name).cloned().flatten();
            ch.send(&Msg::Upstream(state), &[]).await?;
        }
        let splicer = self
            .dp
            .splicer
            .as_ref()
            .filter(|s| s.reads_ring() && kernel.as_deref() == Some(s.identity()));
        let offered = match splicer {
            Some(s) => {
                let shared = s
                    .shared()
                    .context("cannot duplicate the kernel path's descriptors")?;
                let fds = shared.fds().map(|fd| fd.as_raw_fd());
                let msg = Msg::Kernel {
                    identity: s.identity().to_string(),
                };
                ch.send(&msg, &fds).await?;
                true
            }
            None => {
                if kernel.is_some() && self.dp.splicer.is_some() {
                    info!("upgrade: the new binary's kernel path differs from this one's; spliced sessions pause while they move");
                }
                false
            }
        };
        // UDP listeners stop reading first: a datagram waits in the socket for the new
        // process rather than opening a session that would then exist twice.
        for l in self.listeners.values() {
            if let Some(udp) = &l.udp {
                udp.pause.cancel();
            }
        }
        for (&(protocol, listen), l) in &self.listeners {
            let listener = Msg::Listener { protocol, listen };
            ch.send(&listener, &[l.socket.as_raw_fd()]).await?;
            if let Some(udp) = &l.udp {
                for (session, fd) in crate::proxy::udp::export(listen, &udp.sessions) {
                    let fd = fd.context("cannot duplicate a UDP session's socket")?;
                    ch.send(&Msg::Udp(session), &[fd.as_raw_fd()]).await?;
                }
            }
        }
        if let Some(admin) = &self.admin {
            let msg = Msg::Admin {
                listen: admin.listen,
            };
            ch.send(&msg, &[admin.socket.as_raw_fd()]).await?;
        }
        ch.send(&Msg::ListenersDone, &[]).await?;
        let mut shared = false;
        if offered {
            match spawned
                .recv(up::START_TIMEOUT, "taking the kernel path")
                .await?
                .0
            {
                Msg::KernelShared { why: None } => shared = true,
                Msg::KernelShared { why: Some(why) } => {
                    warn!(reason = %why, "upgrade: the new process does not share the kernel path; spliced sessions pause while they move");
                }
                other => {
                    bail!("expected the new process's answer on the kernel path, got {other:?}")
                }
            }
        }
        match spawned
            .recv(up::START_TIMEOUT, "opening its listeners")
            .await?
            .0
        {
            Msg::Serving => Ok(shared),
            other => bail!("expected the new process to serve, got {other:?}"),
        }
    }

    /// The new process serves and shares the kernel path: this process stops reading
    /// its event ring and tells it to read from here on. Its sessions then move
    /// without leaving the kernel; those that stay here leave it for the copy path.
    async fn pass_ring(&self, spawned: &Spawned) {
        let Some(splicer) = &self.dp.splicer else {
            return;
        };
        splicer.share_with_successor();
        splicer.release_ring();
        if let Err(e) = spawned.channel.send(&Msg::Ring, &[]).await {
            // It reads the ring once the channel closes (it exits or is done).
            warn!(error = %e, "cannot tell the new process to read the kernel path's events");
        }
    }

    /// After an upgrade that did not happen: paused UDP listeners and their sessions
    /// go on here.
    fn resume_udp(&mut self) {
        let mut paused = Vec::new();
        for (key, l) in &mut self.listeners {
            if let Some(udp) = l.udp.as_mut().filter(|u| u.pause.is_cancelled()) {
                udp.pause = tokio_util::sync::CancellationToken::new();
                paused.push(*key);
            }
        }
        for key in paused {
            if let Some(l) = self.listeners.get_mut(&key) {
                if let Some(udp) = l.udp.as_mut() {
                    udp.receiver = super::serve_udp(
                        &self.dp,
                        &l.ctx,
                        &udp.socket,
                        &udp.sessions,
                        &udp.pause,
                        &l.stop,
                    );
                }
            }
        }
    }

    /// Parks every TCP session at a clean point and sends it; returns how many moved
    /// (and of those, how many without leaving the kernel), how many stay here, and
    /// the error that broke the handover if one did. Sessions
    /// are sent as they park, without waiting for the answers, which come in order:
    /// until its answer the old process still holds a session's sockets.
    async fn send_sessions(&self, spawned: &Spawned) -> (Moved, u64, Option<anyhow::Error>) {
        let ch = &spawned.channel;
        let mut parked = self.dp.handover.begin();
        self.dp.wake_dormant();
        let deadline = up::sessions_deadline();
        let mut moved = Moved::default();
        let mut kept = 0u64;
        let mut broken: Option<anyhow::Error> = None;
        // No more answers can come (the channel failed, or they stopped coming): what is
        // in flight stays here. A failed send alone does not say so: answers to the
        // sessions sent before it still come, and the new process runs those.
        let mut answers_gone = false;
        let mut in_flight: VecDeque<Parked> = VecDeque::new();
        let mut refused: Vec<Parked> = Vec::new();
        let mut answer_by = tokio::time::Instant::now() + up::REPLY_TIMEOUT;
        loop {
            tokio::select! {
                p = parked.recv(), if broken.is_none() => {
                    let Some(p) = p else { continue };
                    let fds = [p.client.as_raw_fd(), p.backend.as_raw_fd()];
                    match ch.send(&Msg::Tcp(p.session.clone()), &fds).await {
                        Ok(()) => {
                            if in_flight.is_empty() {
                                answer_by = tokio::time::Instant::now() + up::REPLY_TIMEOUT;
                            }
                            in_flight.push_back(p);
                        }
                        Err(e) => {
                            refused.push(p);
                            broken = Some(e.into());
                        }
                    }
                }
                got = ch.recv(), if !in_flight.is_empty() => {
                    let answer = got
                        .map_err(anyhow::Error::from)
                        .and_then(|(msg, _)| up::session_answer(msg));
                    let Some(p) = in_flight.pop_front() else { continue };
                    answer_by = tokio::time::Instant::now() + up::REPLY_TIMEOUT;
                    match answer {
                        Ok(taken) => moved.settle(p, taken, &mut refused),
                        Err(e) => {
                            refused.push(p);
                            broken.get_or_insert(e);
                            answers_gone = true;
                        }
                    }
                }
                () = tokio::time::sleep(std::time::Duration::from_millis(2)) => {
                    let now = tokio::time::Instant::now();
                    if !in_flight.is_empty() && now >= answer_by {
                        broken.get_or_insert_with(|| {
                            anyhow::anyhow!("the new process answered no session for {:?}", up::REPLY_TIMEOUT)
                        });
                        // From here its confirmations fail (and it lets those sessions
                        // go); the ones it sent before still count.
                        if ch.shutdown_read().is_ok() {
                            let wait = std::time::Duration::from_millis(200);
                            while let Ok(Ok((msg, _))) = tokio::time::timeout(wait, ch.recv()).await {
                                let Ok(taken) = up::session_answer(msg) else { break };
                                let Some(p) = in_flight.pop_front() else { break };
                                moved.settle(p, taken, &mut refused);
                            }
                        }
                        answers_gone = true;
                    }
                    if answers_gone {
                        // Unanswered sessions stay here: the new process did not say
                        // it took them (if it did, its confirmation fails and it lets
                        // them go).
                        refused.extend(in_flight.drain(..));
                    }
                    // Sessions kept here wait in `refused`; every other one ended or
                    // moved.
                    let settled = self.dp.sessions.len() <= refused.len() + in_flight.len();
                    if in_flight.is_empty() && (settled || now >= deadline || broken.is_some()) {
                        break;
                    }
                }
            }
        }
        self.dp.handover.end();
        parked.close();
        while let Ok(p) = parked.try_recv() {
            refused.push(p);
        }
        for p in refused {
            let _ = p.back.send(Some((p.client, p.backend)));
            kept += 1;
        }
        let waiting = (self.dp.sessions.len() as u64).saturating_sub(kept);
        if waiting > 0 {
            warn!(
                sessions = waiting,
                "sessions that did not reach a clean point in time stay in this process until they end"
            );
        }
        (moved, kept + waiting, broken)
    }
}

/// Sessions a new process took.
#[derive(Default)]
struct Moved {
    all: u64,
    /// Of those, sessions that stayed in the shared kernel path's maps.
    in_kernel: u64,
}

impl Moved {
    /// Settles a session by the new process's answer: taken (our copies of its sockets
    /// close with it) or back to `refused`, given back once the handover is over (back
    /// now, it would see the handover still asked for and park again).
    fn settle(&mut self, p: Parked, taken: bool, refused: &mut Vec<Parked>) {
        if taken {
            self.in_kernel += u64::from(p.session.in_kernel.is_some());
            self.all += 1;
            let _ = p.back.send(None);
        } else {
            refused.push(p);
        }
    }
}

/// How an upgrade ended for the old process.
enum Upgrade {
    /// The new process serves the listeners; `pid` is its process id.
    Replaced { pid: u32 },
    /// Nothing moved: this process keeps serving everything.
    Kept(anyhow::Error),
}
