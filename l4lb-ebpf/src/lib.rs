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
/// Ring buffer of [`Event`]s.
pub const EVENTS_MAP: &str = "L4LB_EVENTS";
/// The stream-verdict program.
pub const VERDICT_PROG: &str = "l4lb_verdict";
/// The sock_ops program that takes a socket out of [`ATTACHED_MAP`] under its lock.
pub const SOCKOPS_PROG: &str = "l4lb_sockops";
/// The cgroup setsockopt program that, asked with [`SEGMENTS_SOCKOPT`], has a socket's
/// outgoing segments reach [`SOCKOPS_PROG`].
pub const SEGMENTS_PROG: &str = "l4lb_segments";
/// `IPPROTO_TCP` option the daemon sets on a socket it splices, for [`SEGMENTS_PROG`]
/// (the kernel knows no such option: without the program it fails with ENOPROTOOPT).
pub const SEGMENTS_SOCKOPT: i32 = 0x4c34_0001;

/// Default entries of the per-socket maps (two per session).
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;

/// [`Flow::flags`]: this direction passes skbs to its own socket for the daemon to
/// forward, instead of redirecting them (a redirect failed).
pub const FLOW_HELD: u64 = 1;
/// [`Flow::flags`]: [`Flow::next_seq`] is set (from the socket's `copied_seq` at the
/// first skb the verdict sees).
pub const FLOW_SEQ: u64 = 2;
/// [`Flow::flags`]: the verdict could not keep this direction's stream intact; it drops
/// everything from then on, so the peer sees the stream stop rather than a gap, and the
/// daemon ends the session.
pub const FLOW_BROKEN: u64 = 4;

/// Read-only global: `offsetof(struct sk_buff, sk)` on the running kernel (from BTF).
pub const SKB_SK_OFF_GLOBAL: &str = "L4LB_SKB_SK_OFF";
/// Read-only global: `offsetof(struct sk_buff, cb)`; TCP keeps a segment's sequence
/// number in the first four bytes of `cb` (`TCP_SKB_CB(skb)->seq`).
pub const SKB_CB_OFF_GLOBAL: &str = "L4LB_SKB_CB_OFF";
/// Read-only global: `offsetof(struct tcp_sock, copied_seq)`.
pub const TCP_COPIED_SEQ_OFF_GLOBAL: &str = "L4LB_TCP_COPIED_SEQ_OFF";
/// Read-only global: `offsetof(struct tcp_sock, bytes_acked)`.
pub const TCP_BYTES_ACKED_OFF_GLOBAL: &str = "L4LB_TCP_BYTES_ACKED_OFF";
/// Read-only global: `offsetof(struct tcp_sock, write_seq)`.
pub const TCP_WRITE_SEQ_OFF_GLOBAL: &str = "L4LB_TCP_WRITE_SEQ_OFF";
/// Read-only global: `offsetof(struct tcp_sock, snd_una)`.
pub const TCP_SND_UNA_OFF_GLOBAL: &str = "L4LB_TCP_SND_UNA_OFF";

/// Backpressure: redirected bytes not yet in the peer's send queue above which the
/// verdict asks for its socket to pause (leave the attached map, so its window closes).
/// One bulk stream on loopback swings by more than 8 MiB while the redirect worker waits
/// for a CPU: at 4 MiB it paused about 100 times a second, at 16 MiB not at all.
pub const PAUSE_ABOVE: u64 = 16 << 20;
/// log2 of the bytes between two looks of the verdict at the peer (256 KiB): how far
/// the lag may pass [`PAUSE_ABOVE`] before a pause is asked for.
pub const PAUSE_CHECK_SHIFT: u32 = 18;

/// One direction of a spliced session, keyed by the cookie of the socket that receives
/// its bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Cookie of the socket these bytes are redirected to.
    pub peer: u64,
    /// Bytes redirected to the peer's egress (atomic add by the program).
    pub redirected: u64,
    /// Bytes passed to this socket's own receive queue while held (atomic add).
    pub passed: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last non-empty skb.
    pub last_ns: u64,
    /// Times this direction was held.
    pub holds: u64,
    /// The socket's `bytes_received` before the verdict saw its first byte (set by the
    /// daemon at insert): with the counters above, tells whether bytes wait unseen.
    pub base: u64,
    /// `FLOW_*` bits.
    pub flags: u64,
    /// TCP sequence number of the next byte the verdict has not seen (low 32 bits).
    pub next_seq: u64,
    /// Bytes cut from the head of skbs because they repeated bytes already seen (a
    /// retransmission that partly overlaps, which TCP queues untrimmed).
    pub trimmed: u64,
    /// Pauses the verdict asked for; the socket is paused while this exceeds
    /// [`FlowCtl::resumes`].
    pub pauses: u64,
    /// The peer's `bytes_acked + (write_seq - snd_una)` at insert (set by the daemon):
    /// the peer's growth past it, less [`FlowCtl::forwarded`], is what it took of the
    /// redirected bytes.
    pub peer_queued0: u64,
}

/// The daemon's side of one direction, keyed like [`Flow`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCtl {
    /// Bytes the daemon has written to the peer itself (the passed ones). Once it covers
    /// [`Flow::passed`], the program redirects again.
    pub forwarded: u64,
    /// Non-zero: the sock_ops program takes this socket out of [`ATTACHED_MAP`] at the
    /// next chance that is safe, and sends [`EVENT_DETACHED`].
    pub detach: u64,
    /// Pauses the daemon has ended (it sets this to [`Flow::pauses`] on resume).
    pub resumes: u64,
}

/// [`Event::kind`]: the direction started holding.
pub const EVENT_HELD: u64 = 1;
/// [`Event::kind`]: the direction redirected another `1 << PROGRESS_SHIFT` bytes, so the
/// daemon looks at how far the peer is behind (backpressure).
pub const EVENT_PROGRESS: u64 = 2;
/// [`Event::kind`]: the verdict could not keep this direction's stream intact (it
/// could not cut repeated bytes off an skb); the daemon resets the session.
pub const EVENT_BROKEN: u64 = 3;
/// [`Event::kind`]: the socket left [`ATTACHED_MAP`] as [`FlowCtl::detach`] or a pause
/// asked.
pub const EVENT_DETACHED: u64 = 4;
/// [`Event::kind`]: the verdict asked for a pause (the peer lags past [`PAUSE_ABOVE`]).
pub const EVENT_PAUSED: u64 = 5;
/// log2 of the bytes between two [`EVENT_PROGRESS`] events of one direction (4 MiB): each
/// costs the daemon a wake-up and three system calls, and the lag cap it serves is
/// 64 MiB (1 MiB made that 0.047 daemon CPU-s per GB with slow endpoints).
pub const PROGRESS_SHIFT: u32 = 22;

/// Sent on [`EVENTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// Cookie of the socket the direction reads from.
    pub cookie: u64,
    /// `EVENT_*`.
    pub kind: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCtl {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: byte arrays only (alignment 1, no padding).
    unsafe impl aya::Pod for super::AccessKey4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AccessKey6 {}
}

/// LPM trie of the XDP access filter for IPv4: [`AccessKey4`] -> [`ACCESS_DENY`] or
/// [`ACCESS_ALLOW`]. The key's data is protocol, port, then the address, so the
/// longest matching prefix is looked up per listener.
pub const ACCESS4_MAP: &str = "L4LB_ACCESS4";
/// The same for IPv6 with [`AccessKey6`].
pub const ACCESS6_MAP: &str = "L4LB_ACCESS6";
/// Per-CPU array with one u64: packets the XDP filter dropped.
pub const XDP_DROPS_MAP: &str = "L4LB_XDP_DROPS";
/// The XDP access filter program.
pub const XDP_PROG: &str = "l4lb_xdp_access";
/// Entries of each access trie.
pub const ACCESS_MAX_ENTRIES: u32 = 16_384;
pub const ACCESS_ALLOW: u8 = 0;
pub const ACCESS_DENY: u8 = 1;
/// Bits of protocol and port ahead of the address in an access key.
pub const ACCESS_KEY_HEAD_BITS: u32 = 24;

/// Data of an IPv4 access key: IP protocol (6 or 17), destination port and source
/// address, both in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessKey4 {
    pub proto: u8,
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// Data of an IPv6 access key, as [`AccessKey4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessKey6 {
    pub proto: u8,
    pub port: [u8; 2],
    pub addr: [u8; 16],
}
