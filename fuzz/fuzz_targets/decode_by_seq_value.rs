#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| couchfile::fuzzing::decode_by_seq_value(data));
