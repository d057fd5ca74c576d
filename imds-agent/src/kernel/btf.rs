//! Member offsets of kernel structs, read straight from a BTF blob
//! (`/sys/kernel/btf/vmlinux`; format: the kernel's Documentation/bpf/btf.rst).
//!
//! The node backstop needs four offsets. The BTF crates that build a full type table cost
//! tens of megabytes for a kernel's 150,000 types, a large part of the agent's memory limit
//! (docs/scale.md), and aya-obj keeps its member API private. This reader keeps the
//! blob and one index entry per type, and walks only the structs it is asked about.
use std::fmt;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Anonymous structs and unions nest this deep at most (`sk_buff` needs 3).
const MAX_NESTING: usize = 8;

/// Why a blob could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BtfError(&'static str);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed BTF: {}", self.0)
    }
}

impl std::error::Error for BtfError {}

/// A parsed blob: where each type starts, and its strings.
pub(super) struct StructOffsets<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Start of type `id` in `types` is `starts[id - 1]` (id 0 is `void`).
    starts: Vec<u32>,
}

impl<'a> StructOffsets<'a> {
    pub(super) fn parse(blob: &'a [u8]) -> Result<StructOffsets<'a>, BtfError> {
        let u32_at = |at: usize| read_u32(blob, at).ok_or(BtfError("truncated header"));
        let magic = blob.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(MAGIC) {
            return Err(BtfError("bad magic (not a little-endian BTF blob)"));
        }
        let hdr_len = u32_at(4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError("header too short"));
        }
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError("section offset overflows"))?;
            let end = start.checked_add(len).ok_or(BtfError("section length overflows"))?;
            blob.get(start..end).ok_or(BtfError("section past the end of the blob"))
        };
        let types = section(u32_at(8)? as usize, u32_at(12)? as usize)?;
        let strings = section(u32_at(16)? as usize, u32_at(20)? as usize)?;
        let mut starts = Vec::new();
        let mut at = 0;
        while at < types.len() {
            starts.push(u32::try_from(at).map_err(|_| BtfError("type section too large"))?);
            let info = read_u32(types, at + 4).ok_or(BtfError("truncated type"))?;
            at += 12 + extra_len(info).ok_or(BtfError("unknown type kind"))?;
        }
        if at != types.len() {
            return Err(BtfError("type section ends inside a type"));
        }
        Ok(StructOffsets { types, strings, starts })
    }

    /// Byte offset of `member` in the struct named `strukt`, looking through anonymous
    /// structs and unions; `None` if there is no such struct or member, or the member is a
    /// bitfield.
    #[must_use]
    pub(super) fn offset_of(&self, strukt: &str, member: &str) -> Option<u32> {
        let id = (1..=self.starts.len() as u32).find(|id| {
            self.ty(*id)
                .is_some_and(|t| t.kind() == KIND_STRUCT && t.vlen() > 0 && self.name(t.name_off) == Some(strukt))
        })?;
        self.member_bits(id, member, 0).filter(|bits| bits % 8 == 0).map(|bits| bits / 8)
    }

    fn member_bits(&self, id: u32, member: &str, depth: usize) -> Option<u32> {
        if depth > MAX_NESTING {
            return None;
        }
        let t = self.ty(id)?;
        let members = self.types.get(t.at + 12..t.at + 12 + 12 * t.vlen() as usize)?;
        for m in members.chunks_exact(12) {
            let (name_off, type_id, raw_offset) = (read_u32(m, 0)?, read_u32(m, 4)?, read_u32(m, 8)?);
            // With kind_flag set, the top 8 bits hold a bitfield's size.
            let bits = if t.info >> 31 == 1 { raw_offset & 0x00ff_ffff } else { raw_offset };
            if name_off == 0 {
                let inner = self.resolve(type_id)?;
                let kind = self.ty(inner)?.kind();
                if kind == KIND_STRUCT || kind == KIND_UNION {
                    if let Some(found) = self.member_bits(inner, member, depth + 1) {
                        return Some(bits + found);
                    }
                }
            } else if self.name(name_off) == Some(member) {
                let bitfield = t.info >> 31 == 1 && raw_offset >> 24 != 0;
                return (!bitfield).then_some(bits);
            }
        }
        None
    }

    /// `id` with typedefs and qualifiers peeled off.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..MAX_NESTING {
            let t = self.ty(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_id,
                _ => return Some(id),
            }
        }
        None
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.starts.get(id.checked_sub(1)? as usize)? as usize;
        Some(Type {
            at,
            name_off: read_u32(self.types, at)?,
            info: read_u32(self.types, at + 4)?,
            size_or_id: read_u32(self.types, at + 8)?,
        })
    }

    fn name(&self, off: u32) -> Option<&str> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }
}

/// The fixed part of one type.
struct Type {
    at: usize,
    name_off: u32,
    info: u32,
    size_or_id: u32,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> u32 {
        self.info & 0xffff
    }
}

/// Bytes that follow a type's fixed 12, by kind; `None` for a kind this reader does not know.
fn extra_len(info: u32) -> Option<usize> {
    let vlen = (info & 0xffff) as usize;
    Some(match (info >> 24) & 0x1f {
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7..=12 | 16 | 18 => 0,
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION (members), DATASEC (var_secinfo), ENUM64
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO (params)
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob in BTF's layout: `types` (id 1…) and a string table built from `names`.
    fn blob(types: &[Vec<u32>], names: &[&str]) -> Vec<u8> {
        let mut strings = vec![0u8];
        for n in names {
            strings.extend_from_slice(n.as_bytes());
            strings.push(0);
        }
        let type_bytes: Vec<u8> = types.iter().flatten().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24, 0, type_bytes.len() as u32, type_bytes.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&type_bytes);
        out.extend_from_slice(&strings);
        out
    }

    /// Offset of `name` in the string table `blob` builds from `names`.
    fn off(names: &[&str], name: &str) -> u32 {
        let mut at = 1;
        for n in names {
            if *n == name {
                return at;
            }
            at += n.len() as u32 + 1;
        }
        panic!("{name} not in the table")
    }

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (u32::from(kind_flag) << 31) | (kind << 24) | vlen
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        let names = ["int", "skb", "head", "network_header", "dev", "grp", "flags", "fwd"];
        let n = |s| off(&names, s);
        let types = vec![
            // 1: int (4 bytes)
            vec![n("int"), info(1, 0, false), 4, 32],
            // 2: a forward declaration named like the struct: skipped
            vec![n("skb"), info(7, 0, false), 0],
            // 3: anonymous struct { int network_header @0; int flags:3 @32 } (kind_flag: bitfields)
            vec![0, info(KIND_STRUCT, 2, true), 8, n("network_header"), 1, 0, n("flags"), 1, (3 << 24) | 32],
            // 4: typedef grp = 3
            vec![n("grp"), info(KIND_TYPEDEF, 0, false), 3],
            // 5: anonymous union { grp @0 }
            vec![0, info(KIND_UNION, 1, false), 8, 0, 4, 0],
            // 6: struct skb { int dev @0; union (5) @64; int head @192 }
            vec![n("skb"), info(KIND_STRUCT, 3, false), 28, n("dev"), 1, 0, 0, 5, 64, n("head"), 1, 192],
        ];
        let bytes = blob(&types, &names);
        let btf = StructOffsets::parse(&bytes).unwrap();
        assert_eq!(btf.offset_of("skb", "dev"), Some(0));
        assert_eq!(btf.offset_of("skb", "head"), Some(24));
        assert_eq!(btf.offset_of("skb", "network_header"), Some(8));
        assert_eq!(btf.offset_of("skb", "flags"), None, "a bitfield has no byte offset");
        assert_eq!(btf.offset_of("skb", "missing"), None);
        assert_eq!(btf.offset_of("fwd", "dev"), None);
    }

    #[test]
    fn malformed_blobs_are_errors_not_panics() {
        assert!(StructOffsets::parse(b"").is_err());
        assert!(StructOffsets::parse(&[0x9f, 0xeb, 1, 0]).is_err());
        let mut bytes = blob(&[vec![0, info(KIND_STRUCT, 5, false), 4]], &[]);
        assert!(StructOffsets::parse(&bytes).is_err(), "members past the section end");
        bytes[0] = 0;
        assert!(StructOffsets::parse(&bytes).is_err());
        let unknown = blob(&[vec![0, info(31, 0, false), 0]], &[]);
        assert!(StructOffsets::parse(&unknown).is_err());
    }

    #[test]
    fn the_running_kernels_skb_layout_is_found() {
        // Every machine the agent supports has BTF; CI's does.
        let Ok(bytes) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            panic!("/sys/kernel/btf/vmlinux is missing: the agent needs a kernel with BTF");
        };
        let btf = StructOffsets::parse(&bytes).unwrap();
        let head = btf.offset_of("sk_buff", "head").unwrap();
        let network = btf.offset_of("sk_buff", "network_header").unwrap();
        let dev = btf.offset_of("sk_buff", "dev").unwrap();
        assert!(dev < network && network < head, "dev {dev}, network_header {network}, head {head}");
        assert!(btf.offset_of("net_device", "ifindex").is_some());
    }
}
