//! Our `config.json`: a config or a typed error; a config whose model fits
//! the capped budget builds and runs one forward.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rosetta_moe::{Model, checkpoint};

fuzz_target!(|data: &[u8]| {
    rosetta_moe_fuzz::setup();
    if let Ok(config) = checkpoint::config_from_bytes(data, "config.json".as_ref())
        && let Ok(mut model) = Model::new(config, 1)
    {
        rosetta_moe_fuzz::exercise(&mut model);
    }
});
