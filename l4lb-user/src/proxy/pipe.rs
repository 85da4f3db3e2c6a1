//! splice(2) through a pipe for the copy path's bulk directions: the kernel moves page
//! references from one socket to the other instead of copying every byte into a
//! userspace buffer and out again (what haproxy's `option splice-auto` does).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes a pipe holds: one splice moves at most this much.
pub const PIPE_SIZE: usize = 256 * 1024;

/// A pipe between a source socket and its peer; `held` bytes are in it.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per call; the default (64 KiB) also works, so a
        // refusal (pipe-max-size, per-user pipe limits) is not an error.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            );
        }
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Moves what `src` has (up to the pipe's room) into the pipe; 0 at EOF.
    pub fn fill(&mut self, src: RawFd) -> io::Result<usize> {
        let n = splice(
            src,
            self.write.as_raw_fd(),
            PIPE_SIZE.saturating_sub(self.held),
        )?;
        self.held += n;
        Ok(n)
    }

    /// Moves what the pipe holds into `dst`, as much as it takes.
    pub fn drain(&mut self, dst: RawFd) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), dst, self.held)?;
        self.held = self.held.saturating_sub(n);
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and null offsets (both ends are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn moves_bytes_between_sockets_through_the_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (src, _) = l.accept().unwrap();
        let dst = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut out, _) = l.accept().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        src.set_nonblocking(false).unwrap();
        let mut p = Pipe::new().unwrap();
        let mut moved = 0;
        loop {
            let n = p.fill(src.as_raw_fd());
            match n {
                Ok(0) => break,
                Ok(_) => {
                    while !p.is_empty() {
                        moved += p.drain(dst.as_raw_fd()).unwrap();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        drop(dst);
        let mut got = Vec::new();
        out.read_to_end(&mut got).unwrap();
        assert_eq!(moved, data.len());
        assert!(got == data);
    }
}
