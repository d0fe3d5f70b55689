#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| btree::fuzzing::walk_forged_tree(data));
