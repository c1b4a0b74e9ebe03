//! Tests of the decoder: shapes, caches, the growing RoPE tables, generation and sampling.

use super::rope::ROPE_INITIAL_POSITIONS;
use super::*;
use crate::engine::checkpoint::Checkpoint;

fn small() -> Checkpoint {
    Checkpoint::random(test_arch(32, 64, 2, (4, 2), 32), 3)
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.squeeze(0).unwrap().to_vec2().unwrap()
}

#[test]
fn weight_modes_parse_by_name() {
    for m in WeightMode::ALL {
        assert_eq!(
            <WeightMode as clap::ValueEnum>::from_str(m.name(), false),
            Ok(m)
        );
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    let ck = small();
    for mode in [WeightMode::Ternary, WeightMode::Dense] {
        let m = Model::new(
            &ck,
            ModelOptions {
                mode,
                ..Default::default()
            },
        )
        .unwrap();
        let ids: Vec<u32> = vec![5, 17, 99, 3, 64, 8, 120];
        let full = rows(
            &m.forward(&m.ids_tensor(std::slice::from_ref(&ids)).unwrap(), None)
                .unwrap(),
        );
        let mut cache = m.new_cache();
        let mut inc = rows(
            &m.forward(
                &m.ids_tensor(&[ids[..4].to_vec()]).unwrap(),
                Some(&mut cache),
            )
            .unwrap(),
        );
        for &t in &ids[4..] {
            inc.extend(rows(
                &m.forward(&m.ids_tensor(&[vec![t]]).unwrap(), Some(&mut cache))
                    .unwrap(),
            ));
        }
        assert_eq!(cache.len(), ids.len());
        for (a, b) in full.iter().flatten().zip(inc.iter().flatten()) {
            assert!((a - b).abs() < 1e-4, "{mode:?}: {a} vs {b}");
        }
    }
}

/// The KV cache grows in place past its first room (64 positions): chunks of 1 to 60 tokens
/// appended one after another give the logits of the whole sequence at once, at every
/// position; and a clone, extended apart, is not touched by the original's later tokens.
#[test]
fn the_kv_cache_grows_without_changing_logits() {
    let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
    let m = Model::new(&ck, ModelOptions::default()).unwrap();
    let ids: Vec<u32> = (0..118u32).map(|i| (i * 53 + 7) % 90 + 32).collect();
    let fwd = |ids: &[u32], cache: Option<&mut Cache>| {
        rows(
            &m.forward(&m.ids_tensor(&[ids.to_vec()]).unwrap(), cache)
                .unwrap(),
        )
    };
    let full = fwd(&ids, None);
    let mut cache = m.new_cache();
    let (mut inc, mut at, mut branch) = (Vec::new(), 0, None);
    for chunk in [3, 60, 1, 1, 10, 2, 1, 40] {
        inc.extend(fwd(&ids[at..at + chunk], Some(&mut cache)));
        at += chunk;
        assert_eq!(cache.len(), at);
        if at == 65 {
            // Grown once; a clone takes other tokens at 65…67.
            let mut c = cache.clone();
            fwd(&[1, 2, 3], Some(&mut c));
            branch = Some(c);
        }
    }
    assert_eq!(at, ids.len());
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
    for (i, (a, b)) in full.iter().zip(&inc).enumerate() {
        assert!(close(a, b), "position {i}");
    }
    // The clone's next token, after the original wrote its own tokens at 65…: as if the
    // branch were run whole, and unlike the sequence with the original's tokens there.
    let got = fwd(&[4], branch.as_mut());
    let mut whole = ids[..65].to_vec();
    whole.extend([1, 2, 3, 4]);
    assert!(close(&fwd(&whole, None)[68], &got[0]), "the clone");
    let mut mixed = ids[..68].to_vec();
    mixed.push(4);
    assert!(
        !close(&fwd(&mixed, None)[68], &got[0]),
        "the test cannot tell"
    );
}

/// RoPE tables grow on demand: a sequence longer than the first table gives the same
/// logits whether its tables were built at once (a fresh model) or grown step by step.
#[test]
fn rope_tables_grow_without_changing_logits() {
    let n = ROPE_INITIAL_POSITIONS + 44;
    let ck = Checkpoint::random(test_arch(32, 64, 1, (4, 2), 1 << 40), 5);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 128).collect();
    let m = Model::new(&ck, ModelOptions::default()).unwrap();
    let long = rows(
        &m.forward(&m.ids_tensor(std::slice::from_ref(&ids)).unwrap(), None)
            .unwrap(),
    );
    let m = Model::new(&ck, ModelOptions::default()).unwrap();
    let mut cache = m.new_cache();
    let head = &ids[..ROPE_INITIAL_POSITIONS - 4];
    m.forward(&m.ids_tensor(&[head.to_vec()]).unwrap(), Some(&mut cache))
        .unwrap();
    let mut last = Vec::new();
    for &t in &ids[head.len()..] {
        last = rows(
            &m.forward(&m.ids_tensor(&[vec![t]]).unwrap(), Some(&mut cache))
                .unwrap(),
        );
    }
    for (a, b) in long[n - 1].iter().zip(&last[0]) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn greedy_generation_matches_recomputed_argmax() {
    let ck = small();
    let m = Model::new(&ck, ModelOptions::default()).unwrap();
    let prompt = vec![2u32, 40, 41];
    let out = m
        .generate(
            &prompt,
            &GenerateOptions {
                max_new_tokens: 6,
                ..Default::default()
            },
        )
        .unwrap();
    let mut seq = prompt.clone();
    for &tok in &out {
        let l = rows(
            &m.forward(&m.ids_tensor(&[seq.clone()]).unwrap(), None)
                .unwrap(),
        );
        assert_eq!(argmax(l.last().unwrap()) as u32, tok);
        seq.push(tok);
    }
    // Stops after a stop token, which is included.
    let stop = out[1];
    let o2 = m
        .generate(
            &prompt,
            &GenerateOptions {
                max_new_tokens: 6,
                stop: vec![stop],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(*o2.last().unwrap(), stop);
    assert!(o2.len() <= 2);
}

#[test]
fn sampling_is_seeded_and_follows_the_distribution() {
    let ck = small();
    let m = Model::new(&ck, ModelOptions::default()).unwrap();
    let o = |seed| {
        m.generate(
            &[2, 7],
            &GenerateOptions {
                max_new_tokens: 8,
                temperature: 1.0,
                top_p: 0.9,
                seed,
                stop: vec![],
            },
        )
        .unwrap()
    };
    assert_eq!(o(1), o(1));
    // p = (1/4, 3/4) from logits (0, ln 3): frequencies over 20000 draws within 1.5%.
    let mut rng = StdRng::seed_from_u64(0);
    let logits = [0.0f32, 3f32.ln()];
    let ones = (0..20000)
        .filter(|_| sample(&logits, 1.0, 1.0, &mut rng) == 1)
        .count();
    assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.015, "{ones}");
    // top-p below the largest mass keeps only the argmax; temperature 0 is greedy.
    assert!((0..100).all(|_| sample(&logits, 1.0, 0.5, &mut rng) == 1));
    assert_eq!(sample(&[0.3, 0.9, 0.1], 0.0, 1.0, &mut rng), 1);
}

#[test]
fn rms_norm_and_softmax_match_hand_values() {
    let dev = Device::Cpu;
    // x = [3, 4]: mean square 12.5 → x/√12.5
    let x = Tensor::new(&[[3f32, 4.0]], &dev).unwrap();
    let y: Vec<Vec<f32>> = rms_norm(&x, &Tensor::new(&[1f32, 2.0], &dev).unwrap(), 0.0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let r = 12.5f32.sqrt();
    assert!((y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6);
    let s: Vec<Vec<f32>> = ops::softmax(&Tensor::new(&[[0f32, 3f32.ln()]], &dev).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    assert!((s[0][0] - 0.25).abs() < 1e-6 && (s[0][1] - 0.75).abs() < 1e-6);
}

#[test]
fn token_rows_parse() {
    assert_eq!(
        parse_token_rows("1, 2;3,4").unwrap(),
        vec![vec![1, 2], vec![3, 4]]
    );
    assert!(parse_token_rows("1,2;3").is_err());
    assert!(parse_token_rows("1,-2").is_err());
}
