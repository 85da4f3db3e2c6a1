//! The handover channel between the running process and the new binary: a
//! SOCK_SEQPACKET socket pair (one message per datagram, so descriptors arrive with
//! exactly the message that names them), JSON messages, descriptors by SCM_RIGHTS.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::config::Protocol;
use crate::upstream::UpstreamState;

/// The handover protocol's version. A process refuses a new binary that speaks another
/// one (instead of misreading it) and keeps serving.
pub const VERSION: u32 = 1;
/// How long a send may wait for room in the channel.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Names the inherited descriptor of the channel in the new process's environment.
pub const ENV_FD: &str = "L4LB_UPGRADE_FD";

/// Largest message: one upstream's state, or one session.
const MAX_MESSAGE: usize = 4 << 20;
/// Most descriptors one message carries (a TCP session has two, the kernel path six).
const MAX_FDS: usize = 8;

/// A TCP session at a clean point, with its two sockets attached (client, backend).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TcpSession {
    pub listen: SocketAddr,
    /// The client as the session knows it (a PROXY header may have named it).
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Milliseconds since the session was accepted.
    pub age_ms: u64,
    pub upload: u64,
    pub download: u64,
    /// On the kernel path: the new process puts it back there at once.
    pub kernel: bool,
    /// Still in the kernel path's maps, which both processes share: the new process
    /// carries on from this state, and no byte waits. Absent from older binaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_kernel: Option<KernelState>,
}

/// What the userspace half of a spliced session knows, per direction (client to
/// backend first): the rest is in the shared maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelState {
    /// Each source socket's `queued_total` and consumed bytes at insert.
    pub queued0: [u64; 2],
    pub consumed0: [u64; 2],
    /// Bytes the daemon read from each source itself, and wrote to its peer.
    pub read: [u64; 2],
    pub forwarded: [u64; 2],
    /// CLOCK_MONOTONIC ns of the last byte moved (one clock for every process).
    pub last_user_ns: u64,
}

/// A UDP session, with its connected backend socket attached.
#[derive(Debug, Serialize, Deserialize)]
pub struct UdpSession {
    pub listen: SocketAddr,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub age_ms: u64,
    pub upload: u64,
    pub download: u64,
    /// Client datagrams the session took (absent from an older sender).
    #[serde(default)]
    pub requests: u64,
    pub responses: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// New → old, once its configuration checked out and the kernel path loaded.
    Hello {
        version: u32,
        pid: u32,
        /// The identity of the kernel path it loaded (object and settings), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<String>,
    },
    /// Old → new, when the new process loaded the same kernel path: the running
    /// instance's maps, event ring and sock_ops program (six descriptors), to share.
    Kernel {
        identity: String,
    },
    /// New → old: it shares the running instance (`why` when it does not).
    KernelShared {
        why: Option<String>,
    },
    /// Old → new: the old process no longer reads the shared event ring; the new one
    /// does from now on.
    Ring,
    /// Old → new: the handover will not happen; the new process exits.
    Refused {
        why: String,
    },
    /// Old → new: an upstream's server set, its source and per-server state.
    Upstream(UpstreamState),
    /// Old → new, one listening socket attached.
    Listener {
        protocol: Protocol,
        listen: SocketAddr,
    },
    /// Old → new, the admin API's listening socket attached.
    Admin {
        listen: SocketAddr,
    },
    /// Old → new: the listeners and state are all sent.
    ListenersDone,
    /// New → old: it serves every listener.
    Serving,
    Tcp(TcpSession),
    Udp(UdpSession),
    /// New → old: the session just sent runs in the new process; the old one drops it.
    Adopted,
    /// New → old: the old process keeps the session just sent.
    NotAdopted {
        why: String,
    },
    /// Old → new: no more sessions.
    Done,
    /// New → old: it wrote the pid file and is the running process now.
    Started {
        pid: u32,
    },
}

/// A new channel's two ends, both close-on-exec: the caller clears the flag on the end
/// the new process inherits.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    for fd in [&a, &b] {
        // Room for the largest message (an upstream with many servers).
        setsockopt(fd, sockopt::SndBufForce, &(MAX_MESSAGE * 2))?;
        setsockopt(fd, sockopt::RcvBufForce, &(MAX_MESSAGE * 2))?;
    }
    Ok((a, b))
}

/// Lets a child process inherit `fd` across exec.
pub fn inheritable(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// The inherited end named by [`ENV_FD`], if this process was started by an upgrade.
/// The variable is removed, so a later upgrade's child does not see it: call this
/// before any other thread starts.
pub fn inherited_fd() -> io::Result<Option<OwnedFd>> {
    let Some(value) = std::env::var_os(ENV_FD) else {
        return Ok(None);
    };
    std::env::remove_var(ENV_FD);
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| io::Error::other(format!("{ENV_FD}={value:?} is not a descriptor")))?;
    // A SEQPACKET socket, or this is not a handover channel.
    let kind = nix::sys::socket::getsockopt(
        // SAFETY: only borrowed for the check; ownership is taken below.
        &unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        sockopt::SockType,
    )
    .map_err(|e| io::Error::other(format!("{ENV_FD}={fd} is not a socket: {e}")))?;
    if kind != SockType::SeqPacket {
        return Err(io::Error::other(format!(
            "{ENV_FD}={fd} is not a handover channel"
        )));
    }
    // SAFETY: the parent passed this descriptor to this process alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(Some(fd))
}

pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// Receive buffer; one receiver at a time uses it.
    buf: std::sync::Mutex<Vec<u8>>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        Ok(Channel {
            // SAFETY: the OwnedFd stays valid, and registered, until the AsyncFd drops.
            fd: unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?,
            buf: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub async fn send(&self, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!(
                "handover message of {} bytes is over the {MAX_MESSAGE} byte limit",
                bytes.len()
            )));
        }
        let sending = async {
            loop {
                let mut ready = self.fd.writable().await?;
                let sent = ready.try_io(|fd| {
                    let cmsgs = [ControlMessage::ScmRights(fds)];
                    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
                    sendmsg::<()>(
                        fd.as_raw_fd(),
                        &[IoSlice::new(&bytes)],
                        cmsgs,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(io::Error::from)
                });
                match sent {
                    Ok(r) => return r.map(drop),
                    Err(_would_block) => continue,
                }
            }
        };
        // A process that stops reading must not hold the other one for ever (the old
        // one has stopped its listeners by then).
        tokio::time::timeout(SEND_TIMEOUT, sending)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the other process took nothing for {SEND_TIMEOUT:?}"),
                )
            })?
    }

    /// Takes no more messages: the other process's sends fail from now on, while what
    /// it sent before can still be read.
    pub fn shutdown_read(&self) -> io::Result<()> {
        nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)
            .map_err(io::Error::from)
    }

    /// The next message and its descriptors; the peer closing is `UnexpectedEof`.
    /// Cancel-safe: a message is taken off the socket only by a call that returns it.
    pub async fn recv(&self) -> io::Result<(Msg, Vec<OwnedFd>)> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            buf.resize(MAX_MESSAGE, 0);
            let got = ready.try_io(|fd| {
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let r = recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in r.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        // SAFETY: SCM_RIGHTS installed these in this process for us.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                if r.flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
                {
                    return Err(io::Error::other("handover message truncated"));
                }
                Ok((r.bytes, fds))
            });
            let (n, fds) = match got {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other process closed the handover channel",
                ));
            }
            let msg = serde_json::from_slice(&buf[..n]).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unreadable handover message: {e}"),
                )
            })?;
            return Ok((msg, fds));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_carry_their_descriptors() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(
            &Msg::Hello {
                version: VERSION,
                pid: 7,
                kernel: None,
            },
            &[file.as_raw_fd()],
        )
        .await
        .unwrap();
        a.send(&Msg::Done, &[]).await.unwrap();
        let (msg, fds) = b.recv().await.unwrap();
        assert!(matches!(
            msg,
            Msg::Hello {
                version: VERSION,
                pid: 7,
                kernel: None,
            }
        ));
        assert_eq!(fds.len(), 1);
        let (msg, fds) = b.recv().await.unwrap();
        assert!(matches!(msg, Msg::Done));
        assert!(fds.is_empty());
        drop(a);
        let err = b.recv().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// What a binary from before the shared kernel path sends still reads, and what
    /// this one sends such a binary carries nothing new unless the new side asked.
    #[test]
    fn older_binaries_messages_read_the_same() {
        let hello: Msg = serde_json::from_str(r#"{"type":"hello","version":1,"pid":9}"#).unwrap();
        assert!(matches!(
            hello,
            Msg::Hello {
                version: 1,
                pid: 9,
                kernel: None
            }
        ));
        let tcp = r#"{"type":"tcp","listen":"127.0.0.1:1","client":"127.0.0.1:2",
            "server":"127.0.0.1:3","age_ms":5,"upload":6,"download":7,"kernel":true}"#;
        let Msg::Tcp(session) = serde_json::from_str(tcp).unwrap() else {
            panic!("not a tcp session");
        };
        assert_eq!(session.in_kernel, None);
        let sent = serde_json::to_string(&Msg::Tcp(session)).unwrap();
        assert!(!sent.contains("in_kernel"), "{sent}");
        let state = KernelState {
            read: [1, 2],
            ..KernelState::default()
        };
        let with = Msg::Tcp(TcpSession {
            in_kernel: Some(state.clone()),
            ..serde_json::from_str::<TcpSession>(&tcp.replace(r#""type":"tcp","#, "")).unwrap()
        });
        let Msg::Tcp(back) = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap()
        else {
            panic!("not a tcp session");
        };
        assert_eq!(back.in_kernel, Some(state));
    }
}
