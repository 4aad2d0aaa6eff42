//! Kubernetes quantities (`500m`, `1Gi`, `1e3`) as the contract reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmscale_contract::quantity;

fuzz_target!(|s: &str| {
    let _ = quantity::milli_cpu(s);
    let _ = quantity::is_decimal(s);
    let whole = quantity::whole_bytes(s);
    // A whole number of bytes is a number of bytes.
    if let Some(b) = whole {
        assert_eq!(quantity::bytes(s), Some(b), "{s:?}");
    } else {
        let _ = quantity::bytes(s);
    }
});
