//! The capabilities the kernel path needs, found by measurement: tests/capabilities.rs
//! runs the daemon as an unprivileged user with exactly this set (the programs load and
//! a session is spliced) and with each one removed (it refuses to start and names the
//! missing one), and checks that deploy/ grants this same set. That test includes this
//! file by path, so it uses nothing else of the crate.

use caps::{CapSet, Capability};

/// Each capability the kernel path needs and what needs it.
pub const KERNEL_PATH: &[(Capability, &str)] = &[
    (
        Capability::CAP_BPF,
        "bpf(2): creating the maps and loading the programs",
    ),
    (
        Capability::CAP_PERFMON,
        "the verdict program reads kernel structures at BTF offsets (pointer arithmetic, bpf_probe_read_kernel)",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "creating sockhash maps; SK_SKB and sock_ops programs are networking BPF",
    ),
];

/// Not part of the set: only a listener below port 1024
/// (`net.ipv4.ip_unprivileged_port_start`) needs it.
pub const LOW_PORTS: Capability = Capability::CAP_NET_BIND_SERVICE;

/// The capabilities of [`KERNEL_PATH`] missing from this process's effective set, with
/// their reasons. Empty when the set cannot be read, and with CAP_SYS_ADMIN, which the
/// kernel accepts in place of each of them.
pub fn missing_for_kernel_path() -> Vec<(Capability, &'static str)> {
    let Ok(effective) = caps::read(None, CapSet::Effective) else {
        return Vec::new();
    };
    if effective.contains(&Capability::CAP_SYS_ADMIN) {
        return Vec::new();
    }
    KERNEL_PATH
        .iter()
        .filter(|(cap, _)| !effective.contains(cap))
        .copied()
        .collect()
}

/// "CAP_PERFMON (why), CAP_BPF (why)"; `None` when nothing is missing.
pub fn describe_missing(missing: &[(Capability, &str)]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(cap, why)| format!("{cap} ({why})"))
        .collect();
    Some(format!(
        "the process lacks {} in its effective capability set",
        names.join(", ")
    ))
}
