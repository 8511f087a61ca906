//! Untrusted request bodies: parsing and validation must never panic, whatever the bytes.
#![no_main]

use kvgate::openai::{ChatCompletionRequest, CompletionRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        let _ = r.validate();
    }
    if let Ok(r) = serde_json::from_slice::<CompletionRequest>(data) {
        let _ = r.validate();
    }
});
