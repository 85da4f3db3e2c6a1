//! Builds the eBPF program (`l4lb-ebpf`, target bpfel-unknown-none) with the nightly
//! toolchain and bpf-linker; the daemon embeds the result with `include_bytes_aligned!`.
//! Needs: `rustup toolchain install nightly --component rust-src` and
//! `cargo install bpf-linker` (see the README's build section).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("..").join("l4lb-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "l4lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
