//! A `tokenizer.json`: a tokenizer that round-trips bytes, or a typed error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rosetta_moe::Tokenizer;

fuzz_target!(|data: &[u8]| {
    rosetta_moe_fuzz::setup();
    // `Tokenizer::from_bytes` contains panics of the `tokenizers` crate
    // (catch_unwind); libfuzzer-sys's hook would abort on them before they
    // are caught. A panic that escapes still aborts: libfuzzer-sys runs each
    // input under catch_unwind and aborts when one unwinds out.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(tokenizer) = Tokenizer::from_bytes(data, "tokenizer.json".as_ref()) {
        let text = b"the quick \xff brown fox";
        if let Ok(ids) = tokenizer.encode(text) {
            assert_eq!(tokenizer.decode(&ids), text);
        }
    }
});
