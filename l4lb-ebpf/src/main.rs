//! l4lb's SK_SKB stream-verdict program. Built for `bpfel-unknown-none` by
//! `l4lb-user/build.rs`; on the host this binary is an empty stub so the workspace
//! builds, lints and tests as usual.
#![cfg_attr(
    target_arch = "bpf",
    no_std,
    no_main,
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
