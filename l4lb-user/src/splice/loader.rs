//! Loads the embedded eBPF object with aya, sets its read-only globals (log level,
//! kernel structure offsets), attaches the
//! verdict program and hands out the maps; or takes over the instance a running
//! process loaded from the same object (binary upgrade), from its descriptors.

use std::hash::{Hash, Hasher};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::Context;
use aya::maps::sock::SockMapFd;
use aya::maps::{Map, MapData, MapFd, RingBuf};
use aya::programs::sk_skb::SkSkbLink;
use aya::programs::{CgroupAttachMode, CgroupSockopt, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};

use super::maps::Maps;
use l4lb_ebpf::{
    ATTACHED_MAP, CTL_MAP, EVENTS_MAP, FLOWS_MAP, SEGMENTS_PROG, SKB_CB_OFF_GLOBAL,
    SKB_SK_OFF_GLOBAL, SOCKOPS_PROG, TARGETS_MAP, TCP_BYTES_ACKED_OFF_GLOBAL,
    TCP_COPIED_SEQ_OFF_GLOBAL, TCP_SND_UNA_OFF_GLOBAL, TCP_WRITE_SEQ_OFF_GLOBAL, VERDICT_PROG,
};

/// The verdict program, built by build.rs for bpfel-unknown-none.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l4lb-ebpf"));

/// What the kernel path needs from the loaded object; dropping it detaches the program
/// and frees the maps.
pub struct Loaded {
    /// Owns the programs and the cgroup programs' attachments.
    pub ebpf: Ebpf,
    /// The verdict's attachment to the attached map: detached when dropped.
    pub verdict: SkSkbLink,
    pub maps: Maps,
    pub events: RingBuf<MapData>,
    /// Duplicates of the instance's descriptors, for a successor to share it.
    pub shared: Shared,
    pub logger: Option<aya_log::EbpfLogger<super::watch::TracingLog>>,
}

/// The descriptors that make up a loaded instance, as a binary upgrade passes them: a
/// process holding them shares the instance (the verdict stays attached to the
/// attached map as long as some process holds that map).
pub struct Shared {
    pub flows: OwnedFd,
    pub ctl: OwnedFd,
    pub targets: OwnedFd,
    pub attached: OwnedFd,
    pub events: OwnedFd,
    pub sockops_prog: OwnedFd,
    pub segments_prog: OwnedFd,
}

impl Shared {
    /// In the order [`Shared::from_fds`] takes them.
    pub fn fds(&self) -> [&OwnedFd; 7] {
        [
            &self.flows,
            &self.ctl,
            &self.targets,
            &self.attached,
            &self.events,
            &self.sockops_prog,
            &self.segments_prog,
        ]
    }

    pub fn from_fds(fds: Vec<OwnedFd>) -> anyhow::Result<Shared> {
        let n = fds.len();
        let [flows, ctl, targets, attached, events, sockops_prog, segments_prog] =
            <[OwnedFd; 7]>::try_from(fds)
                .map_err(|_| anyhow::anyhow!("came with {n} descriptors, not 7"))?;
        Ok(Shared {
            flows,
            ctl,
            targets,
            attached,
            events,
            sockops_prog,
            segments_prog,
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Shared> {
        let [flows, ctl, targets, attached, events, sockops_prog, segments_prog] =
            self.fds().map(OwnedFd::try_clone);
        Ok(Shared {
            flows: flows?,
            ctl: ctl?,
            targets: targets?,
            attached: attached?,
            events: events?,
            sockops_prog: sockops_prog?,
            segments_prog: segments_prog?,
        })
    }
}

/// An instance another process loaded, taken over: its maps, and this process's own
/// attachments of its cgroup programs (the predecessor's end with it).
pub struct Adopted {
    pub maps: Maps,
    pub links: [OwnedFd; 2],
}

pub fn adopt(shared: &Shared, params: &Params) -> anyhow::Result<Adopted> {
    let map = |fd: &OwnedFd, name: &str| -> anyhow::Result<MapData> {
        let fd = fd
            .try_clone()
            .with_context(|| format!("duplicating map {name}"))?;
        MapData::from_fd(fd).with_context(|| format!("map {name} from the running process"))
    };
    let cgroup = own_cgroup()?;
    let dir = std::fs::File::open(&cgroup)
        .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let sockops_link = super::sys::cgroup_link(
        shared.sockops_prog.as_fd(),
        dir.as_fd(),
        super::sys::CgroupHook::SockOps,
    )
    .with_context(|| format!("attaching the sock_ops program to {}", cgroup.display()))?;
    let segments_link = super::sys::cgroup_link(
        shared.segments_prog.as_fd(),
        dir.as_fd(),
        super::sys::CgroupHook::Setsockopt,
    )
    .with_context(|| format!("attaching the setsockopt program to {}", cgroup.display()))?;
    Ok(Adopted {
        maps: Maps::new(
            map(&shared.flows, FLOWS_MAP)?,
            map(&shared.ctl, CTL_MAP)?,
            map(&shared.targets, TARGETS_MAP)?,
            map(&shared.attached, ATTACHED_MAP)?,
            params.max_sockets,
        ),
        links: [sockops_link, segments_link],
    })
}

/// Kernels before 6.12 load the programs but refuse the socket option the setsockopt
/// program sets from its cgroup hook (TCP_BPF_SOCK_OPS_CB_FLAGS), which every move into
/// the kernel needs: found once here, so the kernel path counts as unavailable, rather
/// than as a failed move per session.
fn probe_segments() -> anyhow::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .context("a TCP socket to probe the setsockopt program with")?;
    super::sys::watch_segments(socket.as_raw_fd()).context(
        "this kernel lets the setsockopt program load but not set the socket option every move into the kernel needs (TCP_BPF_SOCK_OPS_CB_FLAGS from a setsockopt program: Linux 6.12 or later)",
    )
}

/// The events ring buffer from its descriptor. Its reader's position is read from the
/// ring when this is called: only once the previous reader stopped.
pub fn ring(events: &OwnedFd) -> anyhow::Result<RingBuf<MapData>> {
    let data = MapData::from_fd(events.try_clone()?).context("events ring buffer")?;
    RingBuf::try_from(Map::RingBuf(data)).context("events ring buffer")
}

/// Names the object and the settings it was loaded with: a new binary whose identity is
/// the same can take over a running instance, whose maps it reads the same way.
pub fn identity(params: &Params) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    params.max_sockets.hash(&mut h);
    params.log_level.hash(&mut h);
    format!("{:016x}-{:016x}", object_identity(PROGRAM), h.finish())
}

/// What the kernel runs of an object: the sections it loads (programs, map
/// definitions, read-only data, license), their relocations, and the names of global
/// symbols (maps and programs are found by name). Debug information, BTF and local
/// symbol names are left out: they carry build paths and crate hashes, so the same
/// source built in another directory names the same thing. An object that does not
/// parse is named by all its bytes.
fn object_identity(bytes: &[u8]) -> u64 {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionFlags};
    const SHF_ALLOC: u64 = 0x2;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let Ok(file) = object::File::parse(bytes) else {
        bytes.hash(&mut h);
        return h.finish();
    };
    for section in file.sections() {
        let loaded =
            matches!(section.flags(), SectionFlags::Elf { sh_flags } if sh_flags & SHF_ALLOC != 0);
        if !loaded {
            continue;
        }
        section.name_bytes().unwrap_or_default().hash(&mut h);
        section.data().unwrap_or_default().hash(&mut h);
        for (offset, reloc) in section.relocations() {
            offset.hash(&mut h);
            format!("{:?}", reloc.flags()).hash(&mut h);
            reloc.addend().hash(&mut h);
            if let RelocationTarget::Symbol(index) = reloc.target() {
                if let Ok(symbol) = file.symbol_by_index(index) {
                    if symbol.is_global() {
                        symbol.name_bytes().unwrap_or_default().hash(&mut h);
                    }
                    format!("{:?}", symbol.section_index()).hash(&mut h);
                    symbol.address().hash(&mut h);
                }
            }
        }
    }
    for symbol in file.symbols().filter(|s| s.is_global()) {
        symbol.name_bytes().unwrap_or_default().hash(&mut h);
        symbol.address().hash(&mut h);
    }
    h.finish()
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
    let offsets = super::offsets::from_kernel()?;
    let mut ebpf = EbpfLoader::new()
        .override_global(aya_log::LEVEL, &params.log_level, false)
        .override_global(SKB_SK_OFF_GLOBAL, &offsets.skb_sk, true)
        .override_global(SKB_CB_OFF_GLOBAL, &offsets.skb_cb, true)
        .override_global(TCP_COPIED_SEQ_OFF_GLOBAL, &offsets.tcp_copied_seq, true)
        .override_global(TCP_BYTES_ACKED_OFF_GLOBAL, &offsets.tcp_bytes_acked, true)
        .override_global(TCP_WRITE_SEQ_OFF_GLOBAL, &offsets.tcp_write_seq, true)
        .override_global(TCP_SND_UNA_OFF_GLOBAL, &offsets.tcp_snd_una, true)
        .map_max_entries(FLOWS_MAP, params.max_sockets)
        .map_max_entries(CTL_MAP, params.max_sockets)
        .map_max_entries(TARGETS_MAP, params.max_sockets)
        .map_max_entries(ATTACHED_MAP, params.max_sockets)
        .load(PROGRAM)
        .context("loading the eBPF object")?;
    let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, super::watch::TracingLog).ok();
    let attached = data(take(&mut ebpf, ATTACHED_MAP)?, ATTACHED_MAP)?;
    let verdict = {
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
        let link = prog
            .attach(sock_fd)
            .context("attaching the verdict program")?;
        prog.take_link(link)
            .context("the verdict program's attachment")?
    };
    let cgroup = own_cgroup()?;
    let sockops_prog = {
        let prog: &mut SockOps = ebpf
            .program_mut(SOCKOPS_PROG)
            .with_context(|| format!("program {SOCKOPS_PROG} missing"))?
            .try_into()
            .context("sock_ops program type")?;
        prog.load()
            .context("loading the sock_ops program (verifier)")?;
        let dir = std::fs::File::open(&cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        // A bpf link (what aya creates on this kernel) must be made without flags, and
        // links never exclude each other: other daemons can attach to the same cgroup.
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching the sock_ops program to {}", cgroup.display()))?;
        prog.fd()
            .context("the sock_ops program's fd")?
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the sock_ops program's fd")?
    };
    let segments_prog = {
        let prog: &mut CgroupSockopt = ebpf
            .program_mut(SEGMENTS_PROG)
            .with_context(|| format!("program {SEGMENTS_PROG} missing"))?
            .try_into()
            .context("setsockopt program type")?;
        prog.load()
            .context("loading the setsockopt program (verifier)")?;
        let dir = std::fs::File::open(&cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching the setsockopt program to {}", cgroup.display()))?;
        prog.fd()
            .context("the setsockopt program's fd")?
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the setsockopt program's fd")?
    };
    probe_segments()?;
    let flows = data(take(&mut ebpf, FLOWS_MAP)?, FLOWS_MAP)?;
    let ctl = data(take(&mut ebpf, CTL_MAP)?, CTL_MAP)?;
    let targets = data(take(&mut ebpf, TARGETS_MAP)?, TARGETS_MAP)?;
    let events = RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?).context("events ring buffer")?;
    let dup = |m: &MapData| m.fd().as_fd().try_clone_to_owned();
    let shared = Shared {
        flows: dup(&flows)?,
        ctl: dup(&ctl)?,
        targets: dup(&targets)?,
        attached: dup(&attached)?,
        events: events.as_fd().try_clone_to_owned()?,
        sockops_prog,
        segments_prog,
    };
    Ok(Loaded {
        ebpf,
        verdict,
        maps: Maps::new(flows, ctl, targets, attached, params.max_sockets),
        events,
        shared,
        logger,
    })
}

/// The daemon's own cgroup v2 directory: its sockets are the ones the sock_ops program
/// must see (in the root cgroup that is every socket of the host).
fn own_cgroup() -> anyhow::Result<std::path::PathBuf> {
    let cgroups =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry in /proc/self/cgroup")?;
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let root = cgroup2_mount(&mounts).context("cgroup2 is not mounted")?;
    Ok(std::path::Path::new(root).join(rel.trim_start_matches('/')))
}

/// The mount point of the first cgroup2 file system in a mountinfo listing.
fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then_some(left.split_whitespace().nth(4)?)
    })
}

#[cfg(test)]
mod tests {
    use super::{cgroup2_mount, object_identity, PROGRAM};
    use object::{Object, ObjectSection};

    /// A copy of the program with one byte of the named section changed.
    fn with_byte_changed(section: &str) -> Vec<u8> {
        let file = object::File::parse(PROGRAM).unwrap();
        let (at, len) = file
            .section_by_name(section)
            .and_then(|s| s.file_range())
            .unwrap_or_else(|| panic!("no section {section}"));
        assert!(len > 0);
        let mut copy = PROGRAM.to_vec();
        copy[(at + len / 2) as usize] ^= 0x5a;
        copy
    }

    /// A build elsewhere changes debug information (paths), not what the kernel runs; a
    /// changed instruction changes the identity.
    #[test]
    fn the_identity_follows_the_code_not_the_debug_information() {
        let id = object_identity(PROGRAM);
        assert_eq!(id, object_identity(PROGRAM), "deterministic");
        assert_eq!(id, object_identity(&with_byte_changed(".debug_str")));
        assert_ne!(
            id,
            object_identity(&with_byte_changed("sk_skb/stream_verdict"))
        );
        assert_ne!(id, object_identity(&with_byte_changed("maps")));
    }

    /// The kernel path's socket option reaches its setsockopt program and no further:
    /// accepted while the program is attached, unknown to the kernel once it is gone (so
    /// a session cannot enter the kernel without the segment callback it needs).
    #[test]
    fn the_segments_option_exists_only_with_the_program() {
        if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
            eprintln!("the_segments_option_exists_only_with_the_program: skipped by request (L4LB_NO_EBPF=1)");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let params = super::Params {
            max_sockets: 1024,
            log_level: aya_log::Level::Warn as u8,
        };
        let loaded = super::load(&params).expect("the kernel path loads (L4LB_NO_EBPF=1 skips)");
        super::super::sys::watch_segments(fd).expect("the program takes the option");
        drop(loaded);
        let gone = super::super::sys::watch_segments(fd).expect_err(
            "the kernel itself refuses the option (is another l4lb attached to this cgroup?)",
        );
        assert_eq!(gone.raw_os_error(), Some(libc::ENOPROTOOPT), "{gone}");
    }

    #[test]
    fn finds_the_cgroup2_mount_point() {
        let info = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
                    35 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:14 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(info), Some("/sys/fs/cgroup/unified"));
        assert_eq!(cgroup2_mount("30 25 0:26 / /x rw - cgroup c rw\n"), None);
    }
}
