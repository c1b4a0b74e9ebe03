//! An SVF expert as a LoRA adapter, for runtimes that know LoRA and not SVF (PEFT, llama.cpp).
//!
//! An expert changes W = U diag(σ) Vᵀ into W' = U diag(s) Vᵀ (s the applied scale), so
//! W' − W = U diag(δ) Vᵀ with δ = s − σ: a LoRA of rank = the number of non-zero δ, exactly,
//! with B = U and A = diag(δ) Vᵀ. Truncated to rank k, the best rank-k approximation keeps
//! the k directions of largest |δ| (U and V are orthonormal, so these are ΔW's own singular
//! triplets), and the share of ΔW's energy ‖ΔW‖²_F kept is Σ_kept δ² / Σ δ².
//!
//! One difference stays: bitsvf applies the delta to BitNet's int8-quantized activations, as
//! the packed base does; PEFT and llama.cpp apply a LoRA to the unquantized input.

use crate::engine::checkpoint::gguf::{GgmlType, GgufWriter, MetaValue};
use crate::engine::checkpoint::st::{write_safetensors, OwnedTensor};
use crate::engine::checkpoint::{linear_name, llama_file_row_order, LinearKind};
use crate::engine::config::ModelConfig;
use crate::error::{Error, Result};
use crate::svf::applied_scale;
use crate::svf::expert::Expert;
use crate::svf::svd::Svd;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One target's LoRA factors: ΔW ≈ B·A.
#[derive(Debug, Clone)]
pub struct LoraTarget {
    /// Layer.
    pub layer: usize,
    /// Which linear.
    pub kind: LinearKind,
    /// Output features (rows of W).
    pub rows: usize,
    /// Input features (columns of W).
    pub cols: usize,
    /// A `[rank, cols]`, row-major.
    pub a: Vec<f32>,
    /// B `[rows, rank]`, row-major.
    pub b: Vec<f32>,
}

/// An expert as a LoRA adapter.
#[derive(Debug, Clone)]
pub struct Lora {
    /// The expert's name.
    pub name: String,
    /// The rank of every target.
    pub rank: usize,
    /// The targets, by layer then linear.
    pub targets: Vec<LoraTarget>,
    /// Share of the expert's delta energy (Σ over targets of ‖ΔW‖²_F) the rank keeps: 1 when
    /// exact.
    pub energy_kept: f64,
    /// The least rank that is exact (the most non-zero δ of any target).
    pub exact_rank: usize,
}

/// `expert` (paper, official or low-rank SVF) as a LoRA of `rank` (`None`: the exact rank)
/// over the SVD factors `svd` of its base.
pub fn expert_lora(
    expert: &Expert,
    svd: &BTreeMap<String, Svd>,
    layers: usize,
    rank: Option<usize>,
) -> Result<Lora> {
    let param = expert.meta.parameterization;
    if !param.uses_svd() {
        return Err(Error::Input(format!(
            "expert `{}` is {}: only SVF experts (paper, official, low-rank) are LoRAs",
            expert.meta.name,
            param.name()
        )));
    }
    // δ per target, in layer / linear order.
    let mut deltas = Vec::new();
    for layer in 0..layers {
        for kind in LinearKind::ALL {
            let name = linear_name(layer, kind);
            let Some(z) = expert.z.get(&name) else {
                continue;
            };
            let f = svd
                .get(&name)
                .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))?;
            if z.len() > f.sigma.len() {
                return Err(Error::Input(format!(
                    "expert `{}`: z of `{name}` has {} entries for a matrix of rank {}",
                    expert.meta.name,
                    z.len(),
                    f.sigma.len()
                )));
            }
            let s = applied_scale(param, &f.sigma[..z.len()], z);
            let d: Vec<f64> = (s.iter().zip(&f.sigma))
                .map(|(s, &sg)| s - sg as f64)
                .collect();
            deltas.push((layer, kind, f, d));
        }
    }
    if deltas.is_empty() {
        return Err(Error::Input(format!(
            "expert `{}` has no z for any linear of this model",
            expert.meta.name
        )));
    }
    let exact_rank = (deltas.iter())
        .map(|(.., d)| d.iter().filter(|x| **x != 0.0).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let rank = rank.unwrap_or(exact_rank);
    let most = (deltas.iter())
        .map(|(_, _, f, _)| f.sigma.len())
        .max()
        .unwrap_or(0);
    if rank == 0 || rank > most {
        return Err(Error::Input(format!(
            "the LoRA rank must be between 1 and {most}, the largest rank of the targets \
             (asked {rank})"
        )));
    }
    let (mut kept, mut total) = (0.0, 0.0);
    let mut targets = Vec::with_capacity(deltas.len());
    for (layer, kind, f, d) in deltas {
        let r = f.sigma.len();
        // The directions of largest |δ|, in σ order.
        let mut order: Vec<usize> = (0..d.len()).collect();
        order.sort_by(|&i, &j| d[j].abs().total_cmp(&d[i].abs()).then(i.cmp(&j)));
        order.truncate(rank.min(d.len()));
        order.sort_unstable();
        total += d.iter().map(|x| x * x).sum::<f64>();
        kept += order.iter().map(|&i| d[i] * d[i]).sum::<f64>();
        // Padded with zero directions to the common rank.
        let mut a = vec![0f32; rank * f.cols];
        let mut b = vec![0f32; f.rows * rank];
        for (slot, &i) in order.iter().enumerate() {
            for c in 0..f.cols {
                a[slot * f.cols + c] = (d[i] * f.v[c * r + i] as f64) as f32;
            }
            for row in 0..f.rows {
                b[row * rank + slot] = f.u[row * r + i];
            }
        }
        targets.push(LoraTarget {
            layer,
            kind,
            rows: f.rows,
            cols: f.cols,
            a,
            b,
        });
    }
    Ok(Lora {
        name: expert.meta.name.clone(),
        rank,
        targets,
        energy_kept: if total > 0.0 { kept / total } else { 1.0 },
        exact_rank,
    })
}

impl Lora {
    /// ΔW ≈ B·A of target `t`, `[rows, cols]` row-major.
    pub fn delta(&self, t: &LoraTarget) -> Vec<f32> {
        let k = self.rank;
        let mut w = vec![0f32; t.rows * t.cols];
        for r in 0..t.rows {
            for s in 0..k {
                let b = t.b[r * k + s];
                if b != 0.0 {
                    let a = &t.a[s * t.cols..(s + 1) * t.cols];
                    for (w, &a) in w[r * t.cols..(r + 1) * t.cols].iter_mut().zip(a) {
                        *w += b * a;
                    }
                }
            }
        }
        w
    }

    /// A PEFT LoRA directory: `adapter_config.json` and `adapter_model.safetensors` with HF
    /// module names (`base_model.model.model.layers.L.mlp.gate_proj.lora_A.weight`), α = r so
    /// PEFT's scaling α/r is 1. `base` names the base model for `base_model_name_or_path`.
    pub fn write_peft(&self, dir: &Path, base: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = BTreeMap::new();
        let mut modules = std::collections::BTreeSet::new();
        for t in &self.targets {
            let module = linear_name(t.layer, t.kind);
            modules.insert(module.rsplit('.').next().unwrap_or(&module).to_string());
            let key = |ab: &str| format!("base_model.model.{module}.lora_{ab}.weight");
            tensors.insert(key("A"), OwnedTensor::f32(vec![self.rank, t.cols], &t.a));
            tensors.insert(key("B"), OwnedTensor::f32(vec![t.rows, self.rank], &t.b));
        }
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.rank,
            "lora_dropout": 0.0,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": base,
            "revision": null,
        });
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
        crate::io::write_json(&dir.join("adapter_config.json"), &config)
    }

    /// A llama.cpp LoRA adapter: `general.type = adapter`, `adapter.type = lora`,
    /// `adapter.lora.alpha = r` (scale 1), and per target `blk.L.NAME.weight.lora_a` (ggml
    /// dims [cols, r]) and `.lora_b` ([r, rows]) in F32; `arch` must be the base GGUF's
    /// `general.architecture`.
    pub fn write_gguf(&self, path: &Path, arch: &str, cfg: &ModelConfig) -> Result<()> {
        let mut w = GgufWriter::new(arch);
        w.meta("general.type", MetaValue::Str("adapter".into()));
        w.meta("adapter.type", MetaValue::Str("lora".into()));
        w.meta("adapter.lora.alpha", MetaValue::F32(self.rank as f32));
        w.meta(
            "general.name",
            MetaValue::Str(format!("bitsvf expert {}", self.name)),
        );
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for t in &self.targets {
            let name = format!("blk.{}.{}.weight", t.layer, t.kind.ggml_name());
            let (r, rows, cols) = (self.rank as u64, t.rows as u64, t.cols as u64);
            // A `llama` base stores its query and key rows in llama.cpp's RoPE order; B's rows
            // (the delta's output rows) follow them.
            let heads = match t.kind {
                LinearKind::Q => Some(cfg.num_attention_heads),
                LinearKind::K => Some(cfg.kv_heads()),
                _ => None,
            };
            let b = match heads.filter(|_| arch == "llama") {
                Some(h) => (llama_file_row_order(t.rows, h).iter())
                    .flat_map(|&row| &t.b[row * self.rank..(row + 1) * self.rank])
                    .copied()
                    .collect(),
                None => t.b.clone(),
            };
            w.tensor(
                &format!("{name}.lora_a"),
                GgmlType::F32,
                vec![cols, r],
                bytes(&t.a),
            )?;
            w.tensor(
                &format!("{name}.lora_b"),
                GgmlType::F32,
                vec![r, rows],
                bytes(&b),
            )?;
        }
        w.write(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::checkpoint::gguf::Gguf;
    use crate::engine::checkpoint::st::TensorFiles;
    use crate::engine::checkpoint::Checkpoint;
    use crate::svf::base::Base;
    use crate::svf::expert::test_expert;
    use crate::svf::factors::z_lengths;
    use crate::svf::svd::SvdCache;
    use crate::svf::{Parameterization, SvfWeight, Targets};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn fixture(param: Parameterization) -> (Checkpoint, tempfile::TempDir, SvdCache, Expert) {
        let ck = Checkpoint::tiny(32, 48, 4);
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let f = Base::new(&ck, &cache).factors(Targets::Mlp).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let z = z_lengths(&ck, Targets::Mlp, param, &f.svd, 8)
            .unwrap()
            .into_iter()
            .map(|(n, len)| (n, (0..len).map(|_| rng.gen_range(0.3..1.7)).collect()))
            .collect();
        let e = test_expert(&ck, "e", param, z);
        (ck, dir, cache, e)
    }

    /// W' − W from the SVF form itself (its adapted weight minus the base).
    fn svf_delta(svd: &Svd, z: &[f32], param: Parameterization) -> Vec<f32> {
        let dev = candle_core::Device::Cpu;
        let zt = candle_core::Tensor::from_slice(z, z.len(), &dev)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let (w, base) = match param {
            Parameterization::LowRank => (
                SvfWeight::low_rank_delta(svd, zt, candle_core::DType::F64, &dev).unwrap(),
                None,
            ),
            _ => {
                let full = SvfWeight::new(svd, zt, param, candle_core::DType::F64, &dev).unwrap();
                let ones =
                    candle_core::Tensor::ones(svd.sigma.len(), candle_core::DType::F64, &dev)
                        .unwrap();
                let plain = SvfWeight::new(
                    svd,
                    ones,
                    Parameterization::Paper,
                    candle_core::DType::F64,
                    &dev,
                )
                .unwrap();
                (full, Some(plain.adapted_weight().unwrap()))
            }
        };
        let mut d = w.adapted_weight().unwrap();
        if let Some(b) = base {
            d.iter_mut().zip(b).for_each(|(d, b)| *d -= b);
        }
        d
    }

    #[test]
    fn an_expert_is_exactly_a_lora_of_its_nonzero_directions_and_truncates_optimally() {
        for param in [
            Parameterization::Paper,
            Parameterization::Official,
            Parameterization::LowRank,
        ] {
            let (ck, _dir, cache, e) = fixture(param);
            let f = Base::new(&ck, &cache).factors(Targets::Mlp).unwrap();
            let layers = ck.layers.len();
            let exact = expert_lora(&e, &f.svd, layers, None).unwrap();
            assert_eq!(exact.targets.len(), 3 * layers);
            assert!((exact.energy_kept - 1.0).abs() < 1e-12);
            if param == Parameterization::LowRank {
                assert_eq!(exact.exact_rank, 8);
            }
            let mut total = 0.0;
            for t in &exact.targets {
                let name = linear_name(t.layer, t.kind);
                let want = svf_delta(&f.svd[&name], &e.z[&name], param);
                let got = exact.delta(t);
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff <= 1e-4 * scale.max(1e-3),
                    "{param:?} {name}: {diff} of {scale}"
                );
                total += want.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
            }
            // Rank 3: the kept energy is what the residual says it is.
            let low = expert_lora(&e, &f.svd, layers, Some(3)).unwrap();
            assert!(low.energy_kept < 1.0 && low.energy_kept > 0.0);
            let mut residual = 0.0;
            for (t, x) in low.targets.iter().zip(&exact.targets) {
                let (a, b) = (low.delta(t), exact.delta(x));
                residual += a
                    .iter()
                    .zip(&b)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
            }
            let lost = residual / total;
            assert!(
                (lost - (1.0 - low.energy_kept)).abs() < 1e-4,
                "{param:?}: {lost} vs {}",
                1.0 - low.energy_kept
            );
        }
        let (ck, _dir, cache, mut e) = fixture(Parameterization::Paper);
        e.meta.parameterization = Parameterization::AlphaLayer;
        let f = Base::new(&ck, &cache).factors(Targets::Mlp).unwrap();
        let err = expert_lora(&e, &f.svd, ck.layers.len(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only SVF experts"), "{err}");
        // A rank beyond the matrices' is refused before anything is allocated.
        e.meta.parameterization = Parameterization::Paper;
        for rank in [0, 33, 1 << 40] {
            let err = expert_lora(&e, &f.svd, ck.layers.len(), Some(rank))
                .unwrap_err()
                .to_string();
            assert!(err.contains("between 1 and 32"), "{err}");
        }
    }

    #[test]
    fn peft_and_gguf_adapters_carry_the_factors_under_their_runtimes_names() {
        let (ck, dir, cache, e) = fixture(Parameterization::Paper);
        let f = Base::new(&ck, &cache).factors(Targets::Mlp).unwrap();
        let lora = expert_lora(&e, &f.svd, ck.layers.len(), Some(5)).unwrap();
        let peft = dir.path().join("peft");
        lora.write_peft(&peft, Some("tiny")).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["r"], 5);
        assert_eq!(config["lora_alpha"], 5);
        assert_eq!(
            config["target_modules"],
            serde_json::json!(["down_proj", "gate_proj", "up_proj"])
        );
        let tf = TensorFiles::open(&[peft.join("adapter_model.safetensors")]).unwrap();
        assert_eq!(tf.names().count(), 2 * 3 * ck.layers.len());
        let a = tf
            .get("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
            .unwrap();
        let b = tf
            .get("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
            .unwrap();
        assert_eq!(
            (a.shape.to_vec(), b.shape.to_vec()),
            (vec![5, 48], vec![32, 5])
        );
        let t = (lora.targets.iter())
            .find(|t| t.layer == 1 && t.kind == LinearKind::Down)
            .unwrap();
        let a32: Vec<f32> = a
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(a32, t.a);

        let gguf = dir.path().join("e.gguf");
        lora.write_gguf(&gguf, "bitnet-b1.58", &ck.config).unwrap();
        let g = Gguf::open(&gguf).unwrap();
        assert_eq!(
            g.get("general.type").and_then(|v| v.as_str()),
            Some("adapter")
        );
        assert_eq!(g.get("adapter.type").and_then(|v| v.as_str()), Some("lora"));
        assert_eq!(
            g.get("general.architecture").and_then(|v| v.as_str()),
            Some("bitnet-b1.58")
        );
        assert!(matches!(g.get("adapter.lora.alpha"), Some(MetaValue::F32(x)) if *x == 5.0));
        // llama.cpp's checks: a's ne0 = the weight's ne0 (cols), b's ne1 = its ne1 (rows),
        // a's ne1 = b's ne0 (the rank).
        let ta = g.tensor("blk.1.ffn_down.weight.lora_a").unwrap();
        let tb = g.tensor("blk.1.ffn_down.weight.lora_b").unwrap();
        assert_eq!(
            (ta.dims.clone(), tb.dims.clone()),
            (vec![48, 5], vec![5, 32])
        );
        let bytes = g.data(tb).unwrap();
        let b32: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(b32, t.b);
    }

    /// Over a `llama` base, B's query and key rows are written in llama.cpp's RoPE order, as
    /// the base's own rows are; other architectures and other linears keep the model's order.
    #[test]
    fn llama_adapters_permute_query_and_key_rows() {
        let ck = Checkpoint::tiny(32, 48, 4);
        let cfg = &ck.config;
        let (rank, cols) = (2, cfg.hidden_size);
        let target = |kind: LinearKind| {
            let rows = kind.shape(cfg).0;
            LoraTarget {
                layer: 0,
                kind,
                rows,
                cols,
                a: vec![0.5; rank * cols],
                b: (0..rows * rank).map(|i| i as f32).collect(),
            }
        };
        let lora = Lora {
            name: "e".into(),
            rank,
            targets: vec![
                target(LinearKind::Q),
                target(LinearKind::K),
                target(LinearKind::V),
            ],
            energy_kept: 1.0,
            exact_rank: rank,
        };
        let dir = tempfile::tempdir().unwrap();
        let read_b = |arch: &str, name: &str| -> Vec<f32> {
            let path = dir.path().join(format!("{arch}.gguf"));
            if !path.exists() {
                lora.write_gguf(&path, arch, cfg).unwrap();
            }
            let g = Gguf::open(&path).unwrap();
            let t = g.tensor(&format!("blk.0.{name}.weight.lora_b")).unwrap();
            (g.data(t).unwrap().chunks_exact(4))
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        for (t, name) in lora.targets.iter().zip(["attn_q", "attn_k", "attn_v"]) {
            assert_eq!(read_b("bitnet", name), t.b, "{name}");
            let heads = match t.kind {
                LinearKind::Q => Some(cfg.num_attention_heads),
                LinearKind::K => Some(cfg.kv_heads()),
                _ => None,
            };
            let want: Vec<f32> = match heads {
                Some(h) => (llama_file_row_order(t.rows, h).iter())
                    .flat_map(|&r| t.b[r * rank..(r + 1) * rank].to_vec())
                    .collect(),
                None => t.b.clone(),
            };
            assert_eq!(read_b("llama", name), want, "{name}");
            assert_ne!(heads.is_some(), want == t.b, "{name}");
        }
    }
}
