//! Untrusted KV transfer headers (what a decode worker reads from a prefill worker's
//! connection): decoding never panics, and an accepted header survives a round trip.
#![no_main]

use kvgate::planes::transfer::wire::{decode_header, encode_header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..HEADER_LEN) else { return };
    let bytes: &[u8; HEADER_LEN] = bytes.try_into().expect("HEADER_LEN bytes");
    let Ok(header) = decode_header(bytes) else { return };
    let again = decode_header(&encode_header(&header)).expect("an encoded header decodes");
    assert_eq!(again, header);
});
