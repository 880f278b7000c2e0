//! Generation (CONTRACT §7) and the KV cache.

pub mod common;

use std::ops::ControlFlow;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rosetta_moe::sampling::{self, SamplingStrategy};
use rosetta_moe::{KvCache, Model, ModelConfig, MoeError};

#[test]
fn cached_logits_equal_a_full_recompute_at_every_step() {
    for config in [ModelConfig::tiny(), common::gqa_config()] {
        let mut model = Model::new(config.clone(), 3).unwrap();
        let mut tokens: Vec<u32> = vec![5, 17, 2, 999, 40];
        let mut cache = KvCache::new(&config, 16);
        let mut cached = model.forward_cached(&tokens, &mut cache).unwrap().to_vec();
        while tokens.len() < 16 {
            let full = model.forward(&tokens, 1).unwrap();
            let last = &full[(tokens.len() - 1) * config.vocab_size..];
            let worst = cached
                .iter()
                .zip(last)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let scale = last.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!(
                worst <= 1e-5 * scale.max(1.0),
                "step {}: max diff {worst}",
                tokens.len()
            );
            let next = (tokens.len() * 37 % 1000) as u32;
            tokens.push(next);
            cached = model.forward_cached(&[next], &mut cache).unwrap().to_vec();
        }
        assert_eq!(cache.len(), 16);
    }
}

#[test]
fn greedy_generation_with_the_cache_matches_recomputing_everything() {
    let config = common::gqa_config();
    let mut model = Model::new(config.clone(), 4).unwrap();
    let prompt = [1u32, 2, 3];
    let fast = sampling::generate_greedy(&mut model, &prompt, 14).unwrap();
    let mut slow = prompt.to_vec();
    while slow.len() < 14 {
        let logits = model.forward(&slow, 1).unwrap();
        let last = &logits[(slow.len() - 1) * config.vocab_size..];
        let best = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        slow.push(best as u32);
    }
    assert_eq!(fast, slow);
}

#[test]
fn same_seed_same_samples_and_every_wrapper_works() {
    let mut model = Model::new(ModelConfig::tiny(), 5).unwrap();
    let prompt = [10u32, 20];
    let a = sampling::generate_topp(&mut model, &prompt, 30, 0.9, 1.0, 7).unwrap();
    let b = sampling::generate_topp(&mut model, &prompt, 30, 0.9, 1.0, 7).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 30);
    assert_eq!(&a[..2], &prompt);
    let c = sampling::generate_topp(&mut model, &prompt, 30, 0.9, 1.0, 8).unwrap();
    assert_ne!(a, c);
    assert_eq!(
        sampling::generate_sample(&mut model, &prompt, 9, 1.0, 1)
            .unwrap()
            .len(),
        9
    );
    assert_eq!(
        sampling::generate_topk(&mut model, &prompt, 9, 5, 1.0, 1)
            .unwrap()
            .len(),
        9
    );
    assert_eq!(
        sampling::generate(
            &mut model,
            &prompt,
            9,
            SamplingStrategy::Temperature { t: 0.0 },
            3
        )
        .unwrap(),
        sampling::generate_greedy(&mut model, &prompt, 9).unwrap()
    );
    let mut streamed = Vec::new();
    let all =
        sampling::generate_streaming(&mut model, &prompt, 12, SamplingStrategy::Greedy, 0, |t| {
            streamed.push(t);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(streamed, all[2..]);
    // The callback ends generation early; the token it saw is kept.
    let mut seen = 0;
    let early =
        sampling::generate_streaming(&mut model, &prompt, 12, SamplingStrategy::Greedy, 0, |_| {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(early, all[..5]);
}

/// The reference for sliding-window generation: every token from the plain
/// forward over the last `max_seq_len` tokens, sampled with the same stream.
fn reference_sliding(
    model: &mut Model,
    prompt: &[u32],
    max_len: usize,
    strategy: SamplingStrategy,
    seed: u64,
) -> Vec<u32> {
    let (window, vocab) = (model.config().max_seq_len, model.config().vocab_size);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tokens = prompt.to_vec();
    while tokens.len() < max_len {
        let context = &tokens[tokens.len().saturating_sub(window)..];
        let logits = model.forward(context, 1).unwrap();
        let last = &logits[(context.len() - 1) * vocab..];
        tokens.push(sampling::pick_token(last, strategy, &mut rng).unwrap());
    }
    tokens
}

#[test]
fn generation_past_max_seq_len_slides_the_window_exactly() {
    for config in [ModelConfig::tiny(), common::gqa_config()] {
        let config = ModelConfig {
            max_seq_len: 6,
            ..config
        };
        let mut model = Model::new(config, 9).unwrap();
        let strategy = SamplingStrategy::Temperature { t: 1.0 };
        // A prompt shorter than the window, and one longer (cut from the left).
        for prompt in [vec![3u32, 14, 15], (0..9).map(|i| i * 101 % 1000).collect()] {
            let max_len = prompt.len() + 20;
            let fast = sampling::generate(&mut model, &prompt, max_len, strategy, 11).unwrap();
            let slow = reference_sliding(&mut model, &prompt, max_len, strategy, 11);
            assert_eq!(fast, slow, "prompt {prompt:?}");
            assert_eq!(
                fast,
                sampling::generate(&mut model, &prompt, max_len, strategy, 11).unwrap(),
                "same seed, same tokens"
            );
        }
    }
}

#[test]
fn bad_generation_requests_are_typed_errors() {
    let config = ModelConfig {
        max_seq_len: 10,
        ..ModelConfig::tiny()
    };
    let mut model = Model::new(config, 1).unwrap();
    assert!(matches!(
        sampling::generate_greedy(&mut model, &[], 5),
        Err(MoeError::EmptyInput(_))
    ));
    assert!(matches!(
        sampling::generate_greedy(&mut model, &[1; 4], usize::MAX),
        Err(MoeError::OutOfMemory { .. })
    ));
    assert!(matches!(
        sampling::generate_greedy(&mut model, &[1; 4], 3),
        Err(MoeError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        sampling::generate_greedy(&mut model, &[1000], 3),
        Err(MoeError::TokenOutOfRange { .. })
    ));
    for bad in [
        SamplingStrategy::Temperature { t: -1.0 },
        SamplingStrategy::TopK { k: 1001, t: 1.0 },
        SamplingStrategy::TopP { p: 0.0, t: 1.0 },
        SamplingStrategy::TopP { p: 1.01, t: 1.0 },
    ] {
        assert!(
            matches!(
                sampling::generate(&mut model, &[1], 4, bad, 0),
                Err(MoeError::InvalidSampling(_))
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        sampling::generate_greedy(&mut model, &[1, 2], 2).unwrap(),
        [1, 2]
    );
}
