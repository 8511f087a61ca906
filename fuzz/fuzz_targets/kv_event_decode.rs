//! Untrusted KV event batches (what workers publish on NATS): validation must never panic,
//! whatever the bytes, and whatever it accepts must survive a round trip unchanged.
#![no_main]

use kvgate::contract::codec::{decode_batch, encode_batch, AlignedPayload};
use kvgate::contract::events::KvEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // libFuzzer's buffer is usually aligned; try it one byte off as well, as NATS delivers it.
    let mut shifted = Vec::with_capacity(data.len() + 1);
    shifted.push(0);
    shifted.extend_from_slice(data);
    for bytes in [data, &shifted[1..]] {
        let payload = AlignedPayload::new(bytes);
        let Ok(batch) = payload.access() else {
            assert!(decode_batch(bytes).is_err());
            continue;
        };
        let events: Vec<KvEvent> = batch.iter().map(KvEvent::from).collect();
        assert_eq!(decode_batch(bytes).expect("accessed, so decodes"), events);
        let wire = encode_batch(&events).expect("an accepted batch re-encodes");
        assert_eq!(decode_batch(&wire).expect("re-encoded batch decodes"), events);
    }
});
