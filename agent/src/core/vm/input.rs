//! What the core hears, and how each input changes it. Answers that don't
//! match the operation in flight (late, duplicated) are ignored, so a
//! confused executor cannot reorder the protocol.

use super::{Action, VmCore};
use crate::core::policy::{cus_for_pressure, Size, Usage};
use crate::core::pressure::PressureKind;
use crate::vms::CpuMode;
use vmscale_common::backoff::Backoff;

/// Something the VM's executors or the guest reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The guest's use; in polling mode it waits for the next tick's average.
    Sample(Usage),
    /// The memory the guest kernel manages (`MemTotal`), bytes, from the
    /// same sample. Less than QEMU's size by what the kernel reserved at boot
    /// (memmap, swiotlb, its own image): 392 MiB of a 512 MiB VM. The goal
    /// adds the difference on top of what use calls for.
    GuestMemory {
        total_bytes: u64,
    },
    /// A pressure event from the guest. Whether it counts is the core's
    /// call: not in polling mode, not when `policy.ignore_pressure` names
    /// it; CPU pressure grows a VM only where it lacks CPU; OOM kinds grow
    /// by the larger step.
    Pressure(PressureKind),
    /// The allocator's answer to a permit request (granted, partial or denied:
    /// `permitted` is the VM's whole reservation now).
    Permit {
        permitted: Size,
    },
    /// The hotplug finished; `size` is what QEMU reports now (its vCPUs
    /// present as CPU). In sysfs mode the core takes the CPU to be the
    /// target's, as far as those vCPUs reach: the guest onlines them.
    Plugged {
        size: Size,
    },
    /// The informant confirmed the guest sees the new resources.
    UpscaleConfirmed,
    /// The informant answered a downscale request.
    DownscaleAnswer {
        approved: bool,
    },
    /// The unplug finished; `size` is what QEMU reports now (read as for
    /// `Plugged`).
    Unplugged {
        size: Size,
    },
    /// The allocator acknowledged a release.
    Released,
    /// The in-flight operation failed. `size` is QEMU's size after it, when known.
    Failed {
        size: Option<Size>,
    },
    /// How setting the `cpu.max` a step asked for went.
    CpuMaxSet {
        milli_cpu: u64,
        ok: bool,
    },
    InformantConnected(bool),
    AllocatorConnected(bool),
    Migrating(bool),
    Bounds {
        min_cus: u32,
        max_cus: u32,
    },
}

impl VmCore {
    /// Feeds one input.
    pub fn input(&mut self, now: u64, input: Input) {
        match input {
            Input::Sample(u) => match &mut self.poller {
                Some(p) => p.sample(now, u),
                None => self.usage = Some((now, u)),
            },
            Input::GuestMemory { total_bytes } => self.guest_memory(total_bytes),
            Input::Pressure(kind) => self.pressure(now, kind),
            Input::CpuMaxSet { milli_cpu, ok } => self.cpu_max_set = ok.then_some(milli_cpu),
            Input::InformantConnected(up) => {
                self.informant_up = up;
                if !up {
                    self.owed_notify = None; // the guest onlines by itself; nobody to tell
                    self.approved = None; // approval lapses with its giver
                    self.abandon(|a| matches!(a, Action::NotifyUpscale { .. } | Action::AskDownscale { .. }));
                }
            }
            Input::AllocatorConnected(up) => {
                self.allocator_up = up;
                if !up {
                    self.abandon(|a| matches!(a, Action::RequestPermit { .. } | Action::Release { .. }));
                }
            }
            Input::Migrating(m) => self.migrating = m,
            Input::Bounds { min_cus, max_cus } => {
                self.min_cus = min_cus;
                self.max_cus = max_cus.max(min_cus);
            }
            answer => {
                // An answer with nothing in flight: stale, ignore.
                if let Some(f) = self.in_flight {
                    self.answer(now, answer, f.action);
                }
            }
        }
    }

    fn guest_memory(&mut self, total_bytes: u64) {
        // While memory is being plugged the guest may already see the
        // new memory and `current` not yet: skip those reports.
        let moving = matches!(self.in_flight(), Some(Action::Plug { .. } | Action::Unplug { .. }));
        if total_bytes > 0 && !moving {
            let mem = self.current.memory_bytes;
            // Never more than half the VM: a guest that reports far
            // less than it has is wrong, not small.
            let o = mem.saturating_sub(total_bytes).min(mem / 2);
            self.memory_overhead = Some(self.memory_overhead.map_or(o, |m| m.min(o)));
        }
    }

    fn pressure(&mut self, now: u64, kind: PressureKind) {
        // Polling mode decides from averaged samples alone, like the
        // autoscaler it is compared with.
        if self.poller.is_some() || self.policy.ignore_pressure.contains(kind) {
            return;
        }
        if kind.is_cpu() {
            self.cpu_pressure(now);
        } else {
            self.memory_pressure(now, kind.is_oom());
        }
    }

    fn cpu_pressure(&mut self, now: u64) {
        // A vCPU just given up crowds its tasks onto the others for a
        // moment: that pressure is the downscale's own echo, and growing
        // on it would undo the downscale at once (seen under TCG).
        if now < self.cpu_settle_until {
            return;
        }
        // CUs bring CPU and memory together. Where the VM already has
        // the CPU the raised goal would give (every vCPU online, say),
        // more CUs would add only memory, which waiting for a CPU does
        // not call for: under TCG CPU pressure is constant, and it grew
        // idle guests to their largest size. (The informant's samples
        // still raise the CPU goal from the load average.)
        let base = self.current_cus().max(self.permitted.whole_cus(self.cu));
        let floor = cus_for_pressure(base, false, &self.policy).min(self.max_cus);
        if Size::of_cus(floor, self.cu).milli_cpu > self.current.milli_cpu {
            self.memory_pressure(now, false);
        }
    }

    fn memory_pressure(&mut self, now: u64, oom: bool) {
        let base = self.current_cus().max(self.permitted.whole_cus(self.cu));
        let floor = cus_for_pressure(base, oom, &self.policy).min(self.max_cus);
        let hold = now.saturating_add(self.policy.pressure_hold_ms);
        let raised = self.pressure_floor.is_none_or(|(f, until)| floor > f || now >= until);
        self.pressure_floor = Some((floor.max(self.pressure_floor.map_or(0, |p| p.0)), hold));
        self.low_since = None;
        self.downscale_blocked_until = self.downscale_blocked_until.max(hold);
        if raised {
            // New information: ask again even inside a denial cooldown.
            self.upscale_blocked_until = 0;
            self.upscale_began.get_or_insert(now);
        }
    }

    /// An executor's answer to `flight`, the operation in flight.
    fn answer(&mut self, now: u64, input: Input, flight: Action) {
        match (input, flight) {
            (Input::Permit { permitted }, Action::RequestPermit { .. }) => {
                self.bookkept();
                self.permitted = permitted.max(self.current);
                self.times.to_permit_ms = self.since_began(now);
                if self.permitted.whole_cus(self.cu) <= self.current_cus() {
                    let cool = self.jitter(self.policy.denied_cooldown_ms);
                    self.upscale_blocked_until = now.saturating_add(cool);
                }
            }
            (Input::Plugged { size }, Action::Plug { target }) => {
                let size = self.cpu_read_back(size, target, true);
                self.plugged(now, size);
            }
            (Input::UpscaleConfirmed, Action::NotifyUpscale { .. }) => {
                self.done();
                self.owed_notify = None;
                self.times.to_confirm_ms = self.since_began(now);
            }
            (Input::DownscaleAnswer { approved }, Action::AskDownscale { target, .. }) => {
                self.downscale_answer(now, approved, target);
            }
            (Input::Unplugged { size }, Action::Unplug { target }) => {
                let size = self.cpu_read_back(size, target, false);
                self.unplugged(now, size);
            }
            (Input::Released, Action::Release { size }) => {
                self.bookkept();
                self.permitted = size.max(self.current);
                self.owed_release = None;
            }
            (Input::Failed { size }, action) => self.failed(now, action, size),
            // An answer to something else: stale, ignore.
            _ => {}
        }
    }

    /// The VM's size after a plug or unplug towards `target`, from what QEMU
    /// read back. In sysfs mode QEMU's vCPUs are all there from boot and the
    /// guest onlines or offlines them: the CPU is the target clamped to the
    /// vCPUs QEMU has, and a plug never lowers it (a memory-only plug leaves
    /// the CPUs online as they were).
    fn cpu_read_back(&self, qemu: Size, target: Size, growing: bool) -> Size {
        let cpu = match self.cpu_mode {
            CpuMode::Hotplug => qemu.milli_cpu,
            CpuMode::Sysfs if growing => target.milli_cpu.max(self.current.milli_cpu).min(qemu.milli_cpu),
            CpuMode::Sysfs => target.milli_cpu.min(qemu.milli_cpu),
        };
        Size::new(cpu, qemu.memory_bytes)
    }

    fn plugged(&mut self, now: u64, size: Size) {
        let before = self.current_cus();
        self.done();
        if size.whole_cus(self.cu) <= before {
            // The VM can't take another whole CU (e.g. no vCPU left to
            // online): plugging again would loop. Back off like a
            // failure and give back the permit it could not use.
            self.failed(now, Action::Plug { target: size }, Some(size));
            self.cpu_max_after_resize();
            return;
        }
        self.current = size;
        self.cpu_max_after_resize();
        self.permitted = self.permitted.max(size);
        self.times.to_plug_ms = self.since_began(now);
        if self.informant_up {
            self.owed_notify = Some(size);
        }
    }

    fn downscale_answer(&mut self, now: u64, approved: bool, target: Size) {
        self.done();
        if approved {
            self.approved = Some(target);
            // The guest gives its vCPUs up when it approves.
            if target.milli_cpu < self.current.milli_cpu {
                self.cpu_settle_until = now.saturating_add(self.policy.cpu_settle_ms);
            }
        } else {
            let cool = self.jitter(self.policy.downscale_denied_cooldown_ms);
            self.downscale_blocked_until = now.saturating_add(cool);
        }
    }

    fn unplugged(&mut self, now: u64, size: Size) {
        self.done();
        self.approved = None;
        if size.milli_cpu < self.current.milli_cpu {
            self.cpu_settle_until = now.saturating_add(self.policy.cpu_settle_ms);
        }
        self.current = size;
        self.cpu_max_after_resize();
        self.owed_release = Some(size);
        // The next step down waits `downscale_step_ms`, not a whole new low spell.
        let p = &self.policy;
        self.low_since = Some(now.saturating_sub(p.downscale_after_ms).saturating_add(p.downscale_step_ms));
    }

    /// After a plug or unplug: the quota follows the VM's CPU size, when the
    /// policy asks for one. A quota already set for this size is left; one
    /// that failed is tried again (at the next plug or unplug, not sooner:
    /// it refines the size, it is no condition of scaling).
    fn cpu_max_after_resize(&mut self) {
        let cpu = self.current.milli_cpu;
        if self.policy.cpu_max_cgroup && self.cpu_max_set != Some(cpu) {
            self.cpu_max_due = Some(cpu);
        }
    }

    pub(super) fn done(&mut self) {
        self.in_flight = None;
        self.failures = 0;
    }

    /// A ledger step (a permit, a release) is done. It keeps the failure
    /// streak: it is what happens between two tries of a plug QEMU refuses
    /// (a permit, the plug fails, the unused permit goes back, a permit
    /// again...), and a streak it ended would keep the backoff at its first
    /// step for ever (seen: a guest whose vhost-user device had no memory
    /// slot left was asked 750 times in 3 minutes, and never shrunk).
    fn bookkept(&mut self) {
        self.in_flight = None;
    }

    fn abandon(&mut self, which: impl Fn(Action) -> bool) {
        if self.in_flight.is_some_and(|f| which(f.action)) {
            self.in_flight = None;
        }
    }

    pub(super) fn failed(&mut self, now: u64, action: Action, size: Option<Size>) {
        self.in_flight = None;
        self.plug_rest = false;
        self.failures = self.failures.saturating_add(1);
        let backoff = Backoff::from_ms(self.policy.retry_base_ms, self.policy.retry_max_ms);
        let wait = self.jitter(backoff.delay_ms(self.failures));
        self.retry_at = now.saturating_add(wait);
        if let Some(s) = size {
            self.current = s;
        }
        if size.is_none() && matches!(action, Action::Plug { .. } | Action::Unplug { .. }) {
            // QEMU's size is unknown: what the guest sees may not match
            // `current`, so learn the overhead again.
            self.memory_overhead = None;
        }
        match action {
            // A failed plug gives back what it did not use of the permit.
            Action::Plug { .. } if self.permitted != self.current => {
                self.owed_release = Some(self.current);
            }
            Action::Unplug { .. } if size.is_some_and(|s| !self.permitted.fits_in(s)) => {
                // Part of it went away: the allocator must hear of what did.
                self.owed_release = Some(self.current);
                self.approved = None;
            }
            _ => {}
        }
    }
}
