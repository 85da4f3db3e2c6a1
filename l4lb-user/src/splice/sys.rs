//! Thin wrappers over the syscalls the kernel path needs: bpf(2) map commands on raw map
//! fds (shared by every session without a lock, unlike aya's `&mut` map types) and the
//! socket options and ioctls that tell how far the kernel got.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
/// Update flag: fail if the key exists.
pub const BPF_NOEXIST: u64 = 1;
/// Update flag: create or replace.
pub const BPF_ANY: u64 = 0;

/// `union bpf_attr` as the map element commands use it.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

fn bpf_map_cmd(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: u64,
    value: u64,
    flags: u64,
) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key,
        value_or_next_key: value,
        flags,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for the map element commands, and the
    // key/value pointers in it point to live buffers of the map's sizes (the callers take
    // `&K`/`&mut V` of the map's own types).
    unsafe { bpf(cmd, &mut attr) }.map(drop)
}

/// bpf(2) with `attr` and its size; the kernel's non-negative result.
///
/// # Safety
/// `attr` must be a valid `union bpf_attr` prefix for `cmd`, and every pointer in it
/// valid for what `cmd` does with it.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: as the caller guarantees; the size passed is the struct's own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `union bpf_attr` as BPF_LINK_CREATE uses it; the tail the kernel may read is zero.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// Where a cgroup program of the kernel path attaches.
#[derive(Clone, Copy)]
pub enum CgroupHook {
    SockOps,
    Setsockopt,
}

/// Attaches a loaded cgroup program to a cgroup with a new bpf link of this process
/// (what aya does when it loads the program itself): the link lasts as long as its fd.
pub fn cgroup_link(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    hook: CgroupHook,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: match hook {
            CgroupHook::SockOps => BPF_CGROUP_SOCK_OPS,
            CgroupHook::Setsockopt => BPF_CGROUP_SETSOCKOPT,
        },
        flags: 0,
        _rest: [0; 4],
    };
    // SAFETY: `attr` is a valid, zero-padded bpf_attr for BPF_LINK_CREATE; both fds are
    // borrowed for the call.
    let rc = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
    // SAFETY: the kernel just returned this new fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

pub fn map_update<K, V>(fd: BorrowedFd<'_>, key: &K, value: &V, flags: u64) -> io::Result<()> {
    bpf_map_cmd(
        BPF_MAP_UPDATE_ELEM,
        fd,
        std::ptr::from_ref(key) as u64,
        std::ptr::from_ref(value) as u64,
        flags,
    )
}

/// The value at `key`, `None` if absent. `V` must be the map's plain-data value type.
pub fn map_lookup<K, V: Copy + Default>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    match bpf_map_cmd(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        std::ptr::from_ref(key) as u64,
        std::ptr::from_mut(&mut value) as u64,
        0,
    ) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `key`; `Ok(false)` if it was not there.
pub fn map_delete<K>(fd: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    match bpf_map_cmd(
        BPF_MAP_DELETE_ELEM,
        fd,
        std::ptr::from_ref(key) as u64,
        0,
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Entries of a map with u64 keys, counting at most `limit`.
pub fn map_count_u64(fd: BorrowedFd<'_>, limit: usize) -> io::Result<usize> {
    let mut count = 0;
    let mut prev: Option<u64> = None;
    while count < limit {
        // A null key asks for the first one.
        let key_ptr = prev.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64);
        let mut found: u64 = 0;
        match bpf_map_cmd(
            BPF_MAP_GET_NEXT_KEY,
            fd,
            key_ptr,
            std::ptr::from_mut(&mut found) as u64,
            0,
        ) {
            Ok(()) => {
                count += 1;
                prev = Some(found);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most that many.
    let rc = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain data, partly or fully overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The socket's cookie, the key of every map.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The pending socket error (reading it clears it), if any.
pub fn take_socket_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let e = getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    Ok((e != 0).then(|| io::Error::from_raw_os_error(e)))
}

/// Makes the socket's close send a reset (`SO_LINGER` on with a zero timeout), for a
/// stream whose peer must not take a cut-off stream for a complete one.
pub fn reset_on_close(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a pointer to a live linger and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_RCVLOWAT = 1`: runs the verdict at once on bytes queued before the insert.
pub fn set_rcvlowat_one(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Fixes the receive buffer at `bytes` (the kernel doubles it for overhead), which also
/// stops its autotuning and so caps the TCP window the socket offers; past
/// `net.core.rmem_max` (212,992 by default) where the daemon may.
pub fn set_rcvbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)
}

/// Fixes the send buffer at `bytes` (doubled by the kernel), past `net.core.wmem_max`
/// where the daemon may.
pub fn set_sndbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
}

/// `force` (CAP_NET_ADMIN: not capped by the sysctl maximum), else `plain` (capped).
fn set_buffer(fd: RawFd, force: libc::c_int, plain: libc::c_int, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match setsockopt_int(fd, libc::SOL_SOCKET, force, bytes) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes)
        }
        r => r,
    }
}

/// Has the socket's outgoing segments reach the sock_ops program, where a spliced
/// socket leaves the attached map (the kernel path's setsockopt program does it).
pub fn watch_segments(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, l4lb_ebpf::SEGMENTS_SOCKOPT, 1)
}

/// Re-sets `SO_SNDBUF` to its current size: the kernel calls the socket's write-space
/// callback, which reschedules a stalled sockmap redirect worker.
pub fn kick_write_space(fd: RawFd) -> io::Result<()> {
    let current = getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    // getsockopt reports the doubled value the kernel keeps.
    set_sndbuf(fd, usize::try_from(current / 2).unwrap_or(0).max(4096))
}

pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// The prefix of `struct tcp_info` this module reads (the kernel copies what fits).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawTcpInfo {
    state: u8,
    _u8s: [u8; 7],
    _u32s: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    _segs_out: u32,
    _segs_in: u32,
    notsent_bytes: u32,
    _min_rtt: u32,
}

/// How far one socket's byte streams have got, from TCP_INFO and ioctls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpProgress {
    /// `write_seq` minus a per-socket constant: every byte ever queued to send (acked
    /// plus still queued). Only differences are meaningful.
    pub queued_total: u64,
    /// Bytes queued but not yet acked (SIOCOUTQ).
    pub outq: u64,
    /// Bytes received in order (rcv_nxt minus a constant).
    pub received: u64,
    /// Bytes queued but not yet sent.
    pub notsent: u64,
    /// TCP state is CLOSE: the connection is gone (reset).
    pub closed: bool,
    /// The other end's FIN has arrived.
    pub fin_received: bool,
}

const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

pub fn tcp_progress(fd: RawFd) -> io::Result<TcpProgress> {
    let info = getsockopt::<RawTcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    let outq = ioctl_int(fd, libc::TIOCOUTQ)?;
    // Acked first, queue second: bytes acked in between make the sum low, never high,
    // so a caller waiting for it to reach a target waits a little longer, never less.
    Ok(TcpProgress {
        queued_total: info.bytes_acked + outq,
        outq,
        received: info.bytes_received,
        notsent: u64::from(info.notsent_bytes),
        closed: info.state == TCP_CLOSE,
        fin_received: matches!(
            info.state,
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT
        ),
    })
}

/// Bytes in the receive queue not yet read (FIONREAD).
pub fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: both ioctls write one c_int.
    let rc = unsafe { libc::ioctl(fd, request, std::ptr::from_mut(&mut value)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

/// A duration in nanoseconds, as [`monotonic_ns`] counts them (saturating).
pub fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Maps a non-blocking recv/send return: a byte count, `None` for "try again later".
fn nonblocking_result(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(e),
    }
}

/// Non-blocking receive of at most `max` bytes appended to `buf`, without zeroing the
/// space first (a held direction reads up to 256 KiB at a time).
pub fn recv_to_spare(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
    buf.reserve(max);
    let spare = &mut buf.spare_capacity_mut()[..max];
    // SAFETY: `spare` is valid for writes of `max` bytes; recv writes at most that.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), max, libc::MSG_DONTWAIT) };
    let got = nonblocking_result(n)?;
    if let Some(n) = got {
        // SAFETY: recv initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Ok(got)
}

/// Non-blocking send; `Ok(None)` when the send buffer is full.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<Option<usize>> {
    // SAFETY: the buffer is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    nonblocking_result(n)
}
