//! Forward-pass throughput of the BitNet engine, ternary vs dense mode, at a realistic small
//! shape (d 512, 8 layers, FFN 1536, 8 heads / 4 kv, vocab 32000): prefill of 128 tokens and
//! one decode step against a 127-token KV cache. Run: `cargo bench --bench forward`.

mod common;

use bitsvf::engine::checkpoint::Checkpoint;
use bitsvf::engine::config::{Activation, ModelConfig};
use bitsvf::engine::model::{Model, ModelOptions, WeightMode};
use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The reference shape with 4 kv heads, the default model's squared-ReLU FFN and sub-norms.
fn config() -> ModelConfig {
    ModelConfig {
        hidden_act: Activation::Relu2,
        sub_norms: Some(true),
        ..common::reference_shape(Some(4), 256)
    }
}

/// The model in `mode`, activations int8-quantized when `act_quant`, f32.
fn model(ck: &Checkpoint, mode: WeightMode, act_quant: bool) -> Model {
    let options = ModelOptions {
        mode,
        act_quant,
        ..Default::default()
    };
    Model::new(ck, options).unwrap()
}

fn bench(c: &mut Criterion) {
    let ck = Checkpoint::random(config(), 0);
    let prompt: Vec<u32> = (0..128u32).map(|i| (i * 7919 + 13) % 32000).collect();
    let modes = [
        ("ternary", WeightMode::Ternary, true),
        ("dense_actquant", WeightMode::Dense, true),
        ("dense_f32", WeightMode::Dense, false),
    ];
    let mut g = c.benchmark_group("prefill_128");
    g.sample_size(10).throughput(Throughput::Elements(128));
    for (name, mode, act_quant) in modes {
        let m = model(&ck, mode, act_quant);
        let ids = m.ids_tensor(std::slice::from_ref(&prompt)).unwrap();
        g.bench_function(name, |b| b.iter(|| m.forward(&ids, None).unwrap()));
    }
    g.finish();
    let mut g = c.benchmark_group("decode_1_after_127");
    g.sample_size(20).throughput(Throughput::Elements(1));
    for (name, mode, act_quant) in modes {
        let m = model(&ck, mode, act_quant);
        let mut cache = m.new_cache();
        m.forward(
            &m.ids_tensor(&[prompt[..127].to_vec()]).unwrap(),
            Some(&mut cache),
        )
        .unwrap();
        let next = Tensor::from_vec(vec![prompt[127]], (1, 1), m.device()).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut c = cache.clone();
                m.forward(&next, Some(&mut c)).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
