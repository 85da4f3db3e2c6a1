//! Where the verdict finds kernel fields, read from the running kernel's BTF: Rust eBPF
//! has no CO-RE relocations, and these structures change between kernel builds.

use anyhow::Context;
use btf_rs::{Backend, Btf, Type};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets handed to the program as read-only globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    pub skb_sk: u32,
    pub skb_cb: u32,
    pub tcp_copied_seq: u32,
    pub tcp_bytes_acked: u32,
    pub tcp_write_seq: u32,
    pub tcp_snd_una: u32,
}

pub fn from_kernel() -> anyhow::Result<Offsets> {
    let btf = Btf::from_file_with_backend(VMLINUX_BTF, Backend::Mmap)
        .with_context(|| format!("reading kernel BTF from {VMLINUX_BTF}"))?;
    Ok(Offsets {
        skb_sk: field(&btf, "sk_buff", "sk")?,
        skb_cb: field(&btf, "sk_buff", "cb")?,
        tcp_copied_seq: field(&btf, "tcp_sock", "copied_seq")?,
        tcp_bytes_acked: field(&btf, "tcp_sock", "bytes_acked")?,
        tcp_write_seq: field(&btf, "tcp_sock", "write_seq")?,
        tcp_snd_una: field(&btf, "tcp_sock", "snd_una")?,
    })
}

/// Byte offset of `member` in struct `name`, looking into anonymous structs and unions.
fn field(btf: &Btf, name: &str, member: &str) -> anyhow::Result<u32> {
    let types = btf
        .resolve_types_by_name(name)
        .with_context(|| format!("kernel BTF has no type {name}"))?;
    let s = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .with_context(|| format!("kernel BTF has no struct {name}"))?;
    let bits = find(btf, s, member)?
        .with_context(|| format!("kernel struct {name} has no field {member}"))?;
    anyhow::ensure!(bits % 8 == 0, "field {name}.{member} is not byte-aligned");
    Ok(bits / 8)
}

fn find(btf: &Btf, s: &btf_rs::Struct, member: &str) -> anyhow::Result<Option<u32>> {
    for m in &s.members {
        let name = btf.resolve_name(m).context("kernel BTF member name")?;
        if name == member {
            return Ok(Some(m.bit_offset()));
        }
        if name.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = btf
                .resolve_chained_type(m)
                .context("kernel BTF member type")?
            {
                if let Some(off) = find(btf, &inner, member)? {
                    return Ok(Some(m.bit_offset() + off));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_fields_of_the_running_kernel() {
        if std::env::var("L4LB_NO_EBPF").is_ok_and(|v| v == "1") {
            eprintln!("finds_fields_of_the_running_kernel: skipped by request (L4LB_NO_EBPF=1)");
            return;
        }
        let o = super::from_kernel().expect("kernel BTF (needed by the kernel path)");
        // Layouts this module must reproduce: `cb` follows the list pointers, `sk`
        // and the timestamp (stable for years), and TCP state lies deep in tcp_sock.
        assert!(o.skb_sk > 0 && o.skb_sk < o.skb_cb, "{o:?}");
        assert_eq!(o.skb_cb % 8, 0, "{o:?}");
        assert!(o.tcp_copied_seq > 1000, "{o:?}");
        // Fields of one cache-line group in tcp_sock, 4 or 8 bytes each, all distinct.
        let tcp = [
            o.tcp_copied_seq,
            o.tcp_bytes_acked,
            o.tcp_write_seq,
            o.tcp_snd_una,
        ];
        assert!(tcp.iter().all(|&f| f > 1000 && f < 4096), "{o:?}");
        assert!((1..tcp.len()).all(|k| !tcp[..k].contains(&tcp[k])), "{o:?}");
    }
}
