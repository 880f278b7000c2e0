//! A Hugging Face `model.safetensors` (f32 or bf16) for the fixture's config.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rosetta_moe::hf;

fuzz_target!(|data: &[u8]| {
    rosetta_moe_fuzz::setup();
    let config = rosetta_moe_fuzz::config();
    if let Ok(mut model) = hf::model_from_hf_bytes(config, data, "model.safetensors".as_ref()) {
        assert!(model.params().iter().all(|p| p.is_finite()));
        rosetta_moe_fuzz::exercise(&mut model);
    }
});
