//! The uncompressed kernel for a faster boot under TCG.
//!
//! Debian's `vmlinuz` is a bzImage with an xz-compressed kernel inside; under
//! TCG the kernel's own decompressor takes 4-8 s before the kernel starts
//! (measured here: /init 8.5-12.3 s after QEMU starts with vmlinuz, 4.0-4.4 s
//! with vmlinux). Debian builds with CONFIG_PVH, so QEMU can start the plain
//! ELF `vmlinux` at its PVH entry point instead (`-kernel vmlinux`); memory
//! and CPU hotplug behave the same (checked with pc-dimm, virtio-mem and a
//! vCPU).

use anyhow::{bail, Context};
use std::process::Command;

/// The xz stream inside a bzImage: its setup header gives the payload's
/// place (Documentation/arch/x86/boot.rst: `setup_sects` at 0x1f1,
/// `payload_offset` and `payload_length` at 0x248, counted from the
/// protected-mode code, which follows the setup sectors and the boot sector).
pub fn payload(bz: &[u8]) -> anyhow::Result<&[u8]> {
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS setup header)");
    }
    let u32_at = |at: usize| -> anyhow::Result<usize> {
        let b = bz.get(at..at + 4).context("bzImage header is truncated")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    bz.get(start..start + u32_at(0x24c)?).context("the bzImage's payload runs past its end")
}

/// The decompressed kernel ELF, if this bzImage holds an xz-compressed one
/// (Debian's do); `None` for other compressions, which then boot as bzImage.
pub fn extract(bz: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    let payload = payload(bz)?;
    if !payload.starts_with(b"\xfd7zXZ\0") {
        return Ok(None);
    }
    // --single-stream: the build appends the uncompressed size after the stream.
    let elf = super::image::pipe(Command::new("xz").args(["-dc", "--single-stream"]), payload)?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("the kernel inside the bzImage is not an ELF file");
    }
    Ok(Some(elf))
}

/// Whether the kernel can start at its PVH entry (its build config says).
pub fn has_pvh(config: &str) -> bool {
    config.lines().any(|l| l.trim() == "CONFIG_PVH=y")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::cast_possible_truncation)] // a test payload of a few bytes
    fn bz(setup_sects: u8, offset: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; (setup_sects.max(1) as usize + 1) * 512 + offset as usize];
        b[0x1f1] = setup_sects;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(b"trailer");
        b
    }

    #[test]
    fn payload_is_found_from_the_setup_header() {
        assert_eq!(payload(&bz(3, 100, b"kernel")).unwrap(), b"kernel");
        assert!(payload(b"MZ not a kernel").is_err());
        let mut short = bz(3, 100, b"kernel");
        short.truncate(2100);
        assert!(payload(&short).is_err());
    }

    #[test]
    fn only_xz_payloads_are_extracted() {
        assert!(extract(&bz(2, 0, b"\x1f\x8bgzip")).unwrap().is_none());
    }

    #[test]
    fn pvh_comes_from_the_config() {
        assert!(has_pvh("CONFIG_XEN=y\nCONFIG_PVH=y\n"));
        assert!(!has_pvh("# CONFIG_PVH is not set\n"));
    }
}
