//! vsn 1.0.0 text messages (`{"topic", "event", "payload", "ref", "join_ref"}`)
//! through `decode_text`. Asserts, beyond not panicking: the same message
//! spliced into the vsn 2.0.0 array decodes to the same `Inbound` (or both
//! are refused); `peek_refs` reads the refs and topic the decoder read; a
//! JSON broadcast's payload is JSON text and reaches vsn 1.0.0 and 2.0.0
//! members byte for byte; every reply the connection would send (ok, or the
//! error for a message that did not decode) is a well-formed message
//! addressed to the client's refs.
#![no_main]

use fanout_edge::protocol::Vsn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fanout_fuzz::check_text(Vsn::V1, data));
