#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringkv_fuzz::object_row_body(data));
