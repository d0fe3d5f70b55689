#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vbucket::fuzzing::parse_vbstate(data));
