//! The guest kernel's memory-hotplug settings that decide whether memory the
//! agent plugs can be used the moment it arrives, read once at start, and a
//! note for each one that is off. The handshake carries the notes
//! (`guest_notes`), so the agent logs them where an operator looks.
//!
//! The one that matters most is `memory_hotplug.memmap_on_memory`: without
//! it the kernel allocates each new block's memory map (its `struct page`s,
//! 1/64 of the block) from the zones it already has. A guest scaled up
//! because it is full has the least of that memory just then, and it cannot
//! use movable hot-added memory for it: measured on the test image's 6.1
//! kernel, a guest whose 512 MiB of boot memory was full got 10 DIMMs
//! (1280 MiB, all free) and still OOM-killed its processes; with the setting
//! it did not (`cargo xtask e2e full-boot-memory`, BENCHMARKS.md).

use std::fs;
use std::path::Path;

/// What sysfs says; `None` where a file is missing or unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HotplugSettings {
    /// `devices/system/memory` exists: the kernel can hot-add memory at all.
    pub memory_hotplug: bool,
    /// `memory_hotplug.memmap_on_memory`: `Y`/`N` (6.1), `force` later.
    pub memmap_on_memory: Option<String>,
    /// `auto_online_blocks`: what the kernel does with a block as it arrives.
    pub auto_online: Option<String>,
    /// `memory_hotplug.online_policy`: `contig-zones` or `auto-movable`.
    pub online_policy: Option<String>,
}

const MEMMAP_COST: &str = "each hot-added memory block takes its memory map (1/64 of its size) out of the \
                           memory the guest already has, just when it has least, so a guest whose boot \
                           memory is full can OOM-kill with hot-added memory free";

impl HotplugSettings {
    /// Reads the settings under `sys_root` (`/sys`).
    pub fn read(sys_root: &Path) -> HotplugSettings {
        let read = |p: &str| fs::read_to_string(sys_root.join(p)).ok().map(|s| s.trim().to_owned());
        HotplugSettings {
            memory_hotplug: sys_root.join("devices/system/memory").is_dir(),
            memmap_on_memory: read("module/memory_hotplug/parameters/memmap_on_memory"),
            auto_online: read("devices/system/memory/auto_online_blocks"),
            online_policy: read("module/memory_hotplug/parameters/online_policy"),
        }
    }

    /// One sentence per setting that makes scaling worse, with its fix.
    pub fn notes(&self) -> Vec<String> {
        if !self.memory_hotplug {
            return vec![
                "the guest kernel has no memory hotplug (no /sys/devices/system/memory): memory the \
                         agent plugs never reaches it; build it with CONFIG_MEMORY_HOTPLUG"
                    .to_owned(),
            ];
        }
        let mut notes = Vec::new();
        match self.memmap_on_memory.as_deref() {
            None => notes.push(format!(
                "the guest kernel has no memory_hotplug.memmap_on_memory (CONFIG_MHP_MEMMAP_ON_MEMORY): \
                 {MEMMAP_COST}; use a kernel built with it and boot it with memory_hotplug.memmap_on_memory=1"
            )),
            Some(v) if !matches!(v, "Y" | "y" | "1" | "force") => notes.push(format!(
                "memory_hotplug.memmap_on_memory is off ({v}): {MEMMAP_COST}; boot the guest kernel with \
                 memory_hotplug.memmap_on_memory=1"
            )),
            Some(_) => {}
        }
        match self.auto_online.as_deref() {
            Some("offline") => notes.push(
                "hot-added memory stays offline until the informant onlines it on the agent's upscale notice \
                 (auto_online_blocks is offline); boot the guest kernel with memhp_default_state=online_movable \
                 so it is online the moment it arrives"
                    .to_owned(),
            ),
            Some(v @ ("online" | "online_kernel")) if self.online_policy.as_deref() != Some("auto-movable") => {
                notes.push(format!(
                    "hot-added memory goes online in the kernel's own zones (auto_online_blocks is {v}), where \
                     unmovable allocations pin it and unplugging it fails; boot the guest kernel with \
                     memhp_default_state=online_movable"
                ))
            }
            _ => {}
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HotplugSettings {
        HotplugSettings {
            memory_hotplug: true,
            memmap_on_memory: Some("Y".into()),
            auto_online: Some("online_movable".into()),
            online_policy: Some("contig-zones".into()),
        }
    }

    #[test]
    fn the_test_image_settings_need_no_note() {
        assert!(good().notes().is_empty());
        let forced = HotplugSettings { memmap_on_memory: Some("force".into()), ..good() };
        assert!(forced.notes().is_empty());
        let auto = HotplugSettings {
            auto_online: Some("online".into()),
            online_policy: Some("auto-movable".into()),
            ..good()
        };
        assert!(auto.notes().is_empty(), "{:?}", auto.notes());
    }

    #[test]
    fn each_setting_that_is_off_gets_one_note_with_its_fix() {
        let off = HotplugSettings { memmap_on_memory: Some("N".into()), ..good() };
        let n = off.notes();
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].contains("memory_hotplug.memmap_on_memory=1") && n[0].contains("OOM"), "{n:?}");

        let absent = HotplugSettings { memmap_on_memory: None, ..good() };
        assert!(absent.notes()[0].contains("CONFIG_MHP_MEMMAP_ON_MEMORY"));

        let offline = HotplugSettings { auto_online: Some("offline".into()), ..good() };
        assert!(offline.notes()[0].contains("memhp_default_state=online_movable"));

        let kernel = HotplugSettings { auto_online: Some("online_kernel".into()), ..good() };
        assert!(kernel.notes()[0].contains("unplugging it fails"));

        let all = HotplugSettings {
            memmap_on_memory: Some("N".into()),
            auto_online: Some("online".into()),
            ..good()
        };
        assert_eq!(all.notes().len(), 2);

        let none = HotplugSettings { memory_hotplug: false, ..HotplugSettings::default() };
        assert!(none.notes()[0].contains("CONFIG_MEMORY_HOTPLUG"));
        assert_eq!(none.notes().len(), 1);
    }

    #[test]
    fn settings_are_read_from_sysfs_files() {
        let d = tempfile::tempdir().unwrap();
        let params = d.path().join("module/memory_hotplug/parameters");
        std::fs::create_dir_all(&params).unwrap();
        std::fs::create_dir_all(d.path().join("devices/system/memory")).unwrap();
        std::fs::write(params.join("memmap_on_memory"), "N\n").unwrap();
        std::fs::write(params.join("online_policy"), "contig-zones\n").unwrap();
        std::fs::write(d.path().join("devices/system/memory/auto_online_blocks"), "online_movable\n")
            .unwrap();
        let s = HotplugSettings::read(d.path());
        assert_eq!(
            s,
            HotplugSettings {
                memory_hotplug: true,
                memmap_on_memory: Some("N".into()),
                auto_online: Some("online_movable".into()),
                online_policy: Some("contig-zones".into()),
            }
        );
        assert_eq!(HotplugSettings::read(&d.path().join("nothing")), HotplugSettings::default());
    }
}
