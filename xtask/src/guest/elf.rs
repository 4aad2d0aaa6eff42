//! Just enough ELF64 (little-endian) to answer two questions: is a binary
//! static (no `PT_INTERP`, so it runs in an initramfs without a loader), and
//! which modules a kernel module depends on (its `.modinfo` section).

use anyhow::{bail, Context};

const PT_INTERP: u32 = 3;

/// The ELF header fields we use.
#[derive(Debug)]
struct Header {
    phoff: usize,
    phentsize: usize,
    phnum: usize,
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

fn header(b: &[u8]) -> anyhow::Result<Header> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if b[4] != 2 || b[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    Ok(Header {
        phoff: u64_at(b, 0x20)?,
        shoff: u64_at(b, 0x28)?,
        phentsize: u16_at(b, 0x36)?,
        phnum: u16_at(b, 0x38)?,
        shentsize: u16_at(b, 0x3a)?,
        shnum: u16_at(b, 0x3c)?,
        shstrndx: u16_at(b, 0x3e)?,
    })
}

/// True if the binary names a program interpreter (a dynamic loader): it
/// would not start in an initramfs that has no `/lib64/ld-linux-x86-64.so.2`.
/// A static-pie has a `PT_DYNAMIC` but no `PT_INTERP`.
pub fn has_interpreter(b: &[u8]) -> anyhow::Result<bool> {
    let h = header(b)?;
    for i in 0..h.phnum {
        if u32_at(b, entry(h.phoff, i, h.phentsize)?)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The bytes of the section called `name`, if there is one.
pub fn section<'a>(b: &'a [u8], name: &str) -> anyhow::Result<Option<&'a [u8]>> {
    let h = header(b)?;
    let sh = |i: usize| entry(h.shoff, i, h.shentsize);
    let names_at = u64_at(b, sh(h.shstrndx)?.saturating_add(24))?;
    for i in 0..h.shnum {
        let name_off = u32_at(b, sh(i)?)? as usize;
        let found = names_at
            .checked_add(name_off)
            .and_then(|at| b.get(at..))
            .and_then(|s| s.split(|&c| c == 0).next());
        if found == Some(name.as_bytes()) {
            let (off, size) = (u64_at(b, sh(i)?.saturating_add(24))?, u64_at(b, sh(i)?.saturating_add(32))?);
            return off
                .checked_add(size)
                .and_then(|end| b.get(off..end))
                .map(Some)
                .context("section runs past the end of the file");
        }
    }
    Ok(None)
}

/// The `depends=` list of a kernel module's `.modinfo` (module names,
/// possibly empty).
pub fn module_depends(ko: &[u8]) -> anyhow::Result<Vec<String>> {
    let info = section(ko, ".modinfo")?.context("no .modinfo section: not a kernel module")?;
    let depends = info
        .split(|&c| c == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    Ok(depends.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

/// Offset of entry `i` of a table at `base` with entries of `size` bytes.
fn entry(base: usize, i: usize, size: usize) -> anyhow::Result<usize> {
    i.checked_mul(size).and_then(|o| o.checked_add(base)).context("ELF table offset overflows")
}

fn field<const N: usize>(b: &[u8], at: usize) -> anyhow::Result<[u8; N]> {
    b.get(at..at.saturating_add(N)).and_then(|s| s.try_into().ok()).context("ELF file is truncated")
}

fn u16_at(b: &[u8], at: usize) -> anyhow::Result<usize> {
    Ok(u16::from_le_bytes(field(b, at)?) as usize)
}

fn u32_at(b: &[u8], at: usize) -> anyhow::Result<u32> {
    Ok(u32::from_le_bytes(field(b, at)?))
}

fn u64_at(b: &[u8], at: usize) -> anyhow::Result<usize> {
    usize::try_from(u64::from_le_bytes(field(b, at)?)).context("ELF offset does not fit in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64: header, `phdrs` program headers, and sections
    /// (null, the given ones, `.shstrtab`).
    #[allow(clippy::cast_possible_truncation)] // offsets and counts of a few test bytes
    fn elf(phdr_types: &[u32], sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        let phoff = b.len();
        for t in phdr_types {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        let mut names = vec![0u8];
        let mut placed = Vec::new();
        for (name, data) in sections {
            let name_off = names.len();
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            placed.push((name_off, b.len(), data.len()));
            b.extend_from_slice(data);
        }
        let strtab_name = names.len();
        names.extend_from_slice(b".shstrtab\0");
        let strtab_off = b.len();
        b.extend_from_slice(&names);
        placed.push((strtab_name, strtab_off, names.len()));
        let shoff = b.len();
        b.extend_from_slice(&[0u8; 64]);
        for (name_off, off, size) in &placed {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&(*name_off as u32).to_le_bytes());
            sh[24..32].copy_from_slice(&(*off as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&(*size as u64).to_le_bytes());
            b.extend_from_slice(&sh);
        }
        b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(phdr_types.len() as u16).to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&(placed.len() as u16 + 1).to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&(placed.len() as u16).to_le_bytes());
        b
    }

    #[test]
    fn interpreter_is_found_among_program_headers() {
        const PT_LOAD: u32 = 1;
        const PT_DYNAMIC: u32 = 2;
        assert!(has_interpreter(&elf(&[6, PT_INTERP, PT_LOAD], &[])).unwrap());
        // static-pie: dynamic section, no loader.
        assert!(!has_interpreter(&elf(&[PT_LOAD, PT_DYNAMIC], &[])).unwrap());
    }

    #[test]
    fn module_depends_come_from_modinfo() {
        let ko = elf(&[], &[(".text", b"xx"), (".modinfo", b"license=GPL\0depends=virtio,virtio_ring\0")]);
        assert_eq!(module_depends(&ko).unwrap(), ["virtio", "virtio_ring"]);
        let ko = elf(&[], &[(".modinfo", b"depends=\0name=virtio_ring\0")]);
        assert!(module_depends(&ko).unwrap().is_empty());
        let e = module_depends(&elf(&[], &[(".text", b"")])).unwrap_err();
        assert!(e.to_string().contains("not a kernel module"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(has_interpreter(b"#!/bin/sh\n").is_err());
        let mut truncated = elf(&[PT_INTERP], &[]);
        truncated.truncate(66);
        assert!(has_interpreter(&truncated).is_err());
        let mut bad_shoff = elf(&[], &[(".modinfo", b"x")]);
        bad_shoff[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(section(&bad_shoff, ".modinfo").is_err());
    }
}
