//! The `state.json` of a resumable run (the other files intact).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rosetta_moe_fuzz::setup();
    let files = rosetta_moe_fuzz::files();
    rosetta_moe_fuzz::load_run(&files.weights, &files.optimizer, data);
});
