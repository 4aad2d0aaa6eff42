//! Migration order ids the allocator recognises as its own, even after a
//! restart, without keeping anything on disk (ARCHITECTURE.md, "Rules of the
//! protocol", rule 4): a restarted allocator learns its open orders from the
//! source agents' hellos, and must adopt only those it issued.
//!
//! An id is 64 bits, because agents already store and report it as a
//! `uint64` (their durable move records included), so no agent changes:
//!
//! ```text
//!   63            38 37   35 34                             0
//!  +----------------+-------+-------------------------------+
//!  | minute (26 bit)|attempt|  tag (35 bit)                 |
//!  +----------------+-------+-------------------------------+
//! ```
//!
//! - `minute`: when it was issued, in minutes since 2026-01-01 UTC (good
//!   for 127 years). An adopted order expires as a live one would, at its
//!   issue time plus `order_timeout_ms`, so an old id cannot be replayed
//!   to hold room again; an id dated in the future is refused.
//! - `attempt`: 0 to 7, so that the same move can be ordered again within
//!   one minute (after a failure and its backoff) under a new id.
//! - `tag`: HMAC-SHA256 under the cluster's order key of the minute, the
//!   attempt, the VM, the source node and the target node, cut to 35 bits.
//!   An id is adopted only for the very move it was issued for: replayed
//!   for another VM or towards another node, it does not verify. A guessed
//!   id is right once in 2^35 tries (2^34 on average to the first hit); a
//!   hello carries at most `max_vms_per_node` guesses, each refused, logged
//!   and counted (`vmscale_allocator_errors_total{kind="hello_vm",
//!   error="forged_order"}`): some 16 million hellos for one forged hold,
//!   and only for an agent that already holds a valid node certificate.
//!
//! Ids are unique: the core never issues an id it holds (open or finished;
//! after 8 attempts within a minute the move waits for the next minute).
//! A new run stamps its ids at least one minute after its start, so it does
//! not repeat one of a previous run's ids either (up to the clock skew
//! between the two runs).

use sha2::{Digest, Sha256};

/// 2026-01-01T00:00:00Z, Unix milliseconds.
const EPOCH_MS: u64 = 1_767_225_600_000;
const MINUTE_MS: u64 = 60_000;
const TAG_BITS: u32 = 35;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const ATTEMPT_BITS: u32 = 3;
/// Ids one move can have within one minute.
pub const ATTEMPTS: u64 = 1 << ATTEMPT_BITS;
const STAMP_SHIFT: u32 = TAG_BITS + ATTEMPT_BITS;
const MAX_MINUTE: u64 = (1 << (64 - STAMP_SHIFT)) - 1;
/// Minutes an id may be dated ahead of this allocator's clock: another
/// replica's clock may run ahead, and a new run stamps one minute ahead.
const SKEW_MINUTES: u64 = 2;
/// Shortest order key accepted: HMAC-SHA256's own output size.
pub const MIN_KEY_BYTES: usize = 32;

/// Why an order id reported in a hello is not adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderIdError {
    #[error(
        "migration order {id} was not issued by this cluster's allocator for vm {vm:?} from node \
         {source_node:?} to node {target:?} (its signature does not match: a forged id, one issued for \
         another move, or an order key that changed)"
    )]
    Forged { id: u64, vm: String, source_node: String, target: String },
    #[error("migration order {id} expired {minutes_ago} minutes ago; the move is over as far as the allocator is concerned")]
    Expired { id: u64, minutes_ago: u64 },
    #[error("migration order {id} is dated {minutes_ahead} minutes ahead of this allocator's clock; check the clocks")]
    Future { id: u64, minutes_ahead: u64 },
}

/// Issues and checks order ids. Pure: the caller passes the time, as the
/// core's clock (ms since `started_wall_ms`, the allocator's start in Unix ms).
#[derive(Clone)]
pub struct OrderIds {
    key: HmacKey,
    started_wall_ms: u64,
}

/// The key stays out of logs and state dumps.
impl std::fmt::Debug for OrderIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderIds").field("started_wall_ms", &self.started_wall_ms).finish_non_exhaustive()
    }
}

impl OrderIds {
    /// `key`: the cluster's order key (at least [`MIN_KEY_BYTES`], checked
    /// where it is loaded).
    pub fn new(key: &[u8], started_wall_ms: u64) -> Self {
        OrderIds { key: HmacKey::new(key), started_wall_ms }
    }

    /// A random key of its own, for one run that no other run must trust
    /// (tests, benchmarks, an allocator given no `order_key`). Its clock
    /// counts from the epoch, so ids stay apart by the minute as the core's
    /// clock advances.
    pub fn one_run() -> Self {
        let key: [u8; MIN_KEY_BYTES] = rand::random();
        OrderIds::new(&key, EPOCH_MS)
    }

    fn minute(&self, now_ms: u64) -> u64 {
        (self.started_wall_ms.saturating_add(now_ms).saturating_sub(EPOCH_MS) / MINUTE_MS).min(MAX_MINUTE)
    }

    fn tag(&self, minute: u64, attempt: u64, vm: &str, source: &str, target: &str) -> u64 {
        let mut msg = Vec::with_capacity(64 + vm.len() + source.len() + target.len());
        msg.extend_from_slice(b"vmscale migration order v1\0");
        msg.extend_from_slice(&minute.to_be_bytes());
        msg.extend_from_slice(&attempt.to_be_bytes());
        // Length-prefixed, so that no two (vm, source, target) share an input.
        for s in [vm, source, target] {
            msg.extend_from_slice(&(s.len() as u64).to_be_bytes());
            msg.extend_from_slice(s.as_bytes());
        }
        let mac = self.key.sign(&msg);
        let mut first = [0u8; 8];
        first.copy_from_slice(&mac[..8]);
        u64::from_be_bytes(first) & TAG_MASK
    }

    /// The id of a new order at `now_ms`, stamped no earlier than the minute
    /// after this run's start: the first of the minute's attempts that
    /// `held` does not hold, if any.
    pub fn issue(
        &self,
        now_ms: u64,
        vm: &str,
        source: &str,
        target: &str,
        held: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        let minute = self.minute(now_ms).max(self.minute(0).saturating_add(1)).min(MAX_MINUTE);
        (0..ATTEMPTS)
            .map(|attempt| {
                (minute << STAMP_SHIFT)
                    | (attempt << TAG_BITS)
                    | self.tag(minute, attempt, vm, source, target)
            })
            .find(|id| !held(*id))
    }

    /// Whether `id` is an order this cluster issued for moving `vm` from
    /// `source` to `target` that is still live at `now_ms`, given orders
    /// live `timeout_ms`.
    pub fn check(
        &self,
        id: u64,
        vm: &str,
        source: &str,
        target: &str,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<(), OrderIdError> {
        let minute = id >> STAMP_SHIFT;
        let attempt = (id >> TAG_BITS) & (ATTEMPTS - 1);
        // A u64 comparison: no timing to learn a tag from, bit by bit.
        if id & TAG_MASK != self.tag(minute, attempt, vm, source, target) {
            return Err(OrderIdError::Forged {
                id,
                vm: vm.to_owned(),
                source_node: source.to_owned(),
                target: target.to_owned(),
            });
        }
        let now = self.minute(now_ms);
        if minute > now.saturating_add(SKEW_MINUTES) {
            return Err(OrderIdError::Future { id, minutes_ahead: minute - now });
        }
        // Issued some time within its minute: the end of that minute counts.
        let live_until = minute.saturating_add(1).saturating_add(timeout_ms.div_ceil(MINUTE_MS));
        if now > live_until {
            return Err(OrderIdError::Expired { id, minutes_ago: now - live_until });
        }
        Ok(())
    }
}

/// HMAC-SHA256 (RFC 2104) with its key pads computed once.
#[derive(Clone)]
struct HmacKey {
    inner: [u8; 64],
    outer: [u8; 64],
}

impl HmacKey {
    fn new(key: &[u8]) -> Self {
        // A key longer than the block is hashed first; a shorter one is
        // padded with zeros.
        let mut block = [0u8; 64];
        if key.len() > block.len() {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        HmacKey { inner: block.map(|b| b ^ 0x36), outer: block.map(|b| b ^ 0x5c) }
    }

    fn sign(&self, msg: &[u8]) -> [u8; 32] {
        let inner = Sha256::new().chain_update(self.inner).chain_update(msg).finalize();
        Sha256::new().chain_update(self.outer).chain_update(inner).finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-06 08:00 UTC.
    const START: u64 = EPOCH_MS + 339 * 86_400_000 + 8 * 3_600_000;
    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const TIMEOUT: u64 = 600_000;

    fn ids() -> OrderIds {
        OrderIds::new(KEY, START)
    }

    #[test]
    fn an_issued_id_checks_for_its_own_move_only() {
        let o = ids();
        let id = o.issue(5_000, "x", "a", "b", |_| false).unwrap();
        assert_eq!(o.check(id, "x", "a", "b", 6_000, TIMEOUT), Ok(()));
        // Another allocator run with the same key adopts it too.
        let restarted = OrderIds::new(KEY, START + 120_000);
        assert_eq!(restarted.check(id, "x", "a", "b", 0, TIMEOUT), Ok(()));
        for (vm, src, dst) in [("y", "a", "b"), ("x", "c", "b"), ("x", "a", "c"), ("xa", "", "b")] {
            let e = o.check(id, vm, src, dst, 6_000, TIMEOUT).unwrap_err();
            assert!(matches!(e, OrderIdError::Forged { .. }), "{vm} {src} {dst}: {e}");
        }
        // Another cluster's key.
        let other = OrderIds::new(b"another cluster's key, 32 bytes!", START);
        assert!(matches!(other.check(id, "x", "a", "b", 6_000, TIMEOUT), Err(OrderIdError::Forged { .. })));
    }

    #[test]
    fn hostile_ids_are_refused() {
        let o = ids();
        for id in [0, 1, 41, u64::MAX, u64::MAX >> 1, 1 << 63] {
            let e = o.check(id, "x", "a", "b", 0, TIMEOUT).unwrap_err();
            assert!(e.to_string().contains("not issued by this cluster"), "{id}: {e}");
        }
        // Every bit of the tag counts.
        let id = o.issue(0, "x", "a", "b", |_| false).unwrap();
        for bit in 0..64 {
            assert!(o.check(id ^ (1 << bit), "x", "a", "b", 0, TIMEOUT).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn ids_expire_with_their_order_and_are_not_dated_ahead() {
        let o = ids();
        let id = o.issue(0, "x", "a", "b", |_| false).unwrap();
        // Live for the timeout after the minute it was stamped in.
        assert_eq!(o.check(id, "x", "a", "b", 60_000 + TIMEOUT + 59_999, TIMEOUT), Ok(()));
        let e = o.check(id, "x", "a", "b", 60_000 + TIMEOUT + 3 * 60_000, TIMEOUT).unwrap_err();
        assert!(matches!(e, OrderIdError::Expired { minutes_ago: 1.., .. }), "{e}");
        // A replica whose clock runs 10 minutes behind sees it as dated ahead.
        let behind = OrderIds::new(KEY, START - 10 * 60_000);
        let e = behind.check(id, "x", "a", "b", 0, TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("ahead"), "{e}");
    }

    #[test]
    fn a_run_stamps_its_ids_after_its_start_minute() {
        let o = ids();
        let none = |_| false;
        let first = o.issue(0, "x", "a", "b", none).unwrap();
        assert_eq!(first >> STAMP_SHIFT, o.minute(0) + 1);
        // Later in the run ids follow the clock.
        let later = o.issue(10 * 60_000, "x", "a", "b", none).unwrap();
        assert_eq!(later >> STAMP_SHIFT, o.minute(0) + 10);
        assert_ne!(first, later);
        // The same move again within the minute: the next attempt, which
        // checks as well; after eight, none until the next minute.
        let mut held = vec![later];
        for _ in 1..ATTEMPTS {
            let next = o.issue(10 * 60_000 + 1, "x", "a", "b", |id| held.contains(&id)).unwrap();
            assert!(!held.contains(&next));
            assert_eq!(o.check(next, "x", "a", "b", 10 * 60_000, TIMEOUT), Ok(()));
            held.push(next);
        }
        assert_eq!(o.issue(10 * 60_000 + 2, "x", "a", "b", |id| held.contains(&id)), None);
        assert!(o.issue(11 * 60_000, "x", "a", "b", |id| held.contains(&id)).is_some());
    }

    /// RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let cases: [(&[u8], &[u8], &str); 3] = [
            (&[0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, msg, want) in cases {
            assert_eq!(hex(&HmacKey::new(key).sign(msg)), want);
        }
    }

    #[test]
    fn the_key_is_not_printed() {
        assert!(!format!("{:?}", ids()).contains("0123"));
    }
}
