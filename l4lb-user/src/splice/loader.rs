//! Loads the embedded eBPF object with aya, sets its read-only globals, attaches the
//! verdict program and hands out the maps.

use anyhow::Context;
use aya::maps::sock::SockMapFd;
use aya::maps::{Map, MapData, MapFd, RingBuf};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use l4lb_ebpf::{ATTACHED_MAP, CTL_MAP, EVENTS_MAP, FLOWS_MAP, TARGETS_MAP, VERDICT_PROG};

/// The verdict program, built by build.rs for bpfel-unknown-none.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l4lb-ebpf"));

/// What the kernel path needs from the loaded object; dropping it detaches the program
/// and frees the maps.
pub struct Loaded {
    /// Owns the program and its attachment.
    pub ebpf: Ebpf,
    pub flows: MapData,
    pub ctl: MapData,
    pub targets: MapData,
    pub attached: MapData,
    pub events: RingBuf<MapData>,
    pub logger: Option<aya_log::EbpfLogger<super::watch::TracingLog>>,
}

pub struct Params {
    pub max_sockets: u32,
    /// aya-log level inside the program (aya_log::Level as u8).
    pub log_level: u8,
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn data(map: Map, name: &str) -> anyhow::Result<MapData> {
    match map {
        Map::HashMap(d) | Map::SockHash(d) => Ok(d),
        _ => anyhow::bail!("map {name} has an unexpected type"),
    }
}

pub fn load(params: &Params) -> anyhow::Result<Loaded> {
    let mut ebpf = EbpfLoader::new()
        .override_global(aya_log::LEVEL, &params.log_level, false)
        .map_max_entries(FLOWS_MAP, params.max_sockets)
        .map_max_entries(CTL_MAP, params.max_sockets)
        .map_max_entries(TARGETS_MAP, params.max_sockets)
        .map_max_entries(ATTACHED_MAP, params.max_sockets)
        .load(PROGRAM)
        .context("loading the eBPF object")?;
    let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, super::watch::TracingLog).ok();
    let attached = data(take(&mut ebpf, ATTACHED_MAP)?, ATTACHED_MAP)?;
    {
        let prog: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .with_context(|| format!("program {VERDICT_PROG} missing"))?
            .try_into()
            .context("verdict program type")?;
        prog.load()
            .context("loading the verdict program (verifier)")?;
        let fd: &MapFd = attached.fd();
        // SAFETY: `SockMapFd` is `#[repr(transparent)]` over `MapFd`, so the reference
        // cast is layout-preserving (aya does the same for its typed SockHash, which
        // insists on 4-byte values; this map has 8-byte ones).
        let sock_fd: &SockMapFd = unsafe { &*std::ptr::from_ref(fd).cast::<SockMapFd>() };
        prog.attach(sock_fd)
            .context("attaching the verdict program")?;
    }
    let flows = data(take(&mut ebpf, FLOWS_MAP)?, FLOWS_MAP)?;
    let ctl = data(take(&mut ebpf, CTL_MAP)?, CTL_MAP)?;
    let targets = data(take(&mut ebpf, TARGETS_MAP)?, TARGETS_MAP)?;
    let events = RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?).context("events ring buffer")?;
    Ok(Loaded {
        ebpf,
        flows,
        ctl,
        targets,
        attached,
        events,
        logger,
    })
}
