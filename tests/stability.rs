//! Each stress case of `moe stability` is a test.

use rosetta_moe::stability::{self, CASES};

fn check(name: &str) {
    let &(name, stress, case) = CASES.iter().find(|c| c.0 == name).expect("a known case");
    let report = stability::run_case(name, stress, case);
    assert!(report.passed, "{name}: {}", report.detail);
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { check($name) })*
        #[test]
        fn every_case_has_a_test() {
            let tested = [$($name),*];
            for (name, _, _) in CASES {
                assert!(tested.contains(&name), "{name} has no test");
            }
        }
    };
}

cases! {
    logits_scaled_to_1e4 => "logits_1e4",
    all_equal_logits => "equal_logits",
    zero_hidden_state_through_rmsnorm => "zero_hidden_rmsnorm",
    a_sequence_at_max_seq_len => "max_seq_len",
    rows_with_one_visible_key => "one_visible_key",
    tied_router_probabilities => "tied_router",
    learning_rate_10_diverges_and_is_refused => "lr_10_divergence",
    temperature_1e_minus_6 => "temperature_1e-6",
    temperature_1e6 => "temperature_1e6",
    top_p_at_its_bounds => "top_p_bounds",
}
