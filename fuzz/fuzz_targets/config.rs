//! Fuzz target `config`: see `netsel::fuzzing::config` and docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netsel::fuzzing::config(data));
