//! The stream verdict: every non-empty skb arriving on a spliced socket is redirected to
//! the egress of its peer, unless the bytes already redirected to that peer and not yet
//! taken into its send queue exceed `L4LB_LAG_LIMIT`. Then this direction pauses: skbs are
//! passed to the socket's own receive queue (charged to its receive buffer, so the TCP
//! window closes), the daemon is told on the ring buffer, forwards the passed bytes itself
//! once the redirected ones have drained, and the next skb after it caught up resumes
//! redirecting.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use core::ptr;

use aya_ebpf::bindings::bpf_map_def;
use aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SOCKHASH;
use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::helpers::{
    bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_probe_read_kernel,
    bpf_sk_redirect_hash, bpf_sk_release, bpf_skc_to_tcp_sock,
};
use aya_ebpf::macros::{map, stream_verdict};
use aya_ebpf::maps::{HashMap, RingBuf};
use aya_ebpf::programs::SkBuffContext;
use aya_ebpf::{EbpfContext, Global};
use aya_log_ebpf::warn;
use l4lb_ebpf::{Flow, FlowCtl, PauseEvent, DEFAULT_MAX_SOCKETS, FLOW_PAUSED, FLOW_SEQ_BASE_SET};

/// A SockHash with 8-byte values (aya-ebpf's has 4-byte ones, which bpftool cannot dump).
#[repr(transparent)]
pub struct SockHash8(UnsafeCell<bpf_map_def>);

// SAFETY: the kernel owns the map; the program only hands its address to helpers.
unsafe impl Sync for SockHash8 {}

impl SockHash8 {
    const fn new(max_entries: u32) -> Self {
        Self(UnsafeCell::new(bpf_map_def {
            type_: BPF_MAP_TYPE_SOCKHASH,
            key_size: 8,
            value_size: 8,
            max_entries,
            map_flags: 0,
            id: 0,
            pinning: 0,
        }))
    }

    fn as_ptr(&self) -> *mut c_void {
        self.0.get().cast()
    }
}

#[map]
static L4LB_FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map]
static L4LB_CTL: HashMap<u64, FlowCtl> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map]
static L4LB_TARGETS: SockHash8 = SockHash8::new(DEFAULT_MAX_SOCKETS);

// Only the verdict program's attach point: never looked up by the program.
#[map]
static L4LB_ATTACHED: SockHash8 = SockHash8::new(DEFAULT_MAX_SOCKETS);

#[map]
static L4LB_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[unsafe(no_mangle)]
static L4LB_WRITE_SEQ_OFFSET: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
static L4LB_LAG_LIMIT: Global<u32> = Global::new(4 << 20);

#[stream_verdict]
pub fn l4lb_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        // A pure FIN. Redirected, the peer's kernel worker would take the empty send as a
        // hard error and drop every later redirect: leave it to this socket (EOF for the
        // daemon's watcher).
        return SK_PASS;
    }
    // SAFETY: the context is a valid `__sk_buff` for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(flow) = L4LB_FLOWS.get_ptr_mut(&cookie) else {
        warn!(&ctx, "l4lb: spliced socket {} has no flow state", cookie);
        return SK_PASS;
    };
    // SAFETY: a live entry of a hash map; the verdict of one socket runs under its lock,
    // so this program is the only writer of the non-atomic fields.
    let flow = unsafe { &mut *flow };
    // SAFETY: no preconditions.
    flow.last_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a live entry of a hash map, only read.
    let forwarded = unsafe { L4LB_CTL.get(&cookie) }.map_or(0, |c| c.forwarded);
    if flow.flags & FLOW_PAUSED != 0 {
        if forwarded != flow.passed {
            // Passed bytes wait in this socket for the daemon: keep the order.
            return pass(flow, len);
        }
        flow.flags &= !FLOW_PAUSED;
    }
    let mut peer = flow.peer;
    let Some(write_seq) = peer_write_seq(&peer) else {
        return pause(&ctx, flow, cookie, len);
    };
    if flow.flags & FLOW_SEQ_BASE_SET == 0 {
        flow.peer_seq_base = write_seq;
        flow.flags |= FLOW_SEQ_BASE_SET;
    }
    // Sequence space is 32 bits; the lag is bounded by the limit, so wrapping is exact.
    let accepted = write_seq
        .wrapping_sub(flow.peer_seq_base)
        .wrapping_sub(forwarded as u32);
    let lag = (flow.redirected as u32).wrapping_sub(accepted) as i32;
    if lag > L4LB_LAG_LIMIT.load() as i32 {
        return pause(&ctx, flow, cookie, len);
    }
    // SAFETY: valid skb, map and key pointers for the helper.
    let verdict = unsafe {
        bpf_sk_redirect_hash(
            ctx.skb.skb,
            L4LB_TARGETS.as_ptr(),
            ptr::from_mut(&mut peer).cast(),
            0,
        )
    };
    if verdict != i64::from(SK_PASS) {
        warn!(&ctx, "l4lb: redirect from {} to {} failed", cookie, peer);
        return pause(&ctx, flow, cookie, len);
    }
    add(&mut flow.redirected, len);
    SK_PASS
}

/// Stops redirecting this direction and tells the daemon (once per pause).
fn pause(ctx: &SkBuffContext, flow: &mut Flow, cookie: u64, len: u32) -> u32 {
    if flow.flags & FLOW_PAUSED == 0 {
        flow.flags |= FLOW_PAUSED;
        add(&mut flow.pauses, 1);
        if L4LB_EVENTS.output(PauseEvent { cookie }, 0).is_err() {
            // The daemon also polls the flow state, so a full ring only delays it.
            warn!(ctx, "l4lb: pause event ring full");
        }
    }
    pass(flow, len)
}

fn pass(flow: &mut Flow, len: u32) -> u32 {
    add(&mut flow.passed, len);
    SK_PASS
}

/// The peer's `tcp_sock.write_seq`: the end of everything queued to send on it.
fn peer_write_seq(peer: &u64) -> Option<u32> {
    // SAFETY: valid map and key pointers; a SockHash lookup returns a referenced socket
    // or null.
    let sk = unsafe { bpf_map_lookup_elem(L4LB_TARGETS.as_ptr(), ptr::from_ref(peer).cast()) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a socket from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let seq = if tp.is_null() {
        None
    } else {
        let field = tp
            .cast::<u8>()
            .wrapping_add(L4LB_WRITE_SEQ_OFFSET.load() as usize);
        // SAFETY: a fault-tolerant kernel read of 4 bytes inside the `tcp_sock`.
        unsafe { bpf_probe_read_kernel(field.cast::<u32>()) }.ok()
    };
    // SAFETY: releases the reference the lookup took; `tp` is not used after this.
    unsafe { bpf_sk_release(sk) };
    seq
}

fn add(counter: &mut u64, n: u32) {
    // SAFETY: a valid, aligned u64; the bpf target has atomic add but no compare-and-swap,
    // so `AtomicU64::fetch_add` is unavailable.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, u64::from(n)) };
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel and bpf_skc_to_tcp_sock are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
