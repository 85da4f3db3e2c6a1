//! l4lb: a layer-4 (TCP/UDP) load balancer with nginx stream semantics whose
//! established TCP sessions are spliced in the kernel by eBPF.
//!
//! The daemon's modules live in this library so that the `l4lb` binary (the CLI), the
//! fuzz targets (`fuzz/`) and the property tests share one build of them. Only what the
//! CLI and the fuzz targets call is public.

mod admin;
mod capabilities;
pub mod config;
pub mod daemon;
mod discovery;
pub mod fuzz_targets;
mod health;
pub mod import_nginx;
pub mod logging;
mod metrics;
mod notify;
pub mod panic;
mod proxy;
mod runtime;
mod session;
mod splice;
pub mod upgrade;
mod upstream;
mod xdp;
