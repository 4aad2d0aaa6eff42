//! Every daemon's config file (and the agent's VM list): TOML through
//! parsing and `validate()`. A config is not remote input, but a bad one
//! must be an error a person can act on, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 4 {
        0 => {
            let _ = vmscale_allocator::config::Config::parse(text, "fuzz");
        }
        1 => {
            if let Ok(c) = toml::from_str::<vmscale_agent::config::Config>(text) {
                let _ = c.validate();
            }
        }
        2 => {
            let _ = vmscale_informant::config::Config::parse(text, "fuzz");
        }
        _ => {
            let _ = vmscale_agent::vms::file::parse(text, "fuzz");
        }
    }
});
