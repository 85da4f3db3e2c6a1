//! Readiness for service managers (systemd `Type=notify`): `READY=1` once every
//! listener is open, `RELOADING=1` .. `READY=1` around a SIGHUP reload, `STOPPING=1`
//! when the drain begins. Without `NOTIFY_SOCKET` (no service manager) each call is a
//! no-op.

use sd_notify::NotifyState;
use tracing::warn;

/// Every listener accepts; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// This process replaced the service's main process (binary upgrade); the unit needs
/// `NotifyAccess=all` for the manager to hear it from a process it did not start.
pub fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

/// A reload began. MONOTONIC_USEC is what `Type=notify-reload` (systemd 253+) matches
/// the reload by; plain `Type=notify` ignores it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => warn!(error = %e, "cannot read the monotonic clock for sd_notify"),
    }
    send(&states);
}

/// No new connections from now on; established sessions drain.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining sessions"),
    ]);
}

fn send(states: &[NotifyState]) {
    // A service manager that cannot be told is worth a log line, not a failed start:
    // it enforces its own start timeout.
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
