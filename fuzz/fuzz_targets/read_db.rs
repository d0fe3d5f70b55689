#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| btree::fuzzing::read_db(data));
