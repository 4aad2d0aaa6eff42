//! The fan-out: every source sends into one channel; the hub keeps the
//! observations downscale decisions need and hands each event to the one
//! current subscriber without ever waiting for it. A subscriber that reads too
//! slowly loses events, counted; a new subscriber replaces the old one, whose
//! stream is told why it ends.

use crate::downscale::Observations;
use crate::event::Event;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vmscale_common::sync::lock;

/// An event on its way to the subscriber, with the count of events this
/// subscriber lost before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delivery {
    pub event: Event,
    pub dropped: u64,
}

/// Why a subscription ended from our side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Replaced,
}

/// The receiving end handed to the gRPC stream.
#[derive(Debug)]
pub struct Subscription {
    pub id: u64,
    pub events: mpsc::Receiver<Delivery>,
    pub ended: oneshot::Receiver<EndReason>,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    end: oneshot::Sender<EndReason>,
    dropped: u64,
}

#[derive(Debug, Default)]
struct State {
    observations: Observations,
    subscriber: Option<Subscriber>,
    next_id: u64,
}

#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    queue: usize,
    dropped_total: AtomicU64,
    delivered_total: AtomicU64,
}

impl Hub {
    /// `queue`: events buffered towards the subscriber.
    pub fn new(queue: usize) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            queue: queue.max(1),
            dropped_total: AtomicU64::new(0),
            delivered_total: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on.
        lock(&self.state)
    }

    pub fn observations(&self) -> Observations {
        self.lock().observations
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    pub fn delivered_total(&self) -> u64 {
        self.delivered_total.load(Ordering::Relaxed)
    }

    /// Makes a new subscriber current; the previous one (if any) is told it
    /// was replaced.
    pub fn subscribe(&self) -> Subscription {
        let (tx, events) = mpsc::channel(self.queue);
        let (end, ended) = oneshot::channel();
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        if let Some(old) = st.subscriber.replace(Subscriber { id, tx, end, dropped: 0 }) {
            info!(old = old.id, new = id, dropped = old.dropped, "subscription replaced by a newer one");
            let _ = old.end.send(EndReason::Replaced);
        } else {
            info!(id, "agent subscribed");
        }
        Subscription { id, events, ended }
    }

    /// Takes one event: records it and offers it to the subscriber.
    pub fn publish(&self, event: Event) {
        let mut st = self.lock();
        st.observations.observe(&event);
        let Some(sub) = st.subscriber.as_mut() else { return };
        match sub.tx.try_send(Delivery { event, dropped: sub.dropped }) {
            Ok(()) => {
                self.delivered_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                sub.dropped += 1;
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                info!(id = sub.id, dropped = sub.dropped, "agent unsubscribed");
                st.subscriber = None;
            }
        }
    }

    /// Drains the sources' channel until `cancel`; reports drops now and then.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Event>, cancel: CancellationToken) {
        let mut reported = 0;
        let mut last_report = Instant::now();
        loop {
            let ev = tokio::select! {
                () = cancel.cancelled() => return,
                ev = rx.recv() => ev,
            };
            let Some(ev) = ev else { return };
            self.publish(ev);
            let dropped = self.dropped_total();
            if dropped != reported && last_report.elapsed() >= Duration::from_secs(10) {
                warn!(
                    dropped_since = dropped - reported,
                    dropped_total = dropped,
                    "subscriber too slow; events dropped"
                );
                reported = dropped;
                last_report = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventBody, Pressure, PressureKind, Sample, SourceKind};

    fn ev(t: u64) -> Event {
        Event { monotonic_ns: t, source: SourceKind::Sampler, body: EventBody::Sample(Sample::default()) }
    }

    #[test]
    fn without_a_subscriber_events_are_only_observed() {
        let hub = Hub::new(4);
        hub.publish(ev(3));
        let p = Pressure { kind: PressureKind::PsiMemory, count: 1, stall_ns: 0, pid: 0 };
        hub.publish(Event { monotonic_ns: 4, source: SourceKind::Psi, body: EventBody::Pressure(p) });
        let o = hub.observations();
        assert_eq!(o.last_sample.map(|s| s.0), Some(3));
        assert_eq!(o.last_memory_pressure, Some((4, PressureKind::PsiMemory)));
        assert_eq!(hub.dropped_total(), 0);
    }

    #[test]
    fn a_slow_subscriber_loses_events_counted_never_blocking() {
        let hub = Hub::new(2);
        let mut sub = hub.subscribe();
        for t in 0..5 {
            hub.publish(ev(t));
        }
        assert_eq!(hub.dropped_total(), 3);
        assert_eq!(sub.events.try_recv().unwrap().dropped, 0);
        assert_eq!(sub.events.try_recv().unwrap().event.monotonic_ns, 1);
        hub.publish(ev(9));
        let d = sub.events.try_recv().unwrap();
        assert_eq!((d.event.monotonic_ns, d.dropped), (9, 3));
    }

    #[test]
    fn a_new_subscriber_replaces_the_old() {
        let hub = Hub::new(8);
        let mut first = hub.subscribe();
        hub.publish(ev(1));
        let mut second = hub.subscribe();
        assert_ne!(first.id, second.id);
        assert_eq!(first.ended.try_recv(), Ok(EndReason::Replaced));
        hub.publish(ev(2));
        assert_eq!(first.events.try_recv().unwrap().event.monotonic_ns, 1);
        assert!(first.events.try_recv().is_err());
        assert_eq!(second.events.try_recv().unwrap().event.monotonic_ns, 2);
    }

    #[test]
    fn a_gone_subscriber_is_forgotten() {
        let hub = Hub::new(8);
        drop(hub.subscribe());
        hub.publish(ev(1));
        assert!(hub.lock().subscriber.is_none());
        assert_eq!(hub.delivered_total(), 0);
    }
}
