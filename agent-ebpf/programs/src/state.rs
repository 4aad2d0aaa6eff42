//! Atomic access to one kind's entry in the `STATE` array map. Programs on
//! different CPUs update the same entry at once, so updates are BPF atomic
//! instructions. Rust's `AtomicU64` has no read-modify-write operations on
//! the BPF target (it declares no compare-and-swap), so they are written as
//! inline assembly; aligned 64-bit loads and stores are single instructions
//! and cannot tear.

use core::arch::asm;

use vmscale_ebpf_common::Kind;

use crate::{Error, STATE};

/// One u64 field of a `KindState` in the map.
pub struct Field(*mut u64);

impl Field {
    pub fn load(&self) -> u64 {
        // SAFETY: see `StateEntry::of`: the pointer is valid and aligned.
        unsafe { self.0.read_volatile() }
    }

    pub fn store(&self, v: u64) {
        // SAFETY: as in `load`.
        unsafe { self.0.write_volatile(v) }
    }

    pub fn fetch_add(&self, v: u64) {
        // SAFETY: as in `load`; BPF_ATOMIC | BPF_ADD on a map value is
        // allowed by the verifier and touches only these 8 bytes.
        unsafe { asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) self.0, v = in(reg) v) }
    }

    /// Sets the field to `new` if it still holds `old`; true if this call did.
    pub fn claim(&self, old: u64, new: u64) -> bool {
        let prev: u64;
        // SAFETY: as in `fetch_add`; BPF_CMPXCHG (kernel 5.12+) compares
        // with r0 and leaves the previous value there.
        unsafe {
            asm!(
                "r0 = cmpxchg_64({p} + 0, r0, {new})",
                p = in(reg) self.0,
                new = in(reg) new,
                inout("r0") old => prev,
            )
        }
        prev == old
    }
}

pub struct StateEntry {
    pub count: Field,
    pub stall_ns: Field,
    pub reclaimed_pages: Field,
    pub dropped: Field,
    pub last_event_ns: Field,
    pub last_emit_ns: Field,
}

impl StateEntry {
    pub fn of(kind: Kind) -> Result<StateEntry, Error> {
        let p = STATE.get_ptr_mut(kind as u32).ok_or(Error::NoState)?;
        // SAFETY: `p` comes from a successful array map lookup, so it points
        // to a live, 8-byte aligned `KindState` (repr(C), only u64 fields)
        // that the kernel never frees while the map exists, and the map lives
        // as long as the programs using it; so do the field pointers taken
        // here. Programs on other CPUs change these fields at the same time,
        // so `Field` never makes a reference to them: only volatile 8-byte
        // loads and stores, and BPF atomics. `addr_of_mut!` takes the field
        // addresses without a reference to the struct.
        unsafe {
            Ok(StateEntry {
                count: Field(core::ptr::addr_of_mut!((*p).count)),
                stall_ns: Field(core::ptr::addr_of_mut!((*p).stall_ns)),
                reclaimed_pages: Field(core::ptr::addr_of_mut!((*p).reclaimed_pages)),
                dropped: Field(core::ptr::addr_of_mut!((*p).dropped)),
                last_event_ns: Field(core::ptr::addr_of_mut!((*p).last_event_ns)),
                last_emit_ns: Field(core::ptr::addr_of_mut!((*p).last_emit_ns)),
            })
        }
    }
}
