//! The agent's pure core: what one VM should be, and the next step to get
//! there. No I/O, no clock of its own; executors around it act.

pub mod policy;
pub mod polling;
pub mod pressure;
pub mod vm;

#[cfg(test)]
mod first_plug_tests;
#[cfg(test)]
mod loop_rules_tests;
#[cfg(test)]
mod tests;
