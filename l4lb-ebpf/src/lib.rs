//! What the SK_SKB verdict program and the daemon share: map and global names, and the
//! `#[repr(C)]` values of the maps. `no_std` so the eBPF build can use it; the `user`
//! feature adds `aya::Pod` for the daemon.
#![no_std]

/// Hash map: socket cookie -> [`Flow`], one entry per spliced socket. Written by the
/// program, created and removed by the daemon.
pub const FLOWS_MAP: &str = "L4LB_FLOWS";
/// Hash map: socket cookie -> [`FlowCtl`]. Written only by the daemon.
pub const CTL_MAP: &str = "L4LB_CTL";
/// SockHash (cookie -> socket, 8-byte values) with no program: the redirect target.
pub const TARGETS_MAP: &str = "L4LB_TARGETS";
/// SockHash with the verdict program attached: sockets whose ingress is spliced.
pub const ATTACHED_MAP: &str = "L4LB_ATTACHED";
/// Ring buffer of [`PauseEvent`]s.
pub const EVENTS_MAP: &str = "L4LB_EVENTS";
/// The stream-verdict program.
pub const VERDICT_PROG: &str = "l4lb_verdict";
/// Read-only global: byte offset of `write_seq` in the kernel's `struct tcp_sock`
/// (Rust eBPF has no CO-RE field relocations, so the daemon reads it from BTF).
pub const WRITE_SEQ_OFFSET_GLOBAL: &str = "L4LB_WRITE_SEQ_OFFSET";
/// Read-only global: bytes redirected to a peer but not yet in its send queue above
/// which the program stops redirecting (backpressure).
pub const LAG_LIMIT_GLOBAL: &str = "L4LB_LAG_LIMIT";

/// Default entries of the per-socket maps (two per session).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// [`Flow::flags`]: the program has recorded `peer_seq_base`.
pub const FLOW_SEQ_BASE_SET: u32 = 1;
/// [`Flow::flags`]: this direction passes skbs to its own socket for the daemon to
/// forward, instead of redirecting them.
pub const FLOW_PAUSED: u32 = 2;

/// One direction of a spliced session, keyed by the cookie of the socket that receives
/// its bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Cookie of the socket these bytes are redirected to.
    pub peer: u64,
    /// Bytes redirected to the peer's egress (atomic add by the program).
    pub redirected: u64,
    /// Bytes passed to this socket's own receive queue while paused (atomic add).
    pub passed: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last non-empty skb.
    pub last_ns: u64,
    /// Times this direction was paused.
    pub pauses: u64,
    /// The peer's `write_seq` when the program first saw this direction.
    pub peer_seq_base: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
}

/// The daemon's side of one direction, keyed like [`Flow`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCtl {
    /// Bytes the daemon has read from this socket and written to the peer itself
    /// (every passed byte, once forwarded). The program resumes redirecting when it
    /// equals [`Flow::passed`].
    pub forwarded: u64,
}

/// Sent on [`EVENTS_MAP`] when a direction pauses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PauseEvent {
    /// Cookie of the socket whose direction paused.
    pub cookie: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCtl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PauseEvent {}
}
