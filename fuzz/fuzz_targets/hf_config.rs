//! A Hugging Face `config.json` imported with the fixture's weights: a model
//! or a typed error (the oversize configs of issue 22 used to abort here).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rosetta_moe::hf;

fuzz_target!(|data: &[u8]| {
    rosetta_moe_fuzz::setup();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = hf::config_from_hf_json(text, "config.json".as_ref()) {
        let weights = &rosetta_moe_fuzz::files().hf_weights;
        if let Ok(mut model) =
            hf::model_from_hf_bytes(config, weights, "model.safetensors".as_ref())
        {
            rosetta_moe_fuzz::exercise(&mut model);
        }
    }
});
