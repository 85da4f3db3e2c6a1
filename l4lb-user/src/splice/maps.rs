//! The program's maps as the daemon uses them: raw bpf(2) commands on their fds, so every
//! session works on them at once without a lock.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::atomic::AtomicBool;

use aya::maps::MapData;
use l4lb_ebpf::{Flow, FlowCtl};

use super::sys;

pub struct Maps {
    pub flows: MapData,
    pub ctl: MapData,
    pub targets: MapData,
    pub attached: MapData,
    pub max_sockets: usize,
    /// A binary upgrade's new process shares these maps: a session at a clean point
    /// moves to it without leaving the kernel.
    pub successor: AtomicBool,
}

/// Entries of each map, for the metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MapCounts {
    pub flows: usize,
    pub ctl: usize,
    pub targets: usize,
    pub attached: usize,
}

fn fd(m: &MapData) -> BorrowedFd<'_> {
    m.fd().as_fd()
}

impl Maps {
    pub fn new(
        flows: MapData,
        ctl: MapData,
        targets: MapData,
        attached: MapData,
        max_sockets: u32,
    ) -> Maps {
        Maps {
            flows,
            ctl,
            targets,
            attached,
            max_sockets: max_sockets as usize,
            successor: AtomicBool::new(false),
        }
    }

    pub fn flow(&self, cookie: u64) -> io::Result<Flow> {
        sys::map_lookup::<u64, Flow>(fd(&self.flows), &cookie)?
            .ok_or_else(|| io::Error::other("flow state vanished from the kernel map"))
    }

    /// `base`: the socket's `bytes_received` that the verdict will never see;
    /// `peer_queued0`: the peer's `queued_total` at insert.
    pub fn create_flow(
        &self,
        cookie: u64,
        peer: u64,
        base: u64,
        peer_queued0: u64,
    ) -> io::Result<()> {
        let flow = Flow {
            peer,
            base,
            peer_queued0,
            ..Flow::default()
        };
        sys::map_update(fd(&self.flows), &cookie, &flow, sys::BPF_NOEXIST)
    }

    /// A socket's control entry (all zero until the daemon first wrote one).
    pub fn ctl(&self, cookie: u64) -> io::Result<FlowCtl> {
        Ok(sys::map_lookup::<u64, FlowCtl>(fd(&self.ctl), &cookie)?.unwrap_or_default())
    }

    /// Changes a socket's control entry. Only the session owning the socket writes it.
    fn update_ctl(&self, cookie: u64, f: impl FnOnce(&mut FlowCtl)) -> io::Result<()> {
        let mut ctl = self.ctl(cookie)?;
        f(&mut ctl);
        sys::map_update(fd(&self.ctl), &cookie, &ctl, sys::BPF_ANY)
    }

    pub fn set_forwarded(&self, cookie: u64, forwarded: u64) -> io::Result<()> {
        self.update_ctl(cookie, |c| c.forwarded = forwarded)
    }

    /// Asks the sock_ops program to take the socket out of the attached map for good.
    pub fn set_detach(&self, cookie: u64) -> io::Result<()> {
        self.update_ctl(cookie, |c| c.detach = 1)
    }

    /// Ends the verdict's pause requests up to `pauses`.
    pub fn set_resumes(&self, cookie: u64, pauses: u64) -> io::Result<()> {
        self.update_ctl(cookie, |c| c.resumes = pauses)
    }

    pub fn is_attached(&self, cookie: u64) -> io::Result<bool> {
        Ok(sys::map_lookup::<u64, u64>(fd(&self.attached), &cookie)?.is_some())
    }

    pub fn insert_target(&self, cookie: u64, sock: RawFd) -> io::Result<()> {
        sys::map_update(fd(&self.targets), &cookie, &(sock as u64), sys::BPF_NOEXIST)
    }

    pub fn insert_attached(&self, cookie: u64, sock: RawFd) -> io::Result<()> {
        sys::map_update(
            fd(&self.attached),
            &cookie,
            &(sock as u64),
            sys::BPF_NOEXIST,
        )
    }

    pub fn remove_attached(&self, cookie: u64) -> io::Result<bool> {
        sys::map_delete(fd(&self.attached), &cookie)
    }

    pub fn remove_target(&self, cookie: u64) -> io::Result<bool> {
        sys::map_delete(fd(&self.targets), &cookie)
    }

    /// Forgets a socket's flow and control state (hash map entries do not leave by
    /// themselves when the socket closes, unlike sockmap entries).
    pub fn remove_state(&self, cookie: u64) -> io::Result<()> {
        sys::map_delete(fd(&self.flows), &cookie)?;
        sys::map_delete(fd(&self.ctl), &cookie)?;
        Ok(())
    }

    pub fn counts(&self) -> io::Result<MapCounts> {
        let limit = self.max_sockets + 1;
        Ok(MapCounts {
            flows: sys::map_count_u64(fd(&self.flows), limit)?,
            ctl: sys::map_count_u64(fd(&self.ctl), limit)?,
            targets: sys::map_count_u64(fd(&self.targets), limit)?,
            attached: sys::map_count_u64(fd(&self.attached), limit)?,
        })
    }
}
