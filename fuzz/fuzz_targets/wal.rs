//! Fuzz target `wal`: see `netsel::fuzzing::wal` and docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| netsel::fuzzing::wal(data));
