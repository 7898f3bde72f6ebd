//! Fuzz target `dns`: see `netsel::fuzzing::dns_query` and docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netsel::fuzzing::dns_query(data));
