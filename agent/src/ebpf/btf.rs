//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) for the raw
//! `sched` programs: where `pid` sits in `struct task_struct`, and whether
//! the `sched_switch` raw tracepoint has the 5.18+ arguments
//! `(preempt, prev, next, prev_state)`.
//!
//! Why raw tracepoints, and our own reader: a raw tracepoint hands the
//! program the tracepoint's arguments as they are, where a classic one first
//! builds the trace record (with two 16-byte command names) and needs
//! tracefs. Measured here (`examples/rq_overhead.rs`) the whole cost per
//! context switch came out the same or somewhat lower (the program itself
//! does a little more, reading `pid` from `task_struct`), so the gain is the
//! independence from tracefs and from the record's format more than speed.
//! The programs need the offset of `pid`, which differs between kernel
//! builds; aya generates no CO-RE relocations for Rust programs and its BTF
//! types keep their members private, so we read the offset here.
//!
//! The format: a header, a type section (each type a 12-byte `btf_type` and
//! kind-specific data after it) and a string section. See the kernel's
//! `Documentation/bpf/btf.rst`.

/// What the raw programs need to know about the running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLayout {
    /// Byte offset of `pid_t pid` in `struct task_struct`.
    pub task_pid_offset: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF: {0}")]
    Format(String),
    #[error("the kernel's BTF has no {0}")]
    Missing(&'static str),
    #[error(
        "raw tracepoint sched_switch takes {0} arguments, not the 4 of Linux 5.18+ (preempt, prev, next, prev_state)"
    )]
    SwitchArgs(usize),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_PTR: u32 = 2;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;

/// One type: its kind, name, the `size`/`type` word, how many entries
/// follow it, whether members carry bitfield sizes, and where those are.
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u32,
    name_off: u32,
    size_or_type: u32,
    vlen: u32,
    kind_flag: bool,
    data: usize,
}

struct Btf<'a> {
    bytes: &'a [u8],
    strings: &'a [u8],
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| BtfError::Format(format!("truncated at byte {at}")))
}

impl<'a> Btf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, BtfError> {
        let magic = bytes.get(0..2).map(|m| u16::from_le_bytes([m[0], m[1]]));
        if magic != Some(MAGIC) {
            return Err(BtfError::Format("bad magic (only little-endian BTF is read)".into()));
        }
        let hdr_len = u32_at(bytes, 4)? as usize;
        let (type_off, type_len) = (u32_at(bytes, 8)? as usize, u32_at(bytes, 12)? as usize);
        let (str_off, str_len) = (u32_at(bytes, 16)? as usize, u32_at(bytes, 20)? as usize);
        let strings = bytes
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| BtfError::Format("string section out of bounds".into()))?;
        let (start, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        if end > bytes.len() {
            return Err(BtfError::Format("type section out of bounds".into()));
        }
        let void = Type { kind: 0, name_off: 0, size_or_type: 0, vlen: 0, kind_flag: false, data: 0 };
        let mut types = vec![void];
        let mut at = start;
        while at < end {
            let info = u32_at(bytes, at + 4)?;
            let t = Type {
                kind: (info >> 24) & 0x1f,
                name_off: u32_at(bytes, at)?,
                size_or_type: u32_at(bytes, at + 8)?,
                vlen: info & 0xffff,
                kind_flag: info >> 31 == 1,
                data: at + 12,
            };
            let vlen = t.vlen as usize;
            let extra = match t.kind {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func_proto
                2 | 7..=12 | 16 | 18 => 0,    // ptr, fwd, typedef, qualifiers, func, float, type_tag
                k => return Err(BtfError::Format(format!("unknown type kind {k} at byte {at}"))),
            };
            types.push(t);
            at = t.data + extra;
        }
        Ok(Btf { bytes, strings, types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|c| *c == 0).unwrap_or(s.len())]
    }

    fn named(&self, kind: u32, name: &str) -> Option<&Type> {
        self.types.iter().find(|t| t.kind == kind && self.name(t.name_off) == name.as_bytes())
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// Bit offset of member `name` in a struct or union, looking through
    /// anonymous struct and union members.
    fn member_bits(&self, t: &Type, name: &str, depth: u32) -> Result<Option<u32>, BtfError> {
        if depth > 8 {
            return Ok(None);
        }
        for i in 0..t.vlen as usize {
            let at = t.data + 12 * i;
            let (m_name, m_type, m_off) =
                (u32_at(self.bytes, at)?, u32_at(self.bytes, at + 4)?, u32_at(self.bytes, at + 8)?);
            // With kind_flag the offset's top byte is a bitfield size.
            let bits = if t.kind_flag { m_off & 0x00ff_ffff } else { m_off };
            if self.name(m_name) == name.as_bytes() {
                return Ok(Some(bits));
            }
            if m_name == 0 {
                if let Some(inner) =
                    self.get(m_type).filter(|x| x.kind == KIND_STRUCT || x.kind == KIND_UNION)
                {
                    if let Some(b) = self.member_bits(inner, name, depth + 1)? {
                        return Ok(Some(bits + b));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Reads the layout from the bytes of `/sys/kernel/btf/vmlinux`.
pub fn kernel_layout(vmlinux: &[u8]) -> Result<KernelLayout, BtfError> {
    let btf = Btf::parse(vmlinux)?;
    let task = btf.named(KIND_STRUCT, "task_struct").ok_or(BtfError::Missing("struct task_struct"))?;
    let bits = btf.member_bits(task, "pid", 0)?.ok_or(BtfError::Missing("task_struct.pid"))?;
    if bits % 8 != 0 {
        return Err(BtfError::Format(format!("task_struct.pid at bit {bits} is not byte-aligned")));
    }
    // typedef btf_trace_sched_switch -> pointer -> func proto (void *ctx, args...)
    let proto = btf
        .named(KIND_TYPEDEF, "btf_trace_sched_switch")
        .and_then(|t| btf.get(t.size_or_type))
        .filter(|t| t.kind == KIND_PTR)
        .and_then(|t| btf.get(t.size_or_type))
        .filter(|t| t.kind == KIND_FUNC_PROTO)
        .ok_or(BtfError::Missing("raw tracepoint sched_switch (btf_trace_sched_switch)"))?;
    let args = (proto.vlen as usize).saturating_sub(1);
    if args != 4 {
        return Err(BtfError::SwitchArgs(args));
    }
    Ok(KernelLayout { task_pid_offset: bits / 8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: int, task_struct { long state; union { int x; }
    /// anonymous at 64; int pid at bit 128 }, and sched_switch's proto with
    /// `args` parameters after ctx.
    #[allow(clippy::cast_possible_truncation)] // offsets in a test blob of a few hundred bytes
    fn blob(args: u32, pid_name: &str) -> Vec<u8> {
        let mut strings = b"\0int\0task_struct\0state\0x\0".to_vec();
        let pid_off = strings.len() as u32;
        strings.extend_from_slice(pid_name.as_bytes());
        strings.push(0);
        let tt_off = strings.len() as u32;
        strings.extend_from_slice(b"btf_trace_sched_switch\0");
        let mut types: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int
        types.extend([1, info(1, 0), 4, 0x20]);
        // 2: union { int x; }
        types.extend([0, info(5, 1), 4, 23, 1, 0]);
        // 3: struct task_struct
        types.extend([5, info(4, 3), 24, 17, 1, 0, 0, 2, 64, pid_off, 1, 128]);
        // 4: func proto with 1 + args params
        types.extend([0, info(13, 1 + args), 0]);
        for _ in 0..=args {
            types.extend([0, 1]);
        }
        // 5: ptr -> 4; 6: typedef btf_trace_sched_switch -> 5
        types.extend([0, info(2, 0), 4, tt_off, info(8, 0), 5]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, type_bytes.len() as u32, type_bytes.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&type_bytes);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_pid_and_checks_the_switch_arguments() {
        assert_eq!(kernel_layout(&blob(4, "pid")), Ok(KernelLayout { task_pid_offset: 16 }));
        assert_eq!(kernel_layout(&blob(3, "pid")), Err(BtfError::SwitchArgs(3)));
        assert_eq!(kernel_layout(&blob(4, "pod")), Err(BtfError::Missing("task_struct.pid")));
        // Members of anonymous unions are found at their outer offset.
        let b = blob(4, "pid");
        let btf = Btf::parse(&b).unwrap();
        let task = btf.named(KIND_STRUCT, "task_struct").unwrap();
        assert_eq!(btf.member_bits(task, "x", 0), Ok(Some(64)));
        assert!(matches!(kernel_layout(b"nope"), Err(BtfError::Format(_))));
        let mut cut = blob(4, "pid");
        cut.truncate(40);
        assert!(matches!(kernel_layout(&cut), Err(BtfError::Format(_))));
    }

    #[test]
    fn reads_this_kernel_when_it_has_btf() {
        let Ok(bytes) = std::fs::read("/sys/kernel/btf/vmlinux") else { return };
        let l = kernel_layout(&bytes).unwrap();
        assert!(l.task_pid_offset > 0 && l.task_pid_offset < 16 * 1024, "{l:?}");
    }
}
