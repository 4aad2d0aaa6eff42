//! One VM's scaling loop as a pure state machine: inputs in, actions out, the
//! clock passed in. At most one operation is in flight per VM, which makes the
//! protocol order hold by construction:
//!
//! - upscale: permit from the allocator, then plug, then tell the informant;
//! - downscale: the informant's approval, then unplug, then tell the allocator;
//! - a failed plug gives the unused part of the permit back;
//! - nothing changes while the VM migrates.
//!
//! It also decides what the VM loop used to: which guest pressure events
//! count (`policy.ignore_pressure`, CPU against memory, none in polling
//! mode, whose sample averaging it does too), the VM's CPU size in sysfs
//! mode and the downscale's vCPU count, and when the QEMU process's
//! `cpu.max` is to be set. Inputs and their handling are in `vm/input.rs`.

mod input;

pub use input::Input;

use super::policy::{cus_for_usage, vcpus_for, Cu, Policy, Size, Usage};
use crate::core::polling::{Poller, Tick};
use crate::vms::CpuMode;
use serde::Serialize;

/// What the executors should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    RequestPermit {
        target: Size,
    },
    Plug {
        target: Size,
    },
    NotifyUpscale {
        size: Size,
    },
    /// `vcpus`: the vCPUs the guest is to keep online (sysfs mode), 0 where
    /// QEMU unplugs them (hotplug mode) and the guest's CPUs are not asked about.
    AskDownscale {
        target: Size,
        vcpus: u32,
    },
    Unplug {
        target: Size,
    },
    Release {
        size: Size,
    },
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::RequestPermit { .. } => "request_permit",
            Action::Plug { .. } => "plug",
            Action::NotifyUpscale { .. } => "notify_upscale",
            Action::AskDownscale { .. } => "ask_downscale",
            Action::Unplug { .. } => "unplug",
            Action::Release { .. } => "release",
        }
    }
}

/// Stage times of one upscale, in ms from the event that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct UpscaleTimes {
    pub to_permit_ms: Option<u64>,
    pub to_plug_ms: Option<u64>,
    pub to_confirm_ms: Option<u64>,
}

/// The output of one step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub action: Option<Action>,
    /// Call `step` again at this time at the latest (a timer, a cooldown).
    pub wake_at_ms: Option<u64>,
    /// Set when an upscale was confirmed in this step's inputs.
    pub upscale_done: Option<UpscaleTimes>,
    /// Set the QEMU process's CPU quota (`cpu.max`) for this CPU size, in
    /// milli-vCPU, now and beside any action (it is no step of the protocol),
    /// and report how it went with [`Input::CpuMaxSet`].
    pub cpu_max: Option<u64>,
    /// Polling mode: the tick this step took, for the log.
    pub polled: Option<Tick>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct InFlight {
    action: Action,
    started_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmCore {
    pub cu: Cu,
    pub min_cus: u32,
    pub max_cus: u32,
    pub policy: Policy,
    /// What QEMU has.
    pub current: Size,
    /// The allocator's reservation for this VM (at least `current`).
    pub permitted: Size,
    /// Memory QEMU started the VM with (`base-memory`): no device holds it,
    /// so nothing can unplug it. Downscales stop there.
    boot_memory_bytes: u64,
    /// What of the VM's memory the guest never sees (QEMU's size less the
    /// guest's `MemTotal`): the smallest difference seen in a report taken
    /// while no plug or unplug was under way. The smallest, because a sample
    /// that lags a plug shows the old `MemTotal` against the new size.
    memory_overhead: Option<u64>,
    usage: Option<(u64, Usage)>,
    /// A goal raised by pressure, and until when it holds.
    pressure_floor: Option<(u32, u64)>,
    /// When use was first seen below the current size, in this low spell.
    low_since: Option<u64>,
    in_flight: Option<InFlight>,
    /// A downscale the informant approved, to carry out next.
    approved: Option<Size>,
    upscale_blocked_until: u64,
    /// CPU pressure before this is not a reason to grow: the VM has just
    /// given up a vCPU (see `policy.cpu_settle_ms`).
    cpu_settle_until: u64,
    downscale_blocked_until: u64,
    pub failures: u32,
    retry_at: u64,
    pub informant_up: bool,
    pub allocator_up: bool,
    pub migrating: bool,
    owed_release: Option<Size>,
    owed_notify: Option<Size>,
    /// The plug in flight or just done was the first of an upscale, capped
    /// at `policy.first_plug_cus`: the rest follows before the informant is
    /// told.
    plug_rest: bool,
    /// When the current upscale began (the event or sample that asked for it).
    upscale_began: Option<u64>,
    times: UpscaleTimes,
    rng: u64,
    /// How the VM's CPUs scale: in sysfs mode QEMU has every vCPU from boot
    /// and the CPU size is what the guest keeps online.
    cpu_mode: CpuMode,
    /// The CPU size the QEMU process's `cpu.max` was last set for; `None`
    /// before the first and after a failed setting (retried at the next
    /// plug or unplug).
    cpu_max_set: Option<u64>,
    /// A `cpu.max` setting to hand out at the next step.
    cpu_max_due: Option<u64>,
    /// Polling mode's averaging of samples (`policy.polling`).
    #[serde(skip)]
    poller: Option<Poller>,
}

impl VmCore {
    /// A VM as found: `current` read back from QEMU, `permitted` the last
    /// permit known (at least `current`).
    pub fn new(
        cu: Cu,
        min_cus: u32,
        max_cus: u32,
        policy: Policy,
        current: Size,
        permitted: Size,
        seed: u64,
    ) -> Self {
        VmCore {
            cu,
            min_cus,
            max_cus: max_cus.max(min_cus),
            current,
            permitted: permitted.max(current),
            boot_memory_bytes: 0,
            memory_overhead: None,
            usage: None,
            pressure_floor: None,
            low_since: None,
            in_flight: None,
            approved: None,
            upscale_blocked_until: 0,
            cpu_settle_until: 0,
            downscale_blocked_until: 0,
            failures: 0,
            retry_at: 0,
            informant_up: false,
            allocator_up: false,
            migrating: false,
            owed_release: None,
            owed_notify: None,
            plug_rest: false,
            upscale_began: None,
            times: UpscaleTimes::default(),
            rng: seed | 1,
            cpu_mode: CpuMode::Hotplug,
            cpu_max_set: None,
            cpu_max_due: policy_cpu_max(&policy, current),
            poller: policy.polling.as_deref().map(|p| Poller::new(*p, 0)),
            policy,
        }
    }

    /// Tells the core how the VM's CPUs scale. Without it sizes read back
    /// from QEMU are taken as they are (hotplug).
    pub fn set_cpu_mode(&mut self, mode: CpuMode) {
        self.cpu_mode = mode;
    }

    /// Tells the core how much memory QEMU booted the VM with (QMP
    /// `query-memory-size-summary` `base-memory`): the VM never shrinks below
    /// it, nor asks the informant or the allocator to.
    pub fn set_boot_memory(&mut self, bytes: u64) {
        self.boot_memory_bytes = bytes;
    }

    /// The smallest size a downscale may reach: the lower bound in CUs, and
    /// no less memory than the VM booted with.
    pub fn floor(&self) -> Size {
        Size::of_cus(self.min_cus, self.cu).max(Size::new(0, self.boot_memory_bytes))
    }

    /// The memory the guest never sees, as learned from its samples.
    pub fn memory_overhead(&self) -> Option<u64> {
        self.memory_overhead
    }

    pub fn current_cus(&self) -> u32 {
        self.current.whole_cus(self.cu)
    }

    pub fn is_stuck(&self) -> bool {
        self.failures >= self.policy.stuck_after_failures
    }

    pub fn in_flight(&self) -> Option<Action> {
        self.in_flight.map(|f| f.action)
    }

    /// The CUs the VM should have now, clamped to its bounds.
    pub fn goal_cus(&self, now: u64) -> u32 {
        let fresh = self.usage.filter(|(at, _)| now.saturating_sub(*at) <= self.policy.sample_max_age_ms);
        // Without fresh numbers, hold the current size: never shrink blind.
        let mut goal = match fresh {
            Some((_, u)) => cus_for_usage(u, self.memory_overhead.unwrap_or(0), self.cu, &self.policy),
            None => self.current_cus(),
        };
        if let Some((floor, until)) = self.pressure_floor {
            if now < until {
                goal = goal.max(floor);
            }
        }
        goal.clamp(self.min_cus, self.max_cus)
    }

    /// The goal is above the VM's size and the permit covers more of it.
    fn growth_permitted(&self, now: u64) -> bool {
        let cur = self.current_cus();
        self.goal_cus(now) > cur && self.permitted.whole_cus(self.cu) > cur
    }

    fn since_began(&self, now: u64) -> Option<u64> {
        self.upscale_began.map(|t| now.saturating_sub(t))
    }

    /// `ms` less up to a quarter, so that VMs on one node don't retry in step.
    fn jitter(&mut self, ms: u64) -> u64 {
        // xorshift64: deterministic per seed, good enough to spread timers.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let quarter = ms / 4;
        if quarter == 0 {
            ms
        } else {
            ms - self.rng % quarter
        }
    }

    /// Decides what to do now. Call after every input and at `wake_at_ms`.
    pub fn step(&mut self, now: u64) -> Decision {
        let polled = self.poll(now);
        let mut d = self.decide(now);
        d.polled = polled;
        d.cpu_max = self.cpu_max_due.take();
        if let Some(p) = &self.poller {
            d.wake_at_ms = Some(d.wake_at_ms.map_or(p.next_tick_ms(), |w| w.min(p.next_tick_ms())));
        }
        d
    }

    /// Polling mode: at a tick, the window's average becomes the sample the
    /// goal is computed from.
    fn poll(&mut self, now: u64) -> Option<Tick> {
        let tick = self.poller.as_mut()?.tick(now)?;
        if let Some(u) = tick.usage {
            self.usage = Some((now, u));
        }
        Some(tick)
    }

    fn decide(&mut self, now: u64) -> Decision {
        let mut d = Decision::default();
        if self.times.to_confirm_ms.is_some()
            || (self.times.to_plug_ms.is_some() && self.owed_notify.is_none())
        {
            d.upscale_done = Some(std::mem::take(&mut self.times));
            self.upscale_began = None;
        }
        if let Some(f) = self.in_flight {
            let deadline = f.started_ms.saturating_add(self.policy.op_timeout_ms);
            if now < deadline {
                d.wake_at_ms = Some(deadline);
                return d;
            }
            self.failed(now, f.action, None);
        }
        if now < self.retry_at {
            d.wake_at_ms = Some(self.retry_at);
            return d;
        }
        let action = self.next_action(now, &mut d);
        if let Some(a) = action {
            self.in_flight = Some(InFlight { action: a, started_ms: now });
            d.action = Some(a);
        }
        d
    }

    fn next_action(&mut self, now: u64, d: &mut Decision) -> Option<Action> {
        // Debts first: the allocator's ledger and the guest's view must catch up.
        if let Some(size) = self.owed_release {
            if self.allocator_up {
                return Some(Action::Release { size });
            }
        }
        // The rest of a split upscale goes before the notice: one notice for all of it.
        let rest = std::mem::take(&mut self.plug_rest)
            && !self.migrating
            && self.approved.is_none()
            && self.growth_permitted(now);
        if let Some(size) = self.owed_notify {
            if !self.informant_up {
                self.owed_notify = None;
            } else if !rest {
                return Some(Action::NotifyUpscale { size });
            }
        }
        if self.migrating {
            return None;
        }
        if let Some(target) = self.approved {
            return Some(Action::Unplug { target });
        }
        let goal = self.goal_cus(now);
        let cur = self.current_cus();
        if goal > cur {
            self.low_since = None;
            self.upscale_began.get_or_insert(now);
            let permitted = self.permitted.whole_cus(self.cu);
            if permitted > cur {
                let mut n = goal.min(permitted);
                let first = u32::from(self.policy.first_plug_cus);
                // Relief first: one small plug the guest onlines at once, then the rest.
                self.plug_rest = !rest && first > 0 && n > cur.saturating_add(first);
                if self.plug_rest {
                    n = cur.saturating_add(first);
                }
                return Some(Action::Plug { target: Size::of_cus(n, self.cu).max(self.current) });
            }
            if now < self.upscale_blocked_until {
                d.wake_at_ms = Some(self.upscale_blocked_until);
                return None;
            }
            if self.allocator_up {
                return Some(Action::RequestPermit { target: Size::of_cus(goal, self.cu).max(self.current) });
            }
            return None;
        }
        // A VM can hold more of one resource than its whole CUs: a guest
        // booted with every vCPU online in sysfs mode (2 vCPUs, memory for
        // 4 CUs of a quarter vCPU) sits at 4 CUs, and at a goal of 4 CUs it
        // would keep its second vCPU for ever. Trim it to its CUs' shape.
        let shaped = Size::of_cus(cur, self.cu).max(self.floor()).min(self.current);
        let trim = goal == cur && shaped != self.current;
        if !trim && (goal == cur || cur <= self.min_cus) {
            self.low_since = None;
            return None;
        }
        // Use is below the current size: shrink one CU at a time, after it has
        // stayed low for a while, and only with the informant's approval.
        let since = *self.low_since.get_or_insert(now);
        let ready = since.saturating_add(self.policy.downscale_after_ms).max(self.downscale_blocked_until);
        if now < ready {
            d.wake_at_ms = Some(ready);
            return None;
        }
        if !self.informant_up {
            return None; // no informant, no memory downscale
        }
        // One CU less, but never below what QEMU can take away: boot memory
        // has no device to unplug. When the floor leaves nothing to shrink,
        // don't ask: an approval could not be carried out.
        let target =
            if trim { shaped } else { Size::of_cus(cur - 1, self.cu).max(self.floor()).min(self.current) };
        if target == self.current {
            return None;
        }
        // In sysfs mode the guest gives its vCPUs up itself, when it approves.
        let vcpus = if self.cpu_mode == CpuMode::Sysfs { vcpus_for(target.milli_cpu) } else { 0 };
        Some(Action::AskDownscale { target, vcpus })
    }
}

/// The first `cpu.max` setting: the size the VM was found at, when the policy
/// asks for quotas.
fn policy_cpu_max(policy: &Policy, current: Size) -> Option<u64> {
    policy.cpu_max_cgroup.then_some(current.milli_cpu)
}
