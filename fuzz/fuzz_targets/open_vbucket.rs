#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vbucket::fuzzing::open_vbucket(data));
