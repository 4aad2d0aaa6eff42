//! A pod's `vmscale.io/*` annotations, written by whoever may create pods,
//! through the one parser the agent and the extender share (`contract/`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use vmscale_contract::keys::SPEC_KEYS;
use vmscale_contract::InformantAddr;

#[derive(Debug, Arbitrary)]
struct Pod {
    /// Values for the known keys (by index), so the parser gets past the
    /// key check and into each value's own parser.
    known: Vec<(u8, String)>,
    /// Any other keys, typos and foreign prefixes included.
    other: Vec<(String, String)>,
    namespace: String,
    name: String,
}

fuzz_target!(|pod: Pod| {
    let mut a = BTreeMap::new();
    for (k, v) in pod.known {
        a.insert(SPEC_KEYS[usize::from(k) % SPEC_KEYS.len()].to_owned(), v);
    }
    for (k, v) in pod.other {
        a.insert(k, v);
    }
    if let Some(addr) = a.get(vmscale_contract::keys::INFORMANT) {
        let _ = InformantAddr::try_from(addr.clone());
    }
    let _ = vmscale_contract::parse(&a, &pod.namespace, &pod.name);
});
