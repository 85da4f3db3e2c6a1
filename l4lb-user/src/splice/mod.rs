//! The kernel splice path (sockmap + SK_SKB verdict programs).

use std::fmt;

use tokio::net::TcpStream;

use crate::metrics::CopyReason;
use crate::proxy::copy::{copy_bidirectional, CopyLimits, Transfer};
use crate::proxy::SessionEnd;

/// Which path carried a session's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Kernel,
    Copy(CopyReason),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Kernel => f.write_str("kernel"),
            Path::Copy(reason) => write!(f, "copy:{}", reason.as_str()),
        }
    }
}

pub struct SpliceOutcome {
    pub end: SessionEnd,
    pub path: Path,
    /// Bytes of this session that went through userspace (fallback, backpressure).
    pub userspace_bytes: u64,
}

pub struct Splicer {}

impl Splicer {
    pub fn load() -> anyhow::Result<Splicer> {
        anyhow::bail!("the kernel path is not built into this binary yet")
    }

    pub async fn run(
        &self,
        mut client: TcpStream,
        mut backend: TcpStream,
        limits: CopyLimits,
        transfer: &Transfer,
    ) -> SpliceOutcome {
        let end = copy_bidirectional(&mut client, &mut backend, limits, transfer).await;
        SpliceOutcome {
            end,
            path: Path::Copy(CopyReason::InsertFailed),
            userspace_bytes: transfer.upload() + transfer.download(),
        }
    }
}
