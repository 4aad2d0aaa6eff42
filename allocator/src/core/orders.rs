//! What the cluster does with migration orders: creates them from the
//! planner's moves, adopts the ones a source agent reports after an allocator
//! restart, advances them on the source's reports, fails them at their
//! deadline, and keeps a VM whose moves failed from being planned again too
//! soon. The order itself and its transitions are in `migration`.

use super::error::{CoreError, Result};
use super::migration::{Order, OrderState};
use super::names::cut;
use super::planner;
use super::sessions::SessionRef;
use super::units::Resources;
use super::vm::{VmEntry, VmState};
use super::Cluster;
use serde::{Deserialize, Serialize};

/// A VM whose moves failed: how often in a row, and until when it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveBackoff {
    pub failures: u32,
    pub until_ms: u64,
}

impl Cluster {
    /// Re-creates an order a source agent reports after an allocator
    /// restart, once `sessions` has checked that this cluster issued it.
    pub(super) fn adopt_order(
        &mut self,
        id: u64,
        vm: &str,
        source: &str,
        target: &str,
        reserved: Resources,
        now_ms: u64,
    ) {
        if self.orders.contains_key(&id) {
            return;
        }
        self.orders.insert(
            id,
            Order {
                id,
                vm: vm.to_owned(),
                source: source.to_owned(),
                target: target.to_owned(),
                reserved,
                state: OrderState::Started,
                created_ms: now_ms,
                deadline_ms: now_ms.saturating_add(self.config.order_timeout_ms),
                reason: "adopted from the source agent's registration".into(),
            },
        );
    }

    /// Holds room on an order's target for the VM moving in, unless the target
    /// already holds or runs it. A target that has not registered yet takes
    /// the hold from the order when it does.
    pub(super) fn hold_on_target(&mut self, order_id: u64, like: &VmEntry) {
        let Some(o) = self.orders.get(&order_id) else { return };
        let Some(dst) = self.nodes.get_mut(&o.target) else { return };
        if dst.vms.contains_key(&o.vm) {
            return;
        }
        let hold = VmEntry {
            reserved: o.hold_on(dst),
            unmet: Resources::ZERO,
            state: VmState::Incoming { order: order_id },
            ..like.clone()
        };
        dst.insert(o.vm.clone(), hold);
    }

    /// The source agent reports on a migration order. Its `reason` is kept
    /// cut to `max_reason_bytes`.
    pub fn migration_status(
        &mut self,
        s: &SessionRef,
        order_id: u64,
        to: OrderState,
        reason: &str,
        now_ms: u64,
    ) -> Result<()> {
        self.owned(s)?;
        let order = self.orders.get(&order_id).ok_or(CoreError::UnknownOrder(order_id))?;
        if order.source != s.node {
            return Err(CoreError::OrderNotOwned {
                order: order_id,
                node: s.node.clone(),
                source_node: order.source.clone(),
            });
        }
        let next = order.state.transition(to, order_id)?;
        self.finish_or_advance(order_id, next, reason, now_ms);
        Ok(())
    }

    /// Whether a VM waits after failed moves at `now_ms`.
    pub fn backing_off(&self, vm: &str, now_ms: u64) -> bool {
        self.move_backoff.get(vm).is_some_and(|b| now_ms < b.until_ms)
    }

    pub(super) fn finish_or_advance(&mut self, order_id: u64, next: OrderState, reason: &str, now_ms: u64) {
        let Some(mut order) = self.orders.remove(&order_id) else { return };
        order.state = next;
        if !reason.is_empty() {
            order.reason = cut(reason, self.config.limits.max_reason_bytes).to_owned();
        }
        if !next.is_final() {
            self.orders.insert(order_id, order);
            return;
        }
        let is_ours = |e: &VmEntry| e.order() == Some(order_id);
        match next {
            OrderState::Completed => {
                self.move_backoff.remove(&order.vm);
                if let Some(src) = self.nodes.get_mut(&order.source) {
                    if src.vms.get(&order.vm).is_some_and(is_ours) {
                        src.remove(&order.vm);
                    }
                }
                if let Some(dst) = self.nodes.get_mut(&order.target) {
                    if dst.vms.get(&order.vm).is_some_and(is_ours) {
                        dst.set_state(&order.vm, VmState::Active);
                    }
                }
            }
            _ => {
                let b = self
                    .move_backoff
                    .entry(order.vm.clone())
                    .or_insert(MoveBackoff { failures: 0, until_ms: 0 });
                b.failures = b.failures.saturating_add(1);
                b.until_ms = now_ms.saturating_add(self.config.move_retry_wait_ms(b.failures));
                if let Some(dst) = self.nodes.get_mut(&order.target) {
                    if dst.vms.get(&order.vm).is_some_and(is_ours) {
                        dst.remove(&order.vm);
                    }
                }
                if let Some(src) = self.nodes.get_mut(&order.source) {
                    if src.vms.get(&order.vm).is_some_and(is_ours) {
                        src.set_state(&order.vm, VmState::Active);
                    }
                }
            }
        }
        self.finished_orders.push_back(order);
        while self.finished_orders.len() > self.config.limits.finished_orders_kept {
            self.finished_orders.pop_front();
        }
    }

    /// Fails every order past its deadline; returns the ones it failed.
    pub fn expire_orders(&mut self, now_ms: u64) -> Vec<u64> {
        let late: Vec<u64> = self
            .orders
            .values()
            .filter(|o| !o.state.is_final() && o.deadline_ms <= now_ms)
            .map(|o| o.id)
            .collect();
        for id in &late {
            self.finish_or_advance(*id, OrderState::Failed, "did not finish before its deadline", now_ms);
        }
        late
    }

    /// Plans moves off hot nodes and applies them: capacity is held on each
    /// target and the VM frozen on its source. Returns the new orders. No
    /// more than `max_open_orders` are open at once, and no id is issued
    /// that this run still holds (see `order_ids`).
    pub fn plan_and_order(&mut self, now_ms: u64) -> Vec<Order> {
        let moves = planner::plan(self, now_ms);
        let mut out = Vec::with_capacity(moves.len());
        for m in moves {
            if self.orders.len() >= self.config.limits.max_open_orders {
                break;
            }
            let held =
                |id: u64| self.orders.contains_key(&id) || self.finished_orders.iter().any(|o| o.id == id);
            let Some(id) = self.order_ids.issue(now_ms, &m.vm, &m.source, &m.target, held) else { continue };
            let order = Order {
                id,
                vm: m.vm.clone(),
                source: m.source.clone(),
                target: m.target.clone(),
                reserved: m.reserved,
                state: OrderState::Ordered,
                created_ms: now_ms,
                deadline_ms: now_ms.saturating_add(self.config.order_timeout_ms),
                reason: m.reason,
            };
            let Some(src) = self.nodes.get_mut(&m.source) else { continue };
            let Some(e) = src.vms.get(&m.vm).cloned() else { continue };
            src.set_state(&m.vm, VmState::MigratingOut { order: id });
            if let Some(dst) = self.nodes.get_mut(&m.target) {
                dst.insert(
                    m.vm.clone(),
                    VmEntry {
                        reserved: m.reserved,
                        unmet: Resources::ZERO,
                        state: VmState::Incoming { order: id },
                        ..e
                    },
                );
            }
            self.orders.insert(id, order.clone());
            out.push(order);
        }
        out
    }
}
