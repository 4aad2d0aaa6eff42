//! One VM's scaling loop as a pure state machine: inputs in, actions out, the
//! clock passed in. At most one operation is in flight per VM, which makes the
//! protocol order hold by construction:
//!
//! - upscale: permit from the allocator, then plug, then tell the informant;
//! - downscale: the informant's approval, then unplug, then tell the allocator;
//! - a failed plug gives the unused part of the permit back;
//! - nothing changes while the VM migrates.

use super::policy::{cus_for_pressure, cus_for_usage, Cu, Policy, Size, Usage};
use serde::Serialize;

/// Something the VM's executors or the guest reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Sample(Usage),
    /// The memory the guest kernel manages (`MemTotal`), bytes, from the
    /// same sample. Less than QEMU's size by what the kernel reserved at boot
    /// (memmap, swiotlb, its own image): 392 MiB of a 512 MiB VM. The goal
    /// adds the difference on top of what use calls for.
    GuestMemory {
        total_bytes: u64,
    },
    /// A pressure event from the guest; `oom` for OOM-victim or memory.max.
    Pressure {
        oom: bool,
    },
    /// CPU pressure (PSI `cpu`): tasks waiting for a CPU.
    CpuPressure,
    /// The allocator's answer to a permit request (granted, partial or denied:
    /// `permitted` is the VM's whole reservation now).
    Permit {
        permitted: Size,
    },
    /// The hotplug finished; `size` is what QEMU reports now.
    Plugged {
        size: Size,
    },
    /// The informant confirmed the guest sees the new resources.
    UpscaleConfirmed,
    /// The informant answered a downscale request.
    DownscaleAnswer {
        approved: bool,
    },
    /// The unplug finished; `size` is what QEMU reports now.
    Unplugged {
        size: Size,
    },
    /// The allocator acknowledged a release.
    Released,
    /// The in-flight operation failed. `size` is QEMU's size after it, when known.
    Failed {
        size: Option<Size>,
    },
    InformantConnected(bool),
    AllocatorConnected(bool),
    Migrating(bool),
    Bounds {
        min_cus: u32,
        max_cus: u32,
    },
}

/// What the executors should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    RequestPermit { target: Size },
    Plug { target: Size },
    NotifyUpscale { size: Size },
    AskDownscale { target: Size },
    Unplug { target: Size },
    Release { size: Size },
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub action: Option<Action>,
    /// Call `step` again at this time at the latest (a timer, a cooldown).
    pub wake_at_ms: Option<u64>,
    /// Set when an upscale was confirmed in this step's inputs.
    pub upscale_done: Option<UpscaleTimes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct InFlight {
    action: Action,
    started_ms: u64,
}

/// How long after a vCPU is given up CPU pressure is not taken as a reason
/// to grow. The informant's load-average samples still raise the CPU goal.
pub const CPU_SETTLE_MS: u64 = 10_000;

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
    /// given up a vCPU (see [`CPU_SETTLE_MS`]).
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
            policy,
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
        }
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

    /// Feeds one input. Answers that don't match the operation in flight (late,
    /// duplicated) are ignored, so a confused executor cannot reorder the protocol.
    pub fn input(&mut self, now: u64, input: Input) {
        let flight = self.in_flight.map(|f| f.action);
        match (input, flight) {
            (Input::Sample(u), _) => self.usage = Some((now, u)),
            (Input::GuestMemory { total_bytes }, flight) => {
                // While memory is being plugged the guest may already see the
                // new memory and `current` not yet: skip those reports.
                let moving = matches!(flight, Some(Action::Plug { .. } | Action::Unplug { .. }));
                if total_bytes > 0 && !moving {
                    let mem = self.current.memory_bytes;
                    // Never more than half the VM: a guest that reports far
                    // less than it has is wrong, not small.
                    let o = mem.saturating_sub(total_bytes).min(mem / 2);
                    self.memory_overhead = Some(self.memory_overhead.map_or(o, |m| m.min(o)));
                }
            }
            // A vCPU just given up crowds its tasks onto the others for a
            // moment: that pressure is the downscale's own echo, and growing
            // on it would undo the downscale at once (seen under TCG).
            (Input::CpuPressure, _) if now < self.cpu_settle_until => {}
            (Input::CpuPressure, _) => {
                // CUs bring CPU and memory together. Where the VM already has
                // the CPU the raised goal would give (every vCPU online, say),
                // more CUs would add only memory, which waiting for a CPU does
                // not call for: under TCG CPU pressure is constant, and it grew
                // idle guests to their largest size. (The informant's samples
                // still raise the CPU goal from the load average.)
                let base = self.current_cus().max(self.permitted.whole_cus(self.cu));
                let floor = cus_for_pressure(base, false, &self.policy).min(self.max_cus);
                if Size::of_cus(floor, self.cu).milli_cpu > self.current.milli_cpu {
                    self.input(now, Input::Pressure { oom: false });
                }
            }
            (Input::Pressure { oom }, _) => {
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
            (Input::Permit { permitted }, Some(Action::RequestPermit { .. })) => {
                self.done();
                self.permitted = permitted.max(self.current);
                self.times.to_permit_ms = self.since_began(now);
                if self.permitted.whole_cus(self.cu) <= self.current_cus() {
                    let cool = self.jitter(self.policy.denied_cooldown_ms);
                    self.upscale_blocked_until = now.saturating_add(cool);
                }
            }
            (Input::Plugged { size }, Some(Action::Plug { .. })) => {
                let before = self.current_cus();
                self.done();
                if size.whole_cus(self.cu) <= before {
                    // The VM can't take another whole CU (e.g. no vCPU left to
                    // online): plugging again would loop. Back off like a
                    // failure and give back the permit it could not use.
                    self.failed(now, Action::Plug { target: size }, Some(size));
                    return;
                }
                self.current = size;
                self.permitted = self.permitted.max(size);
                self.times.to_plug_ms = self.since_began(now);
                if self.informant_up {
                    self.owed_notify = Some(size);
                }
            }
            (Input::UpscaleConfirmed, Some(Action::NotifyUpscale { .. })) => {
                self.done();
                self.owed_notify = None;
                self.times.to_confirm_ms = self.since_began(now);
            }
            (Input::DownscaleAnswer { approved }, Some(Action::AskDownscale { target })) => {
                self.done();
                if approved {
                    self.approved = Some(target);
                    // The guest gives its vCPUs up when it approves.
                    if target.milli_cpu < self.current.milli_cpu {
                        self.cpu_settle_until = now.saturating_add(CPU_SETTLE_MS);
                    }
                } else {
                    let cool = self.jitter(self.policy.downscale_denied_cooldown_ms);
                    self.downscale_blocked_until = now.saturating_add(cool);
                }
            }
            (Input::Unplugged { size }, Some(Action::Unplug { .. })) => {
                self.done();
                self.approved = None;
                if size.milli_cpu < self.current.milli_cpu {
                    self.cpu_settle_until = now.saturating_add(CPU_SETTLE_MS);
                }
                self.current = size;
                self.owed_release = Some(size);
                // The next step down waits `downscale_step_ms`, not a whole new low spell.
                let p = &self.policy;
                self.low_since =
                    Some(now.saturating_sub(p.downscale_after_ms).saturating_add(p.downscale_step_ms));
            }
            (Input::Released, Some(Action::Release { size })) => {
                self.done();
                self.permitted = size.max(self.current);
                self.owed_release = None;
            }
            (Input::Failed { size }, Some(action)) => self.failed(now, action, size),
            (Input::InformantConnected(up), _) => {
                self.informant_up = up;
                if !up {
                    self.owed_notify = None; // the guest onlines by itself; nobody to tell
                    self.approved = None; // approval lapses with its giver
                    self.abandon(|a| matches!(a, Action::NotifyUpscale { .. } | Action::AskDownscale { .. }));
                }
            }
            (Input::AllocatorConnected(up), _) => {
                self.allocator_up = up;
                if !up {
                    self.abandon(|a| matches!(a, Action::RequestPermit { .. } | Action::Release { .. }));
                }
            }
            (Input::Migrating(m), _) => self.migrating = m,
            (Input::Bounds { min_cus, max_cus }, _) => {
                self.min_cus = min_cus;
                self.max_cus = max_cus.max(min_cus);
            }
            // An answer with nothing (or something else) in flight: stale, ignore.
            _ => {}
        }
    }

    fn done(&mut self) {
        self.in_flight = None;
        self.failures = 0;
    }

    fn abandon(&mut self, which: impl Fn(Action) -> bool) {
        if self.in_flight.is_some_and(|f| which(f.action)) {
            self.in_flight = None;
        }
    }

    fn failed(&mut self, now: u64, action: Action, size: Option<Size>) {
        self.in_flight = None;
        self.plug_rest = false;
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(16);
        let backoff = self.policy.retry_base_ms.saturating_mul(1 << exp).min(self.policy.retry_max_ms);
        self.retry_at = now.saturating_add(self.jitter(backoff));
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
        if goal == cur || cur <= self.min_cus {
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
        let target = Size::of_cus(cur - 1, self.cu).max(self.floor()).min(self.current);
        if target == self.current {
            return None;
        }
        Some(Action::AskDownscale { target })
    }
}
