//! Any frame type, with its own bound: what an authenticated peer can send.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::decode_checked(data, u32::MAX);
});
