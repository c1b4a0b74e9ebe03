//! Tests of [`super`]: gradients, resume, and the packed base against the dense one.
use super::*;
use crate::eval::batch::{flat_log_probs, Batch};
use crate::svf::{Parameterization, Targets};
use crate::tasks::Domain;
use crate::train::loss::{masked_nll, reinforce_loss};

fn tiny() -> Checkpoint {
    Checkpoint::tiny(16, 24, 11)
}

/// The tiny model, the factors of all its linears and dense options.
fn dense_setup(act_quant: bool, dtype: DType) -> (Checkpoint, BTreeMap<String, Svd>, ModelOptions) {
    let ck = tiny();
    let f = all_factors(&ck);
    let options = ModelOptions {
        mode: crate::engine::model::WeightMode::Dense,
        act_quant,
        dtype,
        head: crate::engine::model::HeadFormat::Stored,
        defer_head_copy: false,
    };
    (ck, f, options)
}

fn all_factors(ck: &Checkpoint) -> BTreeMap<String, Svd> {
    crate::svf::factors::decompose(ck, Targets::All)
}

fn batch() -> Batch {
    let pairs = vec![
        (vec![2u32, 49, 43, 50, 61], vec![51u32, 10]),
        (vec![2u32, 114, 101, 118], vec![99u32, 98, 97, 10]),
    ];
    batch_from_pairs(&pairs, &candle_core::Device::Cpu).unwrap()
}

/// Loss as a function of the z variables, for one objective.
fn loss_of(
    ck: &Checkpoint,
    f: &BTreeMap<String, Svd>,
    vars: &[NamedVar],
    param: Parameterization,
    objective: Objective,
) -> Tensor {
    let options = ModelOptions {
        mode: crate::engine::model::WeightMode::Dense,
        act_quant: false,
        dtype: DType::F64,
        head: crate::engine::model::HeadFormat::Stored,
        defer_head_copy: false,
    };
    let z = var_tensors(vars);
    let model = svf_model(ck, options, f, &z, param).unwrap();
    let b = batch();
    match objective {
        Objective::Sft => masked_nll(&flat_log_probs(&model, &b).unwrap(), &b).unwrap(),
        Objective::Reinforce => {
            let reference = Model::new(ck, options).unwrap();
            let seq = b.input.dim(1).unwrap();
            reinforce_loss(&model, &reference, &b, &[0.75, -0.5], seq, 0.3)
                .unwrap()
                .0
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    // f64, activation quantization off (the STE is not differentiable): ∂loss/∂z from
    // autograd vs central differences, every parameterization and both objectives.
    let (ck, f, options) = dense_setup(false, DType::F64);
    check_gradients(&ck, &f, options, &Parameterization::ALL);
}

#[test]
fn float_base_gradients_match_finite_differences() {
    // A float (Llama-style) base: its linears take unquantized activations whatever the
    // options say; SVF over them is Transformer²'s on Llama.
    let ck = Checkpoint::random_float(tiny().config, 11);
    let f = all_factors(&ck);
    let options = ModelOptions {
        mode: crate::engine::model::WeightMode::Dense,
        act_quant: true,
        dtype: DType::F64,
        head: crate::engine::model::HeadFormat::Stored,
        defer_head_copy: false,
    };
    let params = [Parameterization::Paper, Parameterization::LowRank];
    check_gradients(&ck, &f, options, &params);
}

fn check_gradients(
    ck: &Checkpoint,
    f: &BTreeMap<String, Svd>,
    options: ModelOptions,
    params: &[Parameterization],
) {
    let ck = ck.clone();
    for &param in params {
        for objective in [Objective::Sft, Objective::Reinforce] {
            let lengths = z_lengths(&ck, Targets::All, param, f, 3).unwrap();
            let vars = init_vars(&lengths, param, options, 5).unwrap();
            // Move away from z = 1 so every term of the official rescale is exercised.
            for (i, (_, v)) in vars.iter().enumerate() {
                let n = v.dims()[0];
                let z: Vec<f64> = v
                    .as_tensor()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(j, x)| x + 0.05 * (((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.5))
                    .collect();
                v.set(&Tensor::from_vec(z, n, &candle_core::Device::Cpu).unwrap())
                    .unwrap();
            }
            let loss = loss_of(&ck, f, &vars, param, objective);
            let grads = loss.backward().unwrap();
            let mut checked = 0;
            for (vi, (name, var)) in vars.iter().enumerate() {
                let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().to_vec1().unwrap();
                let z0: Vec<f64> = var.as_tensor().to_vec1().unwrap();
                for j in [0, z0.len() / 2, z0.len() - 1] {
                    let eps = 1e-5;
                    let at = |d: f64| {
                        let mut z = z0.clone();
                        z[j] += d;
                        var.set(&Tensor::from_vec(z, z0.len(), &candle_core::Device::Cpu).unwrap())
                            .unwrap();
                        let l = loss_of(&ck, f, &vars, param, objective)
                            .to_scalar::<f64>()
                            .unwrap();
                        var.set(
                            &Tensor::from_vec(z0.clone(), z0.len(), &candle_core::Device::Cpu)
                                .unwrap(),
                        )
                        .unwrap();
                        l
                    };
                    let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                    let tol = 1e-6 + 1e-5 * fd.abs().max(g[j].abs());
                    assert!((fd - g[j]).abs() < tol, "{param:?} {objective:?} {name}[{j}] (var {vi}): fd {fd:e} vs autograd {:e}", g[j]);
                    checked += 1;
                }
            }
            assert_eq!(checked, 3 * 14);
        }
    }
}

#[test]
fn every_z_receives_a_nonzero_gradient() {
    // With BitNet's int8 activations (STE) and f32, as in training.
    let (ck, f, options) = dense_setup(true, DType::F32);
    for param in Parameterization::ALL {
        let lengths = z_lengths(&ck, Targets::All, param, &f, 3).unwrap();
        let vars = init_vars(&lengths, param, options, 1).unwrap();
        let z = var_tensors(&vars);
        let model = svf_model(&ck, options, &f, &z, param).unwrap();
        let reference = Model::new(&ck, options).unwrap();
        let b = batch();
        let seq = b.input.dim(1).unwrap();
        let (loss, _) = reinforce_loss(&model, &reference, &b, &[1.0, -1.0], seq, 0.1).unwrap();
        let grads = loss.backward().unwrap();
        let what = format!("{param:?}");
        crate::engine::model::assert_every_var_has_a_gradient(&grads, &vars, &what);
    }
}

/// The z of every target after `cfg`'s steps of SFT on the tiny model with the full SVD's
/// factors, over the packed or the dense base.
fn trained_z(cfg: &TrainConfig, packed: bool) -> Vec<(String, Vec<f32>)> {
    trained_z_of(&tiny(), cfg, packed)
}

/// [`trained_z`] for any model.
fn trained_z_of(ck: &Checkpoint, cfg: &TrainConfig, packed: bool) -> Vec<(String, Vec<f32>)> {
    let ck = ck.clone();
    let f = crate::svf::factors::decompose(&ck, cfg.targets);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("e.safetensors");
    let data = DataSource::Domain(Domain::Copy);
    let tok = crate::engine::tokenizer::ByteTokenizer;
    let run = train(
        &Solo,
        (&ck, "h", &f, packed),
        &tok,
        &data,
        cfg,
        &out,
        false,
        |_, _| true,
    );
    run.unwrap();
    let tf = crate::engine::checkpoint::st::TensorFiles::open(&[
        out.with_extension("train-state.safetensors")
    ])
    .unwrap();
    let mut names: Vec<String> = (tf.names().map(str::to_string))
        .filter(|n| n.ends_with("_proj"))
        .collect();
    names.sort();
    (names.into_iter())
        .map(|n| (n.clone(), tf.get(&n).unwrap().to_f32().unwrap()))
        .collect()
}

fn max_z_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    (a.iter().zip(b))
        .flat_map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max)
}

#[test]
fn the_packed_base_trains_the_same_z_as_the_dense_one() {
    // Low-rank SVF on the same factors: the integer kernel over the packed codes with the
    // backward through them against the dequantized f32 model, 4 steps of 4 prompts.
    let cfg = TrainConfig {
        parameterization: Parameterization::LowRank,
        rank: 4,
        steps: 4,
        batch_prompts: 4,
        eval_every: 4,
        val_n: 4,
        ..Default::default()
    };
    let (dense, packed) = (trained_z(&cfg, false), trained_z(&cfg, true));
    assert_eq!(dense.len(), 6, "the MLP targets of two layers");
    assert!(dense.iter().all(|(_, z)| z.len() == 4));
    let moved = (dense.iter()).any(|(_, z)| z.iter().any(|&x| (x - 1.0).abs() > 1e-3));
    assert!(moved, "training moved z");
    let diff = max_z_diff(&dense, &packed);
    assert!(diff < 1e-4, "packed vs dense z after 4 steps: {diff}");
    // Gradient accumulation over passes of one prompt gives the same steps.
    let micro = TrainConfig {
        micro_batch: Some(1),
        ..cfg.clone()
    };
    let diff = max_z_diff(&packed, &trained_z(&micro, true));
    assert!(diff < 1e-4, "4 passes of 1 prompt vs 1 pass of 4: {diff}");
    // So does activation checkpointing, over either base, in one pass or several.
    for (cfg, packed_base, want) in [
        (&cfg, true, &packed),
        (&cfg, false, &dense),
        (&micro, true, &packed),
    ] {
        let ckpt = TrainConfig {
            checkpoint_activations: true,
            ..cfg.clone()
        };
        let diff = max_z_diff(want, &trained_z(&ckpt, packed_base));
        assert!(
            diff < 1e-4,
            "checkpointed ({packed_base}, {:?}): {diff}",
            cfg.micro_batch
        );
    }
}

#[test]
fn a_float_base_trains_the_same_z_stored_as_dense() {
    // A float (Llama-style) base: its stored matrices through matmul_rows (backward to x)
    // against the f32 model, as for the packed ternary base.
    let ck = Checkpoint::random_float(tiny().config, 11);
    let cfg = TrainConfig {
        parameterization: Parameterization::LowRank,
        rank: 4,
        steps: 3,
        batch_prompts: 4,
        eval_every: 3,
        val_n: 4,
        ..Default::default()
    };
    let (dense, stored) = (
        trained_z_of(&ck, &cfg, false),
        trained_z_of(&ck, &cfg, true),
    );
    let moved = (dense.iter()).any(|(_, z)| z.iter().any(|&x| (x - 1.0).abs() > 1e-3));
    assert!(moved, "training moved z");
    let diff = max_z_diff(&dense, &stored);
    assert!(diff < 1e-4, "stored vs dense z after 3 steps: {diff}");
}

#[test]
fn resume_continues_exactly() {
    // The z vectors and Adam moments after 4 steps equal those of a run interrupted after
    // step 3 (state saved at step 2) and resumed.
    let ck = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let cache = crate::svf::svd::SvdCache::new(tmp.path().join("svd"));
    let base = Base::new(&ck, &cache);
    let cfg = TrainConfig {
        objective: Objective::Reinforce,
        steps: 4,
        batch_prompts: 2,
        samples: 2,
        eval_every: 2,
        val_n: 2,
        patience: 10,
        ..Default::default()
    };
    let data = DataSource::Domain(Domain::Copy);
    let tok = crate::engine::tokenizer::ByteTokenizer;
    let (a, b) = (
        tmp.path().join("a.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    let full = train_expert(&base, &tok, &data, &cfg, &a, false, |_, _| true).unwrap();
    let s = train_expert(&base, &tok, &data, &cfg, &b, false, |step, _| step < 3).unwrap();
    assert_eq!(s.steps, 3);
    assert!(!b.exists());
    let resumed = train_expert(&base, &tok, &data, &cfg, &b, true, |_, _| true).unwrap();
    // The validation curve survives the interruption.
    assert_eq!(full.val_curve.len(), 2, "validations at steps 2 and 4");
    assert_eq!(resumed.val_curve, full.val_curve);
    let state = |p: &Path| {
        let tf = crate::engine::checkpoint::st::TensorFiles::open(&[
            p.with_extension("train-state.safetensors")
        ])
        .unwrap();
        let mut names: Vec<String> = tf.names().map(str::to_string).collect();
        names.sort();
        names
            .iter()
            .map(|n| (n.clone(), tf.get(n).unwrap().to_f32().unwrap()))
            .collect::<Vec<_>>()
    };
    let (sa, sb) = (state(&a), state(&b));
    assert_eq!(
        sa.len(),
        3 * 3 * 2 + 3 * 2,
        "z, m, v and best z for 6 matrices"
    );
    assert_eq!(sa, sb);
    // Every step logged once, as in the uninterrupted run.
    let steps = |p: &Path| -> Vec<u64> {
        let text = std::fs::read_to_string(p.with_extension("metrics.jsonl")).unwrap();
        (text.lines())
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(steps(&b), vec![1, 2, 3, 4]);
    assert_eq!(steps(&a), steps(&b));
    // A state saved for another domain is refused, naming the file and both.
    let s = train_expert(&base, &tok, &data, &cfg, &b, false, |step, _| step < 3);
    assert_eq!(s.unwrap().steps, 3);
    let other = DataSource::Domain(Domain::Reverse);
    let err = train_expert(&base, &tok, &other, &cfg, &b, true, |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-state") && err.contains("copy") && err.contains("reverse"),
        "{err}"
    );
    // The run moved z away from its initial value.
    let z = &sa
        .iter()
        .find(|(n, _)| n.ends_with("mlp.up_proj"))
        .unwrap()
        .1;
    assert!(z.iter().any(|&x| (x - 1.0).abs() > 1e-6));
    // An expert file was written and loads onto its base model only.
    let e = Expert::load(&a).unwrap();
    e.check_base(&ck, &a).unwrap();
    let other = Checkpoint::random(ck.config.clone(), 99);
    let msg = e.check_base(&other, &a).unwrap_err().to_string();
    assert!(msg.contains("trained on base model"), "{msg}");
}

/// [`train`] alone into `one`, and data-parallel on two thread ranks into `outs[rank]`: the
/// lone run's result and each rank's.
#[allow(clippy::type_complexity)]
fn alone_and_on_two_ranks(
    base: Trained,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    one: &Path,
    outs: &[std::path::PathBuf; 2],
) -> (
    (TrainSummary, BTreeMap<String, Vec<f32>>),
    Vec<(TrainSummary, BTreeMap<String, Vec<f32>>)>,
) {
    let alone = train(&Solo, base, tok, data, cfg, one, false, |_, _| true).unwrap();
    let comms = crate::dist::local::ranks(2);
    let by_rank = std::thread::scope(|s| {
        let runs: Vec<_> = (comms.into_iter())
            .map(|c| {
                let out = &outs[c.rank()];
                s.spawn(move || train(&c, base, tok, data, cfg, out, false, |_, _| true))
            })
            .collect();
        runs.into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    (alone, by_rank)
}

/// Data-parallel REINFORCE: two ranks, each sampling half of each step's prompts, train the z
/// one process does with all of them (to float rounding), with the same reward and KL
/// statistics, and hold the same z bit for bit.
#[test]
fn two_ranks_sharing_a_reinforce_steps_prompts_train_what_one_rank_does() {
    let ck = tiny();
    let tok = crate::engine::tokenizer::ByteTokenizer;
    let data = DataSource::Domain(Domain::Copy);
    let tmp = tempfile::tempdir().unwrap();
    // Three prompts over two ranks: the ranks' parts differ in size. Without a baseline every
    // rollout of the untrained model has advantage −1, so z moves.
    let cfg = TrainConfig {
        steps: 3,
        batch_prompts: 3,
        samples: 2,
        baseline: false,
        eval_every: 3,
        val_n: 4,
        ..TrainConfig::for_objective(Objective::Reinforce)
    };
    let f = crate::svf::factors::decompose(&ck, cfg.targets);
    let base = (&ck, "h", &f, false);
    let one = tmp.path().join("one.safetensors");
    let outs = [0, 1].map(|r| tmp.path().join(format!("rank{r}.safetensors")));
    let (alone, by_rank) = alone_and_on_two_ranks(base, &tok, &data, &cfg, &one, &outs);
    assert_eq!(by_rank[0].1, by_rank[1].1, "the ranks' z differ");
    let moved = (alone.1.values()).any(|z| z.iter().any(|&x| (x - 1.0).abs() > 1e-4));
    assert!(moved, "training moved z");
    let diff = (alone.1.iter())
        .flat_map(|(n, z)| z.iter().zip(&by_rank[0].1[n]).map(|(a, b)| (a - b).abs()))
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "2 ranks vs 1: {diff}");
    // The logged statistics of each step agree too.
    let log = |p: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(p.with_extension("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (log(&one), log(&outs[0]));
    assert_eq!(a.len(), 3);
    for (ra, rb) in a.iter().zip(&b) {
        for k in ["reward", "kl", "loss"] {
            let key = format!("stage2/expert_copy/{k}");
            let (x, y) = (ra[&key].as_f64().unwrap(), rb[&key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-6 * (1.0 + x.abs()), "{k}: {x} vs {y}");
        }
    }
}

/// Data-parallel SFT: two ranks with half of each step's batch train the z one process does
/// with all of it (to float rounding), both ranks hold the same z bit for bit, and only rank 0
/// writes the expert, its state and its metrics.
#[test]
fn two_ranks_with_half_the_batch_each_train_what_one_rank_does_with_all_of_it() {
    let ck = tiny();
    let tok = crate::engine::tokenizer::ByteTokenizer;
    let data = DataSource::Domain(Domain::Copy);
    let tmp = tempfile::tempdir().unwrap();
    for micro_batch in [None, Some(1)] {
        let cfg = TrainConfig {
            steps: 4,
            batch_prompts: 4,
            eval_every: 2,
            val_n: 4,
            micro_batch,
            ..Default::default()
        };
        let f = crate::svf::factors::decompose(&ck, cfg.targets);
        let base = (&ck, "h", &f, false);
        let one = tmp.path().join("one.safetensors");
        let outs = [0, 1].map(|r| tmp.path().join(format!("rank{r}.safetensors")));
        let (alone, by_rank) = alone_and_on_two_ranks(base, &tok, &data, &cfg, &one, &outs);
        assert_eq!(by_rank[0].1, by_rank[1].1, "the ranks' z differ");
        let moved = (alone.1.values()).any(|z| z.iter().any(|&x| (x - 1.0).abs() > 1e-3));
        assert!(moved, "training moved z");
        let diff = (alone.1.iter())
            .flat_map(|(n, z)| z.iter().zip(&by_rank[0].1[n]).map(|(a, b)| (a - b).abs()))
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{micro_batch:?}: 2 ranks vs 1: {diff}");
        assert!((alone.0.best_val_accuracy - by_rank[0].0.best_val_accuracy).abs() < 1e-12);
        assert!(outs[0].exists() && outs[0].with_extension("metrics.jsonl").exists());
        let rank1 = std::fs::read_dir(tmp.path()).unwrap();
        let written: Vec<_> = (rank1.map(|e| e.unwrap().file_name().into_string().unwrap()))
            .filter(|n| n.starts_with("rank1"))
            .collect();
        assert!(written.is_empty(), "rank 1 wrote {written:?}");
    }
}
