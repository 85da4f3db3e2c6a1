//! l4lb's XDP access filter: drops packets whose source `[[server]] access` rules deny,
//! before the kernel's TCP stack sees them. Built for `bpfel-unknown-none` by
//! `l4lb-user/build.rs`; on the host this binary is an empty stub.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
