//! Which threads are watched for which VM, and the per-VM figures of one
//! interval, from the cumulative per-thread entries the programs keep.
//!
//! Pure over the [`StatsMap`] boundary: the kernel maps in production, a
//! fake here in the tests.

use std::collections::BTreeMap;

use serde::Serialize;
use vmscale_ebpf_common::sched::{rq_bucket_range, RqStats, RQ_HIST_BUCKETS};

use super::Result;

/// The two maps the programs share with us, as far as the tracker needs them.
pub trait StatsMap {
    /// Starts watching `tid`: a zeroed entry.
    fn watch(&mut self, tid: u32) -> Result<()>;
    /// Stops watching `tid`; a thread that is not watched is no error.
    fn unwatch(&mut self, tid: u32) -> Result<()>;
    /// The entry of `tid`, if watched.
    fn get(&self, tid: u32) -> Result<Option<RqStats>>;
    /// Sets the epoch the programs file their longest waits under.
    fn set_epoch(&mut self, epoch: u64) -> Result<()>;
}

/// Run-queue delay of one VM's vCPU threads over one interval: waits from
/// becoming runnable to running, all threads together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RunQueueDelay {
    /// Waits measured.
    pub samples: u64,
    pub sum_ns: u64,
    pub mean_ns: u64,
    /// Median and 99th percentile, from the log2 histogram: interpolated
    /// inside the bucket, never above `max_ns`.
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// The longest wait, exact.
    pub max_ns: u64,
}

impl RunQueueDelay {
    /// The figures of an interval from its histogram, sum, count and maximum.
    pub fn from_interval(hist: &[u64; RQ_HIST_BUCKETS], sum_ns: u64, count: u64, max_ns: u64) -> Self {
        let total: u64 = hist.iter().sum();
        RunQueueDelay {
            samples: count,
            sum_ns,
            mean_ns: sum_ns.checked_div(count).unwrap_or(0),
            p50_ns: quantile(hist, total, 50, max_ns),
            p99_ns: quantile(hist, total, 99, max_ns),
            max_ns,
        }
    }
}

/// The `pct`th percentile of a log2 histogram with `total` entries, ns:
/// the bucket that holds the rank, interpolated linearly inside it, capped
/// at the exact maximum when that is known (> 0).
fn quantile(hist: &[u64; RQ_HIST_BUCKETS], total: u64, pct: u64, max_ns: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    // The smallest rank with at least pct% of the entries at or below it.
    let rank = (u128::from(total) * u128::from(pct)).div_ceil(100).max(1);
    let mut below: u128 = 0;
    for (b, &n) in hist.iter().enumerate() {
        let n = u128::from(n);
        if n > 0 && below + n >= rank {
            let (lo, hi) = rq_bucket_range(b);
            // The open-ended last bucket: assume it is one octave wide.
            let hi = if b + 1 == RQ_HIST_BUCKETS { lo.saturating_mul(2) } else { hi };
            let width = u128::from(hi - lo);
            let at = u128::from(lo) + width * (rank - below) / n;
            let at = u64::try_from(at).unwrap_or(u64::MAX);
            return if max_ns > 0 { at.min(max_ns) } else { at };
        }
        below += n;
    }
    max_ns
}

/// What was read of a thread last time: the interval's start.
#[derive(Debug, Clone, Copy, Default)]
struct Baseline {
    sum_ns: u64,
    count: u64,
    hist: [u64; RQ_HIST_BUCKETS],
}

#[derive(Debug, Clone)]
struct Thread {
    vm: String,
    base: Baseline,
}

/// The watched threads, by VM, and where each one's last interval ended.
#[derive(Debug)]
pub struct Tracker<M> {
    map: M,
    threads: BTreeMap<u32, Thread>,
    /// VMs we were told about, also those without threads (they report zero).
    vms: BTreeMap<String, ()>,
    epoch: u64,
}

impl<M: StatsMap> Tracker<M> {
    pub fn new(map: M) -> Self {
        Tracker { map, threads: BTreeMap::new(), vms: BTreeMap::new(), epoch: 0 }
    }

    /// Makes `tids` the watched threads of `vm`: new ones are added (their
    /// interval starts now), ones that went away are dropped. A thread listed
    /// for another VM before moves to this one.
    pub fn set_threads(&mut self, vm: &str, tids: &[u32]) -> Result<()> {
        let gone: Vec<u32> =
            self.threads.iter().filter(|(t, th)| th.vm == vm && !tids.contains(t)).map(|(t, _)| *t).collect();
        for t in gone {
            self.map.unwatch(t)?;
            self.threads.remove(&t);
        }
        for &t in tids {
            match self.threads.get_mut(&t) {
                Some(th) => {
                    if th.vm != vm {
                        th.vm = vm.to_owned();
                    }
                }
                None => {
                    self.map.watch(t)?;
                    self.threads.insert(t, Thread { vm: vm.to_owned(), base: Baseline::default() });
                }
            }
        }
        self.vms.insert(vm.to_owned(), ());
        Ok(())
    }

    /// Stops watching every VM `keep` says no to.
    pub fn retain_vms(&mut self, keep: impl Fn(&str) -> bool) -> Result<()> {
        let drop_vms: Vec<String> = self.vms.keys().filter(|v| !keep(v)).cloned().collect();
        for vm in drop_vms {
            self.set_threads(&vm, &[])?;
            self.vms.remove(&vm);
        }
        Ok(())
    }

    /// The maps underneath.
    pub fn map(&self) -> &M {
        &self.map
    }

    /// Thread ids watched now, for tests and the state dump.
    pub fn watched(&self) -> impl Iterator<Item = (u32, &str)> {
        self.threads.iter().map(|(t, th)| (*t, th.vm.as_str()))
    }

    /// Every VM's figures since the previous read (or since its threads were
    /// first watched). Starts a new epoch first, so that the programs file
    /// later waits' maxima in the other slot while we read this one.
    pub fn read(&mut self) -> Result<BTreeMap<String, RunQueueDelay>> {
        let epoch = self.epoch;
        self.map.set_epoch(epoch.wrapping_add(1))?;
        self.epoch = epoch.wrapping_add(1);
        let slot = (epoch & 1) as usize;

        #[derive(Default)]
        struct Acc {
            hist: [u64; RQ_HIST_BUCKETS],
            sum: u64,
            count: u64,
            max: u64,
        }
        let mut acc: BTreeMap<&str, Acc> = self.vms.keys().map(|v| (v.as_str(), Acc::default())).collect();
        for (tid, th) in &mut self.threads {
            let Some(now) = self.map.get(*tid)? else { continue };
            let a = acc.entry(th.vm.as_str()).or_default();
            a.sum = a.sum.wrapping_add(now.delay_sum_ns.wrapping_sub(th.base.sum_ns));
            a.count = a.count.wrapping_add(now.count.wrapping_sub(th.base.count));
            for (h, (n, b)) in a.hist.iter_mut().zip(now.hist.iter().zip(th.base.hist.iter())) {
                *h = h.wrapping_add(n.wrapping_sub(*b));
            }
            if now.max_epoch[slot] == epoch {
                a.max = a.max.max(now.max_ns[slot]);
            }
            th.base = Baseline { sum_ns: now.delay_sum_ns, count: now.count, hist: now.hist };
        }
        Ok(acc
            .into_iter()
            .map(|(vm, a)| (vm.to_owned(), RunQueueDelay::from_interval(&a.hist, a.sum, a.count, a.max)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use vmscale_ebpf_common::sched::rq_bucket;

    /// The kernel side, played by hand: `wait` does what `rq_switch` does
    /// when a watched thread gets the CPU.
    #[derive(Debug, Default)]
    struct FakeMap {
        entries: HashMap<u32, RqStats>,
        epoch: u64,
    }

    impl FakeMap {
        fn wait(&mut self, tid: u32, ns: u64) {
            let epoch = self.epoch;
            let Some(e) = self.entries.get_mut(&tid) else { return };
            e.delay_sum_ns += ns;
            e.count += 1;
            e.hist[rq_bucket(ns)] += 1;
            let s = (epoch & 1) as usize;
            if e.max_epoch[s] != epoch {
                e.max_ns[s] = ns;
                e.max_epoch[s] = epoch;
            } else {
                e.max_ns[s] = e.max_ns[s].max(ns);
            }
        }
    }

    impl StatsMap for FakeMap {
        fn watch(&mut self, tid: u32) -> Result<()> {
            self.entries.insert(tid, RqStats::default());
            Ok(())
        }
        fn unwatch(&mut self, tid: u32) -> Result<()> {
            self.entries.remove(&tid);
            Ok(())
        }
        fn get(&self, tid: u32) -> Result<Option<RqStats>> {
            Ok(self.entries.get(&tid).copied())
        }
        fn set_epoch(&mut self, epoch: u64) -> Result<()> {
            self.epoch = epoch;
            Ok(())
        }
    }

    fn tracker() -> Tracker<FakeMap> {
        Tracker::new(FakeMap::default())
    }

    #[test]
    fn intervals_are_differences_and_max_is_per_interval() {
        let mut t = tracker();
        t.set_threads("a", &[10, 11]).unwrap();
        t.set_threads("b", &[20]).unwrap();
        for ns in [1_000, 3_000, 100_000] {
            t.map.wait(10, ns);
        }
        t.map.wait(11, 2_000);
        let r = t.read().unwrap();
        let a = r["a"];
        assert_eq!((a.samples, a.sum_ns, a.mean_ns, a.max_ns), (4, 106_000, 26_500, 100_000));
        assert_eq!(r["b"], RunQueueDelay::default(), "a VM without waits reports zeros");

        // Next interval: only what happened since, and the old max is gone.
        t.map.wait(10, 5_000);
        let a = t.read().unwrap()["a"];
        assert_eq!((a.samples, a.sum_ns, a.max_ns), (1, 5_000, 5_000));
        // Two epochs later the slot is reused; a quiet interval has no max.
        let a = t.read().unwrap()["a"];
        assert_eq!((a.samples, a.max_ns), (0, 0));
        t.map.wait(11, 7_000);
        assert_eq!(t.read().unwrap()["a"].max_ns, 7_000);
    }

    #[test]
    fn threads_follow_their_vm_and_unknown_threads_stay_out() {
        let mut t = tracker();
        t.set_threads("a", &[10, 11]).unwrap();
        t.map.wait(12, 1_000_000); // not watched: the fake, like the kernel, has no entry
        assert_eq!(t.read().unwrap()["a"].samples, 0);
        // 11 left, 13 came: 11's entry is gone, 13 starts from zero.
        t.set_threads("a", &[10, 13]).unwrap();
        assert!(!t.map.entries.contains_key(&11) && t.map.entries.contains_key(&13));
        // 10 moved to b.
        t.set_threads("b", &[10]).unwrap();
        t.map.wait(10, 4_000);
        let r = t.read().unwrap();
        assert_eq!((r["a"].samples, r["b"].samples), (0, 1));
        t.retain_vms(|v| v == "a").unwrap();
        assert!(!t.map.entries.contains_key(&10));
        assert_eq!(t.watched().map(|(tid, _)| tid).collect::<Vec<_>>(), vec![13]);
        assert!(!t.read().unwrap().contains_key("b"));
    }

    #[test]
    fn quantiles_from_the_histogram() {
        let mut hist = [0u64; RQ_HIST_BUCKETS];
        // 99 waits in [1024, 2048) ns, one in [2^20, 2^21).
        hist[10] = 99;
        hist[20] = 1;
        let d = RunQueueDelay::from_interval(&hist, 99 * 1_500 + 1_500_000, 100, 1_500_000);
        // Median: rank 50 of 99 in the bucket: 1024 + 1024 * 50 / 99.
        assert_eq!(d.p50_ns, 1024 + 1024 * 50 / 99);
        // p99: rank 99, the bucket's last entry: its upper bound.
        assert_eq!(d.p99_ns, 2048);
        let mut hist2 = hist;
        hist2[10] = 98;
        hist2[20] = 2;
        // p99 now in the top bucket, capped at the exact max.
        let d = RunQueueDelay::from_interval(&hist2, 0, 100, 1_500_000);
        assert_eq!(d.p99_ns, 1_500_000);
        // No waits: all zero; no max known: not capped.
        assert_eq!(RunQueueDelay::from_interval(&[0; RQ_HIST_BUCKETS], 0, 0, 0), RunQueueDelay::default());
        let mut top = [0u64; RQ_HIST_BUCKETS];
        top[RQ_HIST_BUCKETS - 1] = 1;
        assert_eq!(quantile(&top, 1, 99, 0), 1 << 32);
    }
}
