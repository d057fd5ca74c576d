//! The manifest parser: any text as a manifests file. Invariant: an error or a snapshot,
//! never a panic, a hang or unbounded memory (the YAML parser has a budget).
#![no_main]

use imds_agent::sources::manifests::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(snapshot) = parse(std::path::Path::new("fuzz.yaml"), &text) {
        let (pods, identities, bindings, exceptions) = snapshot.sizes();
        assert!(pods + identities + bindings + exceptions <= data.len(), "more objects than bytes");
    }
});
