//! The stream verdict: every non-empty skb arriving on a spliced socket is redirected to
//! the egress of its peer. Every 256 KiB it looks at how many of the redirected bytes
//! the peer has taken into its send queue, and past [`PAUSE_ABOVE`] it asks for a pause:
//! the sock_ops program below takes the socket out of the attached map, its window
//! closes, and the daemon lets it rejoin once the peer caught up (see
//! `l4lb-user/src/splice/accounting.rs`). Every 4 MiB redirected the daemon is told too
//! (`PROGRESS_SHIFT`). Should a redirect fail
//! (the peer left the redirect map), the direction holds: skbs are passed to the socket
//! itself, the daemon is told on the ring buffer and forwards them, and redirecting
//! resumes once it has, so the byte order holds.
//!
//! Before any of that, the verdict cuts from the skb the bytes it has already seen. TCP
//! queues a retransmission that partly overlaps received bytes untrimmed (the reader is
//! expected to skip by sequence number), but the verdict-only path hands whole skbs to
//! the program: measured on 6.18, every pause of a direction (its window closes and
//! reopens) risked doubling a segment in the stream.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use core::ptr;

use aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SOCKHASH;
use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::bindings::{
    bpf_map_def, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
};
use aya_ebpf::helpers::{
    bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns, bpf_map_delete_elem,
    bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_setsockopt, bpf_sk_redirect_hash,
    bpf_sk_release, bpf_skb_adjust_room, bpf_skc_to_tcp_sock,
};
use aya_ebpf::macros::{cgroup_sockopt, map, sock_ops, stream_verdict};
use aya_ebpf::maps::{HashMap, RingBuf};
use aya_ebpf::programs::{SkBuffContext, SockOpsContext, SockoptContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::{error, warn};
use l4lb_ebpf::{
    Event, Flow, FlowCtl, DEFAULT_MAX_SOCKETS, EVENT_BROKEN, EVENT_DETACHED, EVENT_HELD,
    EVENT_PAUSED, EVENT_PROGRESS, FLOW_BROKEN, FLOW_HELD, FLOW_SEQ, PAUSE_ABOVE, PAUSE_CHECK_SHIFT,
    PROGRESS_SHIFT, SEGMENTS_SOCKOPT,
};

// Kernel structure offsets, set by the daemon from the running kernel's BTF at load
// (Rust eBPF has no CO-RE field relocations).
#[unsafe(no_mangle)]
static L4LB_SKB_SK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static L4LB_SKB_CB_OFF: u32 = 0;
#[unsafe(no_mangle)]
static L4LB_TCP_COPIED_SEQ_OFF: u32 = 0;
#[unsafe(no_mangle)]
static L4LB_TCP_BYTES_ACKED_OFF: u32 = 0;
#[unsafe(no_mangle)]
static L4LB_TCP_WRITE_SEQ_OFF: u32 = 0;
#[unsafe(no_mangle)]
static L4LB_TCP_SND_UNA_OFF: u32 = 0;

/// `TCP_ESTABLISHED` of the kernel's TCP states.
const TCP_ESTABLISHED: u32 = 1;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;
/// The part of a setsockopt value a cgroup program sees (x86_64's page).
const PAGE_SIZE: i32 = 4096;
/// `bpf_skb_adjust_room` cuts at most this much per call.
const TRIM_STEP: u32 = 0xfff;
/// Bounds the trimming loop: 192 steps cut 768 KiB. An skb that waited in a paused
/// socket's receive queue may have been coalesced with its neighbours (up to
/// MAX_SKB_FRAGS frags of up to 32 KiB each): one of 327,415 bytes repeating 265,536
/// was seen on 6.18, past the 256 KiB an earlier bound of 64 steps covered.
const TRIM_STEPS: u32 = 192;

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

// Not preallocated: a preallocated element the daemon deletes goes back on the free list
// at once, and the next session's insert could take it while a verdict still running
// on the old socket writes through its pointer. Freed after an RCU grace period
// instead; the daemon's updates of a control entry swap in a whole new element, so the
// verdict never reads one half-written. Only the daemon inserts.
#[map]
static L4LB_FLOWS: HashMap<u64, Flow> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
static L4LB_CTL: HashMap<u64, FlowCtl> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
static L4LB_TARGETS: SockHash8 = SockHash8::new(DEFAULT_MAX_SOCKETS);

// The verdict program's attach point; the sock_ops program deletes from it.
#[map]
static L4LB_ATTACHED: SockHash8 = SockHash8::new(DEFAULT_MAX_SOCKETS);

#[map]
static L4LB_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[stream_verdict]
pub fn l4lb_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        // A pure FIN; TCP has already recorded it, and the daemon learns it from
        // EPOLLRDHUP. Neither redirect nor pass it: either way it can land in a psock
        // queue (the peer's, or this socket's own while redirects towards it wait there),
        // and the kernel worker takes an empty skb for a hard error, sets EPIPE and drops
        // every later redirect to that socket.
        return SK_DROP;
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
    if flow.flags & FLOW_BROKEN != 0 {
        return SK_DROP;
    }
    let len = match unseen(&ctx, flow) {
        // Nothing in it the verdict has not seen.
        Ok(0) => return SK_DROP,
        Ok(n) => n,
        Err(()) => {
            // Neither forwarding the repeated bytes nor dropping the new ones keeps the
            // stream intact: nothing more goes through, and the daemon resets the
            // session.
            error!(&ctx, "l4lb: cannot cut repeated bytes on socket {}", cookie);
            flow.flags |= FLOW_BROKEN;
            emit(&ctx, cookie, EVENT_BROKEN);
            return SK_DROP;
        }
    };
    // SAFETY: no preconditions.
    flow.last_ns = unsafe { bpf_ktime_get_ns() };
    if flow.flags & FLOW_HELD != 0 {
        if control(cookie).forwarded < flow.passed {
            // Passed bytes wait in this socket for the daemon: keep the order.
            return pass(flow, len);
        }
        flow.flags &= !FLOW_HELD;
    }
    let mut peer = flow.peer;
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
        return hold(&ctx, flow, cookie, len);
    }
    let before = flow.redirected;
    add(&mut flow.redirected, len);
    let after = before + u64::from(len);
    if before >> PROGRESS_SHIFT != after >> PROGRESS_SHIFT {
        emit(&ctx, cookie, EVENT_PROGRESS);
    }
    if before >> PAUSE_CHECK_SHIFT == after >> PAUSE_CHECK_SHIFT {
        return SK_PASS;
    }
    let ctl = control(cookie);
    if flow.pauses == ctl.resumes && established(&ctx) {
        if let Some(queued) = peer_queued(flow.peer) {
            let taken = queued
                .saturating_sub(flow.peer_queued0)
                .saturating_sub(ctl.forwarded);
            if after.saturating_sub(taken) > PAUSE_ABOVE {
                flow.pauses += 1;
                emit(&ctx, cookie, EVENT_PAUSED);
            }
        }
    }
    SK_PASS
}

/// What the daemon has said about a socket; only read where it matters (a hold, a
/// pause check), not for every skb.
fn control(cookie: u64) -> FlowCtl {
    // SAFETY: a live entry of a hash map, only read.
    unsafe { L4LB_CTL.get(&cookie) }
        .copied()
        .unwrap_or_default()
}

/// Whether this socket could rejoin the attached map after a pause: only established
/// sockets can, so one whose write side was shut down (a half-close passed on) is not
/// paused; the daemon's lag cap still bounds it.
fn established(ctx: &SkBuffContext) -> bool {
    // SAFETY: a valid context; the kernel fills `sk` for stream verdicts.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    // SAFETY: checked for null; the verifier allows reading `state` of this pointer.
    !sk.is_null() && unsafe { (*sk).state } == TCP_ESTABLISHED
}

/// Every byte ever queued on the peer socket: `bytes_acked` plus what waits in its send
/// queue (the daemon computes the same from TCP_INFO and SIOCOUTQ).
fn peer_queued(peer: u64) -> Option<u64> {
    let mut key = peer;
    // SAFETY: valid map and key pointers; a hit is a referenced socket, released below.
    let sk = unsafe { bpf_map_lookup_elem(L4LB_TARGETS.as_ptr(), ptr::from_mut(&mut key).cast()) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a socket from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let queued = if tp.is_null() {
        None
    } else {
        let tp = tp as u64;
        let acked: Result<u64, ()> = read_kernel(tp + global(&L4LB_TCP_BYTES_ACKED_OFF));
        let write: Result<u32, ()> = read_kernel(tp + global(&L4LB_TCP_WRITE_SEQ_OFF));
        let una: Result<u32, ()> = read_kernel(tp + global(&L4LB_TCP_SND_UNA_OFF));
        match (acked, write, una) {
            (Ok(a), Ok(w), Ok(u)) => Some(a + u64::from(w.wrapping_sub(u))),
            _ => None,
        }
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk) };
    queued
}

/// Pausing a direction (backpressure) or taking a session out of the kernel while bytes
/// flow needs a socket to leave the attached map, and only this context can do that
/// safely: a delete from userspace clears the socket's verdict program while the kernel
/// may be handing it skbs on another CPU, and those skbs are then dropped (bytes TCP has
/// already acknowledged). sock_ops callbacks run under the socket lock, so no
/// verdict runs beside this one; the one remaining case, a callback from inside the
/// verdict's own loop (an ACK sent while consuming an skb), is ruled out by deleting only
/// when the verdict has seen every byte received, so no skb is left in that loop.
///
/// A socket gets the header-option callback only while the daemon waits for it to
/// leave (see [`l4lb_segments`]): the daemon sets it when it asks for a detach or takes
/// up a pause, triggers it at once with a zero-length send, and every outgoing segment
/// retries until the socket has left; then, or when nothing is asked, the callback turns
/// itself off. Left on, it ran twice per message of a spliced session (2.5% of the
/// machine's time with 50 redis keep-alive clients in the kernel).
#[sock_ops]
pub fn l4lb_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_HDR_OPT_LEN_CB && !detach_if_asked(&ctx) {
        let flags = ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
        // A failure leaves the callback on: a cost, not an error.
        let _ = ctx.set_cb_flags(flags as i32);
    }
    1
}

/// `TCP_BPF_SOCK_OPS_CB_FLAGS` (uapi `linux/bpf.h`): a socket's sock_ops callback
/// flags, through bpf_setsockopt.
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
const IPPROTO_TCP: i32 = 6;

/// The daemon's [`SEGMENTS_SOCKOPT`] on a spliced socket: its next outgoing segments
/// reach [`l4lb_sockops`]. The daemon sets it at insert (a session whose option fails
/// stays copied: the program is missing) and whenever it waits for the socket to leave
/// the attached map. Only then: the callback costs every segment of every socket it is
/// on (set at connect for every socket of the daemon's cgroup, it cost 8% of the new
/// connections per second of sessions that never reach the kernel). Other options pass
/// untouched.
#[cgroup_sockopt(setsockopt)]
pub fn l4lb_segments(ctx: SockoptContext) -> i32 {
    // SAFETY: `sockopt` is the kernel's context, valid for the program's run.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.level != IPPROTO_TCP || opt.optname != SEGMENTS_SOCKOPT {
        // Untouched. A value over a page reaches the program cut to its first page;
        // optlen 0 has the kernel use the caller's own (kernels before 6.5 failed
        // such a call with EFAULT otherwise: iptables-legacy in the same cgroup).
        if opt.optlen > PAGE_SIZE {
            opt.optlen = 0;
        }
        return 1;
    }
    // SAFETY: as above; the kernel always gives this hook its socket.
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    let mut flags: i32 = 0;
    // SAFETY: a valid socket and a stack value of the size given.
    let got = unsafe {
        bpf_getsockopt(
            sk.cast(),
            IPPROTO_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            ptr::from_mut(&mut flags).cast(),
            4,
        )
    };
    if got != 0 {
        flags = 0;
    }
    flags |= BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG as i32;
    // SAFETY: as above.
    let set = unsafe {
        bpf_setsockopt(
            sk.cast(),
            IPPROTO_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            ptr::from_mut(&mut flags).cast(),
            4,
        )
    };
    if set != 0 {
        // The daemon's setsockopt fails (EPERM), and the session stays copied.
        return 0;
    }
    // Done: the kernel's own setsockopt, which knows no such option, is skipped.
    opt.optlen = -1;
    1
}

/// Takes the socket out of the attached map if the daemon or the verdict asked for it.
/// True while that is still to be done (the verdict has not yet seen every byte
/// received): the next segment tries again.
fn detach_if_asked(ctx: &SockOpsContext) -> bool {
    // SAFETY: the context is a valid `bpf_sock_ops` for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a live entry of a hash map, only read.
    let Some(flow) = (unsafe { L4LB_FLOWS.get(&cookie) }) else {
        return false;
    };
    // The daemon writes a control entry only once it has something to say.
    let ctl = control(cookie);
    if ctl.detach == 0 && flow.pauses == ctl.resumes {
        return false;
    }
    // SAFETY: `ops` is the kernel's context, valid for the program's run.
    let ops = unsafe { &*ctx.ops };
    // A FIN takes one sequence number, counted in `bytes_received`: without taking it
    // off, a half-closed socket (its peer's FIN in) could never leave.
    let fin = u64::from(matches!(
        ops.state,
        TCP_TIME_WAIT | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING
    ));
    let received = ops.bytes_received.wrapping_sub(fin);
    if flow.base + flow.redirected + flow.passed != received {
        return true;
    }
    let mut key = cookie;
    // SAFETY: valid map and key pointers; the kernel allows sockhash deletes here.
    let rc = unsafe { bpf_map_delete_elem(L4LB_ATTACHED.as_ptr(), ptr::from_mut(&mut key).cast()) };
    if rc == 0 {
        emit(ctx, cookie, EVENT_DETACHED);
    }
    false
}

fn global(g: &u32) -> u64 {
    // SAFETY: a valid static; volatile so the value set at load is read, not the
    // initializer.
    u64::from(unsafe { ptr::read_volatile(g) })
}

/// Reads a kernel value at an address.
fn read_kernel<T>(addr: u64) -> Result<T, ()> {
    // SAFETY: the helper checks the address and fails cleanly on a bad one.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| ())
}

/// Cuts off the head of the skb that repeats bytes this verdict has already seen, and
/// returns the length left. The first skb a socket brings starts the count at its
/// `copied_seq`, which also covers an skb the daemon read part of before insert.
fn unseen(ctx: &SkBuffContext, flow: &mut Flow) -> Result<u32, ()> {
    // The context is the kernel's `struct sk_buff`; read its fields at their offsets.
    let skb = ctx.skb.skb as u64;
    let seq: u32 = read_kernel(skb + global(&L4LB_SKB_CB_OFF))?;
    if flow.flags & FLOW_SEQ == 0 {
        let sk: u64 = read_kernel(skb + global(&L4LB_SKB_SK_OFF))?;
        let copied: u32 = read_kernel(sk + global(&L4LB_TCP_COPIED_SEQ_OFF))?;
        flow.next_seq = u64::from(copied);
        flow.flags |= FLOW_SEQ;
    }
    let len = ctx.len();
    let end = seq.wrapping_add(len);
    let next = flow.next_seq as u32;
    let seen = next.wrapping_sub(seq) as i32;
    if seen <= 0 {
        // The usual case, or a gap, which TCP's in-order queue never produces.
        flow.next_seq = u64::from(end);
        return Ok(len);
    }
    if seen as u32 >= len {
        // All of it repeats what was seen: nothing to cut, it is dropped whole.
        add(&mut flow.trimmed, len);
        return Ok(0);
    }
    let seen = seen as u32;
    let mut left = seen;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = left.min(TRIM_STEP);
        // SAFETY: a valid skb context; a negative length cuts from the head of the data.
        if unsafe { bpf_skb_adjust_room(ctx.skb.skb, -(step as i32), 0, 0) } != 0 {
            return Err(());
        }
        left -= step;
    }
    if left != 0 {
        return Err(());
    }
    add(&mut flow.trimmed, seen);
    if (end.wrapping_sub(next) as i32) > 0 {
        flow.next_seq = u64::from(end);
    }
    Ok(len - seen)
}

fn emit<C: EbpfContext>(ctx: &C, cookie: u64, kind: u64) {
    if L4LB_EVENTS.output(Event { cookie, kind }, 0).is_err() {
        // The daemon also checks every flow now and then, so a full ring only delays it.
        warn!(ctx, "l4lb: event ring full");
    }
}

/// Stops redirecting until the daemon has forwarded every byte passed from here on, and
/// tells it (once per hold).
fn hold(ctx: &SkBuffContext, flow: &mut Flow, cookie: u64, len: u32) -> u32 {
    if flow.flags & FLOW_HELD == 0 {
        flow.flags |= FLOW_HELD;
        add(&mut flow.holds, 1);
        emit(ctx, cookie, EVENT_HELD);
    }
    pass(flow, len)
}

fn pass(flow: &mut Flow, len: u32) -> u32 {
    add(&mut flow.passed, len);
    SK_PASS
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

// GPL-compatible, so GPL-only helpers stay usable.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
