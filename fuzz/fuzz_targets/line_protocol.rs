//! Fuzz target `line_protocol`: see `netsel::fuzzing::line_protocol` and docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netsel::fuzzing::line_protocol(data));
