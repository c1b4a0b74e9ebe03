//! Packed 2-bit × int8 kernels (`TernaryMatrix::matmul_i8_with`) at the BitNet b1.58 2B linear
//! shapes (out × in = 2560×2560 attention, 6912×2560 gate/up, 2560×6912 down), for one token
//! (matrix-vector, decoding) and 16 tokens (matrix-matrix), and at the default model's shapes
//! for a training pass of 512 tokens, beside candle's f32 matmul of the same shape and a memory copy that gives the machine's bandwidth. Kernel throughput is GB/s
//! of packed weights read. Run: `cargo bench --bench ternary`.

use bitsvf::engine::ternary::{Kernel, TernaryMatrix};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use std::time::Duration;

/// (rows, cols) = (out, in) features of BitNet b1.58 2B's linears, for one token and 16.
const SHAPES: [(usize, usize); 3] = [(2560, 2560), (6912, 2560), (2560, 6912)];

/// The default model's linears (d 256, FFN 640) for a training pass of 512 tokens: where the
/// packed base competes with the dense trainer's f32 product on matrices that fit in cache.
const TRAINING_SHAPES: [(usize, usize); 3] = [(256, 256), (640, 256), (256, 640)];

/// Bytes in each buffer of the copy benchmark: far beyond the caches' share of one run.
const COPY_BYTES: usize = 256 << 20;

fn kernel_name(k: Kernel) -> &'static str {
    match k {
        Kernel::Portable => "portable",
        Kernel::Avx2 => "avx2",
        Kernel::Avx512Vnni => "avx512_vnni",
    }
}

fn bench(c: &mut Criterion) {
    // Memory bandwidth: throughput counts bytes read + bytes written.
    let src = vec![1u8; COPY_BYTES];
    let mut dst = vec![0u8; COPY_BYTES];
    let mut g = c.benchmark_group("copy_256MiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::BytesDecimal(2 * COPY_BYTES as u64));
    g.bench_function("one_thread", |b| b.iter(|| dst.copy_from_slice(&src)));
    g.bench_function("all_threads", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    g.finish();
    drop((src, dst));

    let mut rng = StdRng::seed_from_u64(0);
    let cases = SHAPES
        .iter()
        .flat_map(|&(rows, cols)| [(rows, cols, 1), (rows, cols, 16)])
        .chain(
            TRAINING_SHAPES
                .iter()
                .map(|&(rows, cols)| (rows, cols, 512)),
        );
    for (rows, cols, tokens) in cases {
        let values: Vec<i8> = (0..rows * cols).map(|_| rng.gen_range(-1..=1)).collect();
        let m = TernaryMatrix::from_values(&values, rows, cols, vec![1.0]);
        // Wᵀ `[cols, rows]`, f32, made contiguous once outside the timed loop.
        let wt = Tensor::from_vec(m.dequantize(), (rows, cols), &Device::Cpu)
            .and_then(|w| w.t()?.contiguous())
            .unwrap();
        {
            let xq: Vec<i8> = (0..tokens * cols).map(|_| rng.gen()).collect();
            let xf: Vec<f32> = xq.iter().map(|&v| v as f32).collect();
            let x = Tensor::from_vec(xf, (tokens, cols), &Device::Cpu).unwrap(); // [tokens, cols]
            let mut g = c.benchmark_group(format!("{rows}x{cols}_tokens{tokens}"));
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2))
                .throughput(Throughput::BytesDecimal(m.packed.len() as u64));
            for k in Kernel::ALL.into_iter().filter(|k| k.is_available()) {
                g.bench_function(kernel_name(k), |b| {
                    b.iter(|| m.matmul_i8_with(k, &xq, tokens))
                });
            }
            g.bench_function("candle_f32", |b| b.iter(|| x.matmul(&wt).unwrap()));
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
