//! Builds the eBPF programs (`l4lb-ebpf`: the splice verdict; `l4lb-xdp`: the access
//! filter; target bpfel-unknown-none) with the nightly
//! toolchain and bpf-linker; the daemon embeds the result with `include_bytes_aligned!`.
//! Needs `rustup toolchain install nightly --component rust-src` and
//! `cargo install bpf-linker`. `AYA_BUILD_SKIP=1` builds without it: the daemon then
//! embeds an empty object and reports the kernel path unavailable at start.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("..").join("l4lb-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        for object in ["l4lb-ebpf", "l4lb-xdp"] {
            let out = PathBuf::from(std::env::var("OUT_DIR")?).join(object);
            if !out.exists() {
                std::fs::write(out, [])?;
            }
        }
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "l4lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
