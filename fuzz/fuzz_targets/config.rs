#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| l4lb::fuzz_targets::config(data));
