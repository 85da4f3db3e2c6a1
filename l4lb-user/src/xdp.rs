//! The XDP access filter (`[global] xdp_interface`): the listeners' `deny` rules
//! enforced on that interface before the TCP handshake, so a denied source costs no
//! socket, no accept and no userspace work. The userspace check stays in force as well
//! (traffic on other interfaces, loopback).
//!
//! nginx's rules are first-match; the kernel's LPM trie gives the longest matching
//! prefix. Prefixes either nest or are disjoint, so dropping every rule that an
//! earlier rule's prefix already covers makes the two agree.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use l4lb_ebpf::{
    AccessKey4, AccessKey6, ACCESS4_MAP, ACCESS6_MAP, ACCESS_ALLOW, ACCESS_DENY,
    ACCESS_KEY_HEAD_BITS, XDP_DROPS_MAP, XDP_PROG,
};
use tracing::info;

use crate::config::{Protocol, ServerConfig};

/// The filter program, built by build.rs for bpfel-unknown-none.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/l4lb-xdp"));

pub struct XdpFilter {
    interface: String,
    access4: LpmTrie<MapData, AccessKey4, u8>,
    access6: LpmTrie<MapData, AccessKey6, u8>,
    drops: PerCpuArray<MapData, u64>,
    /// Owns the program and its link: dropping it detaches the filter.
    ebpf: Ebpf,
    /// The attachment, while there is one.
    link: Option<XdpLinkId>,
}

/// The trie entries for a set of listeners.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub v4: Vec<(u32, AccessKey4, u8)>,
    pub v6: Vec<(u32, AccessKey6, u8)>,
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

/// Turns the listeners' ordered rules into LPM entries keyed by protocol and port.
pub fn compile(servers: &[ServerConfig]) -> Compiled {
    let mut out = Compiled::default();
    // Behind a PROXY-protocol balancer the packets come from the balancer, and the
    // rules are for the client its header names: userspace applies them.
    for server in servers
        .iter()
        .filter(|s| !s.access.is_empty() && !s.proxy_protocol_in)
    {
        let (proto, port) = (proto(server.protocol), server.listen.port().to_be_bytes());
        let mut covered: Vec<IpNet> = Vec::new();
        for rule in &server.access {
            let prefixes: Vec<IpNet> = match rule.prefix {
                Some(p) => vec![p],
                // `all`: both families.
                None => [
                    IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).ok(),
                    IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).ok(),
                ]
                .into_iter()
                .flatten()
                .collect(),
            };
            for prefix in prefixes {
                // An earlier rule decides everything this one would.
                if covered.iter().any(|c| c.contains(&prefix)) {
                    continue;
                }
                covered.push(prefix);
                let action = if rule.allow {
                    ACCESS_ALLOW
                } else {
                    ACCESS_DENY
                };
                let bits = ACCESS_KEY_HEAD_BITS + u32::from(prefix.prefix_len());
                match prefix.addr() {
                    IpAddr::V4(a) => out.v4.push((
                        bits,
                        AccessKey4 {
                            proto,
                            port,
                            addr: a.octets(),
                        },
                        action,
                    )),
                    IpAddr::V6(a) => out.v6.push((
                        bits,
                        AccessKey6 {
                            proto,
                            port,
                            addr: a.octets(),
                        },
                        action,
                    )),
                }
            }
        }
    }
    out
}

impl XdpFilter {
    /// Loads the filter, attaches it to `interface` and fills it from `servers`.
    pub fn attach(interface: &str, servers: &[ServerConfig]) -> anyhow::Result<XdpFilter> {
        let mut ebpf = EbpfLoader::new()
            .load(PROGRAM)
            .context("cannot load the XDP access filter")?;
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROG)
            .context("XDP program missing from its object")?
            .try_into()?;
        prog.load().context("the kernel refused the XDP program")?;
        let link = prog
            .attach(interface, XdpMode::Default)
            .with_context(|| format!("cannot attach the XDP access filter to {interface}"))?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the XDP object"))
        };
        let access4 = LpmTrie::try_from(take(&mut ebpf, ACCESS4_MAP)?)?;
        let access6 = LpmTrie::try_from(take(&mut ebpf, ACCESS6_MAP)?)?;
        let drops = PerCpuArray::try_from(take(&mut ebpf, XDP_DROPS_MAP)?)?;
        let mut filter = XdpFilter {
            interface: interface.to_string(),
            access4,
            access6,
            drops,
            ebpf,
            link: Some(link),
        };
        filter.update(servers)?;
        Ok(filter)
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(XDP_PROG)
            .context("XDP program missing from its object")?
            .try_into()?)
    }

    /// Takes the filter off its interface, which holds one XDP program: a binary
    /// upgrade's new process attaches its own. Deny rules keep applying in userspace.
    pub fn detach(&mut self) -> anyhow::Result<()> {
        if let Some(link) = self.link.take() {
            self.program()?.detach(link)?;
        }
        Ok(())
    }

    /// Puts the filter back after [`XdpFilter::detach`] (an upgrade that did not happen).
    pub fn reattach(&mut self) -> anyhow::Result<()> {
        if self.link.is_none() {
            let interface = self.interface.clone();
            let link = self.program()?.attach(&interface, XdpMode::Default)?;
            self.link = Some(link);
        }
        Ok(())
    }

    /// Makes the tries hold exactly the entries for `servers` (a reload): new entries
    /// are written before stale ones go, so no rule is ever missing in between.
    pub fn update(&mut self, servers: &[ServerConfig]) -> anyhow::Result<()> {
        let compiled = compile(servers);
        let (n4, n6) = (compiled.v4.len(), compiled.v6.len());
        sync(&mut self.access4, compiled.v4).context("updating the IPv4 access trie")?;
        sync(&mut self.access6, compiled.v6).context("updating the IPv6 access trie")?;
        info!(interface = %self.interface, ipv4_entries = n4, ipv6_entries = n6, "XDP access filter updated");
        Ok(())
    }

    /// Packets dropped so far, all CPUs.
    pub fn drops(&self) -> u64 {
        self.drops
            .get(&0, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}

fn sync<K: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, K, u8>,
    entries: Vec<(u32, K, u8)>,
) -> anyhow::Result<()> {
    let wanted: Vec<(u32, K)> = entries.iter().map(|(bits, k, _)| (*bits, *k)).collect();
    for (bits, key, action) in entries {
        trie.insert(&Key::new(bits, key), action, 0)?;
    }
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
        .collect();
    for key in stale {
        trie.remove(&key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessRule;

    fn server(port: u16, rules: &[&str]) -> ServerConfig {
        let mut s = crate::config::parse(&format!(
            "[upstream.u]\nservers = [{{ address = \"127.0.0.1:1\" }}]\n[[server]]\nlisten = \"0.0.0.0:{port}\"\nproxy_pass = \"u\"\n"
        ))
        .expect("config")
        .servers
        .remove(0);
        s.access = rules
            .iter()
            .map(|r| AccessRule::parse(r).unwrap())
            .collect();
        s
    }

    #[test]
    fn shadowed_rules_are_left_out_so_longest_prefix_means_first_match() {
        let c = compile(&[server(
            3307,
            &[
                "deny 10.0.0.0/8",
                "allow 10.1.0.0/16",
                "allow 192.0.2.1",
                "deny all",
            ],
        )]);
        let port = 3307u16.to_be_bytes();
        let v4: Vec<(u32, [u8; 4], u8)> = c.v4.iter().map(|(b, k, a)| (*b, k.addr, *a)).collect();
        assert_eq!(
            v4,
            vec![
                (24 + 8, [10, 0, 0, 0], ACCESS_DENY),
                (24 + 32, [192, 0, 2, 1], ACCESS_ALLOW),
                (24, [0, 0, 0, 0], ACCESS_DENY),
            ]
        );
        assert!(c.v4.iter().all(|(_, k, _)| k.port == port && k.proto == 6));
        assert_eq!(c.v6.len(), 1, "deny all covers IPv6 too: {:?}", c.v6);
        assert_eq!(c.v6[0].0, 24);
        assert!(compile(&[server(1, &[])]).v4.is_empty());
        // Behind a PROXY-protocol balancer the rules are for the carried client.
        let mut behind = server(3307, &["deny all"]);
        behind.proxy_protocol_in = true;
        assert_eq!(compile(&[behind]), Compiled::default());
    }
}
