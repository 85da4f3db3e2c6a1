//! Byte offset of a field of a kernel struct, read from the kernel's own BTF
//! (/sys/kernel/btf/vmlinux). Rust eBPF has no CO-RE field relocations, so the daemon
//! finds `tcp_sock.write_seq` here and hands the offset to the program as a global.
//! aya's BTF type does not expose struct members, hence this small reader.

use anyhow::{bail, Context};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Byte range of the members (struct/union) in the type section.
    members: std::ops::Range<usize>,
}

struct Btf<'a> {
    types: Vec<Type>,
    type_data: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(data: &[u8], off: usize) -> anyhow::Result<u32> {
    let bytes = data.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> anyhow::Result<Btf<'a>> {
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(BTF_MAGIC) {
            bail!("not little-endian BTF");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let type_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF type section out of bounds")?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?;
        // Type ids start at 1; index 0 stands for void.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: 0..0,
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,     // int, var, decl_tag
                3 => 12,              // array
                4 | 5 => 12 * vlen,   // struct, union
                6 | 13 => 8 * vlen,   // enum, func_proto
                15 | 19 => 12 * vlen, // datasec, enum64
                2 | 7..=12 | 16 | 18 => 0,
                other => bail!("unknown BTF kind {other}"),
            };
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 == 1,
                size_or_type,
                members: at..at + extra,
            });
            at += extra;
        }
        Ok(Btf {
            types,
            type_data,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset and type of `field` in `t`, looking into anonymous members.
    fn member(&self, t: &Type, field: &[u8], depth: u32) -> anyhow::Result<Option<(u32, &Type)>> {
        if depth > 8 {
            return Ok(None);
        }
        for m in t.members.clone().step_by(12) {
            let name_off = u32_at(self.type_data, m)?;
            let type_id = u32_at(self.type_data, m + 4)?;
            let raw_offset = u32_at(self.type_data, m + 8)?;
            let bit_offset = if t.kind_flag {
                raw_offset & 0x00ff_ffff
            } else {
                raw_offset
            };
            let Some(mt) = self.resolve(type_id) else {
                continue;
            };
            if name_off == 0 && matches!(mt.kind, KIND_STRUCT | KIND_UNION) {
                if let Some((inner, ty)) = self.member(mt, field, depth + 1)? {
                    return Ok(Some((bit_offset + inner, ty)));
                }
            } else if self.name(name_off) == field {
                return Ok(Some((bit_offset, mt)));
            }
        }
        Ok(None)
    }
}

/// Byte offset of the 4-byte integer `field` in `struct name`.
pub fn u32_field_offset(btf_data: &[u8], name: &str, field: &str) -> anyhow::Result<u32> {
    let btf = Btf::parse(btf_data)?;
    let st = btf
        .types
        .iter()
        .find(|t| t.kind == KIND_STRUCT && btf.name(t.name_off) == name.as_bytes())
        .with_context(|| format!("struct {name} not in BTF"))?;
    let (bits, ty) = btf
        .member(st, field.as_bytes(), 0)?
        .with_context(|| format!("{name}.{field} not in BTF"))?;
    if ty.kind != KIND_INT || ty.size_or_type != 4 || bits % 8 != 0 {
        bail!("{name}.{field} is not a byte-aligned 4-byte integer");
    }
    Ok(bits / 8)
}

/// Offset of `tcp_sock.write_seq` in the running kernel.
pub fn write_seq_offset() -> anyhow::Result<u32> {
    let path = "/sys/kernel/btf/vmlinux";
    let data =
        std::fs::read(path).with_context(|| format!("cannot read {path} (kernel without BTF?)"))?;
    u32_field_offset(&data, "tcp_sock", "write_seq")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct s { int a; union { int b; int c; }; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0c\0int\0".to_vec();
        let mut types = Vec::new();
        let mut t = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (size 4)
        t(&[9, KIND_INT << 24, 4, 32]);
        // 2: struct s { a @0; <anon> @32 }
        t(&[1, (KIND_STRUCT << 24) | 2, 8, 3, 1, 0, 0, 3, 32]);
        // 3: anonymous union { b @0; c @0 }
        t(&[0, (KIND_UNION << 24) | 2, 4, 5, 1, 0, 7, 1, 0]);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let b = blob();
        assert_eq!(u32_field_offset(&b, "s", "a").unwrap(), 0);
        assert_eq!(u32_field_offset(&b, "s", "c").unwrap(), 4);
        assert!(u32_field_offset(&b, "s", "d").is_err());
        assert!(u32_field_offset(&b, "t", "a").is_err());
    }

    #[test]
    fn running_kernel_has_write_seq() {
        if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            let off = write_seq_offset().unwrap();
            assert!(off > 0 && off < 4096, "{off}");
        }
    }
}
