//! The informant's edge: any bytes as the agent's requests, through the
//! conversions its service runs (`informant/src/convert.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vmscale_informant::convert::{self, UpscaleTarget};
use vmscale_informant::downscale::DownscaleTarget;
use vmscale_proto::informant as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            if let Ok(r) = pb::DownscaleRequest::decode(rest) {
                let _ = DownscaleTarget::try_from(&r);
                let _ = convert::cpu_mode(r.cpu_mode);
            }
        }
        1 => {
            if let Ok(r) = pb::UpscaleNotice::decode(rest) {
                let _ = UpscaleTarget::try_from(&r);
                let _ = convert::cpu_mode(r.cpu_mode);
            }
        }
        _ => {
            if let Ok(r) = pb::HandshakeRequest::decode(rest) {
                let _ = convert::version_range(r.versions.as_ref());
            }
        }
    }
});
