#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| couchfile::fuzzing::find_header(data));
