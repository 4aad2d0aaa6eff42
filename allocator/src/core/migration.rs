//! The lifecycle of one migration order, as the allocator sees it.

use super::error::{CoreError, Result};
use super::ledger::NodeLedger;
use super::units::Resources;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Sent to the source agent; capacity is held on the target.
    Ordered,
    /// The source agent reported that the move is under way.
    Started,
    /// The VM runs on the target; the source's reservation was released.
    Completed,
    /// The VM still runs on the source; the target's hold was released.
    Failed,
}

impl OrderState {
    pub fn name(self) -> &'static str {
        match self {
            OrderState::Ordered => "ordered",
            OrderState::Started => "started",
            OrderState::Completed => "completed",
            OrderState::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, OrderState::Completed | OrderState::Failed)
    }

    /// The one place that says which steps a migration may take. A move may
    /// finish without a `Started` report (a fast move, or a lost message).
    pub fn transition(self, to: OrderState, order: u64) -> Result<OrderState> {
        use OrderState::*;
        match (self, to) {
            (Ordered, Started) | (Ordered | Started, Completed) | (Ordered | Started, Failed) => Ok(to),
            _ => Err(CoreError::BadTransition { order, from: self.name(), to: to.name() }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    pub vm: String,
    pub source: String,
    pub target: String,
    /// Held on the target for the incoming VM: its reservation plus unmet demand.
    pub reserved: Resources,
    pub state: OrderState,
    /// Milliseconds on the core's clock.
    pub created_ms: u64,
    pub deadline_ms: u64,
    pub reason: String,
}

impl Order {
    /// What the order holds on its target: its reservation, never more than
    /// the target's usable capacity (an adopted order's size is the source
    /// agent's word, which must not block a whole other node and more).
    pub fn hold_on(&self, target: &NodeLedger) -> Resources {
        self.reserved.min(target.usable())
    }
}

#[cfg(test)]
mod tests {
    use super::OrderState::{self, *};

    #[test]
    fn every_transition_pair() {
        let all = [Ordered, Started, Completed, Failed];
        let allowed = [
            (Ordered, Started),
            (Ordered, Completed),
            (Ordered, Failed),
            (Started, Completed),
            (Started, Failed),
        ];
        for from in all {
            for to in all {
                let got = from.transition(to, 7);
                if allowed.contains(&(from, to)) {
                    assert_eq!(got, Ok(to), "{from:?} -> {to:?}");
                } else {
                    let e = got.unwrap_err();
                    assert!(e.to_string().contains("order 7"), "{e}");
                }
            }
        }
    }

    #[test]
    fn final_states() {
        let finals: Vec<OrderState> =
            [Ordered, Started, Completed, Failed].into_iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals, vec![Completed, Failed]);
    }
}
