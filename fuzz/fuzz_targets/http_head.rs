//! Fuzz target `http_head`: see `netsel::fuzzing::http_head` and docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netsel::fuzzing::http_head(data));
