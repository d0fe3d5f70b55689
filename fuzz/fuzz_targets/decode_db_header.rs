#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| couchfile::fuzzing::decode_db_header(data));
