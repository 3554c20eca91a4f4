//! vsn 2.0.0 text messages (`[join_ref, ref, topic, event, payload]`) through
//! `decode_text`. The same properties as `decode_v1`, the other way round:
//! the array spliced into a vsn 1.0.0 object decodes to the same `Inbound`.
#![no_main]

use fanout_edge::protocol::Vsn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fanout_fuzz::check_text(Vsn::V2, data));
