//! Untrusted request-plane bytes (what a frontend and a worker read from each other's TCP
//! connection, disaggregation legs included): decoding never panics, and whatever decodes
//! re-encodes to exactly the bytes it consumed.
#![no_main]

use bytes::BytesMut;
use kvgate::contract::frame::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((frame, used))) = decode(data) else { return };
    assert!(used <= data.len());
    let mut out = BytesMut::new();
    frame.encode(&mut out).expect("a decoded frame re-encodes");
    assert_eq!(&out[..], &data[..used], "{frame:?}");
});
