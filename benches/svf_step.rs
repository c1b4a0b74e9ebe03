//! One SVF training step at the reference shape of `scripts/reference/torch_svf_step.py`
//! (d 512, 8 layers, 8 heads, SiLU-gated FFN 1536, vocab 32000, batch 4 × 128, z on all 56
//! linears): forward alone and forward + backward to every z. Run it beside the PyTorch script
//! on the same machine and compare the times as a ratio:
//!   cargo bench --bench svf_step
//!   python scripts/reference/torch_svf_step.py
//! The step allocates multi-megabyte buffers (65 MB for the logits and their gradient), and
//! every fresh page costs a fault; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (transparent huge
//! pages for malloc) made the step about 10% faster on the 2-core reference machine.

mod common;

use bitsvf::engine::checkpoint::Checkpoint;
use bitsvf::engine::config::ModelConfig;
use bitsvf::engine::model::{ModelOptions, WeightMode};
use bitsvf::eval::batch::batch_from_pairs;
use bitsvf::svf::attach::{init_vars, packed_svf_model, svf_model, var_tensors};
use bitsvf::svf::factors::decompose;
use bitsvf::svf::{Parameterization, Targets};
use bitsvf::train::loss::masked_cross_entropy;
use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;

fn config() -> ModelConfig {
    common::reference_shape(None, 128)
}

/// Same tokens as the PyTorch script: (i·7919 + 13) mod vocab, every next token scored.
fn rows() -> Vec<(Vec<u32>, Vec<u32>)> {
    (0..4)
        .map(|b| {
            let row: Vec<u32> = (0..128)
                .map(|t| (((b * 128 + t) * 7919 + 13) % 32000) as u32)
                .collect();
            (row[..1].to_vec(), row[1..].to_vec())
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let ck = Checkpoint::random(config(), 0);
    let factors: BTreeMap<_, _> = decompose(&ck, Targets::All);
    let options = ModelOptions {
        mode: WeightMode::Dense,
        act_quant: false,
        ..Default::default()
    };
    let lengths: BTreeMap<String, usize> = factors
        .iter()
        .map(|(n, f)| (n.clone(), f.sigma.len()))
        .collect();
    let vars = init_vars(&lengths, Parameterization::Paper, options, 0).unwrap();
    let z = var_tensors(&vars);
    let model = svf_model(&ck, options, &factors, &z, Parameterization::Paper).unwrap();
    let batch = batch_from_pairs(&rows(), model.device()).unwrap();
    let mut g = c.benchmark_group("svf_step_d512_l8_b4x128");
    g.sample_size(10);
    g.bench_function("forward", |b| {
        b.iter(|| {
            let l =
                masked_cross_entropy(&model.forward(&batch.input, None).unwrap(), &batch).unwrap();
            l.detach().to_scalar::<f32>().unwrap()
        })
    });
    g.bench_function("forward_backward", |b| {
        b.iter(|| {
            let l =
                masked_cross_entropy(&model.forward(&batch.input, None).unwrap(), &batch).unwrap();
            let grads = l.backward().unwrap();
            assert!(grads.get(vars[0].1.as_tensor()).is_some());
        })
    });
    g.finish();
}

/// The low-rank step (k = 64 on the MLP targets, BitNet's int8 activations) over the dense
/// f32 base against the same step over the packed ternary base (`train --base packed`).
fn bench_low_rank(c: &mut Criterion) {
    let ck = Checkpoint::random(config(), 0);
    let factors: BTreeMap<_, _> = decompose(&ck, Targets::Mlp);
    let lengths: BTreeMap<String, usize> = factors.keys().map(|n| (n.clone(), 64)).collect();
    let mut g = c.benchmark_group("low_rank_step_d512_l8_b4x128_k64_mlp");
    g.sample_size(10);
    for (name, mode) in [
        ("dense_base", WeightMode::Dense),
        ("packed_base", WeightMode::Ternary),
    ] {
        let options = ModelOptions {
            mode,
            act_quant: true,
            ..Default::default()
        };
        let vars = init_vars(&lengths, Parameterization::LowRank, options, 0).unwrap();
        let z = var_tensors(&vars);
        let model = match mode {
            WeightMode::Dense => {
                svf_model(&ck, options, &factors, &z, Parameterization::LowRank).unwrap()
            }
            WeightMode::Ternary => packed_svf_model(&ck, options, &factors, &z).unwrap(),
        };
        let batch = batch_from_pairs(&rows(), model.device()).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let logits = model.forward(&batch.input, None).unwrap();
                let l = masked_cross_entropy(&logits, &batch).unwrap();
                let grads = l.backward().unwrap();
                assert!(grads.get(vars[0].1.as_tensor()).is_some());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_low_rank);
criterion_main!(benches);
