//! What the admin API's and `upstream_show`'s listeners let in: `upstream_show` applies
//! its `[[server]]` block's `access` and `limit_conn` as a proxy listener does, and both
//! cap their open connections and end one that sits idle, so clients that connect and
//! send nothing (or trickle) cannot hold the process's descriptors.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tracing::debug;

use crate::proxy::access::ConnSlot;
use crate::proxy::SharedCtx;

/// Connections open at once on one listener: operators and scrapers need a few.
pub const MAX_CONNECTIONS: usize = 64;
/// A read or write that waits this long ends the connection (also an idle keep-alive).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Guarded {
    listener: TcpListener,
    /// The `[[server]]` block whose rules apply (`upstream_show`); none for the admin API.
    rules: Option<SharedCtx>,
    slots: Arc<Semaphore>,
}

impl Guarded {
    pub fn new(listener: TcpListener, rules: Option<SharedCtx>) -> Self {
        Guarded {
            listener,
            rules,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

impl axum::serve::Listener for Guarded {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        loop {
            let (stream, peer) = axum::serve::Listener::accept(&mut self.listener).await;
            let slot = match &self.rules {
                Some(ctx) => match ctx.load().admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(why) => {
                        debug!(client = %peer, reason = why, "upstream_show connection refused");
                        continue;
                    }
                },
                None => None,
            };
            let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
                debug!(client = %peer, limit = MAX_CONNECTIONS, "too many admin connections; closing");
                continue;
            };
            let mut io = TimeoutStream::new(stream);
            io.set_read_timeout(Some(IDLE_TIMEOUT));
            io.set_write_timeout(Some(IDLE_TIMEOUT));
            let conn = Connection {
                io: Box::pin(io),
                _permit: permit,
                _slot: slot,
            };
            return (conn, peer);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection with the places it holds until it closes.
pub struct Connection {
    io: Pin<Box<TimeoutStream<TcpStream>>>,
    _permit: OwnedSemaphorePermit,
    _slot: Option<ConnSlot>,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
