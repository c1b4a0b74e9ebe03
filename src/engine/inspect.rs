//! `bitsvf inspect`: what a model file holds — format, architecture, sizes, ternary statistics.

use crate::engine::checkpoint::Checkpoint;
use crate::engine::config::ModelConfig;
use crate::engine::ternary::TernaryStats;
use serde::Serialize;

/// One linear matrix in the report.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixInfo {
    /// HF tensor prefix.
    pub name: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// `ternary`, or the float dtype the weight is held in.
    pub dtype: String,
    /// Number of scales (1 = per tensor; 0 for a float matrix).
    pub scales: usize,
    /// Value shares and scale range (ternary matrices).
    pub stats: Option<TernaryStats>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// File or directory inspected.
    pub path: String,
    /// Detected format.
    pub format: String,
    /// Quantization rule.
    pub quantization: String,
    /// What the linears are: `ternary` (BitNet), or `float (f16)` and the like — a float model
    /// runs without BitNet's activation quantization unless ternarized (`--ternarize`).
    pub linears: String,
    /// Architecture.
    pub config: ModelConfig,
    /// Content hash (format-independent).
    pub content_hash: String,
    /// All stored parameters.
    pub parameters: usize,
    /// Parameters of the ternary linears.
    pub ternary_parameters: usize,
    /// Bytes of the files on disk.
    pub bytes_on_disk: u64,
    /// Bytes the same parameters take as f32.
    pub bytes_f32: u64,
    /// Bytes of the linears as held: packed ternary (2 bits/weight + scales), float as stored.
    pub bytes_ternary_packed: u64,
    /// How the embeddings and the output head are held: stored dtype, bytes, tied or not.
    pub embeddings: String,
    /// Statistics over all ternary weights.
    pub ternary: TernaryStats,
    /// Per-matrix details.
    pub matrices: Vec<MatrixInfo>,
}

/// Build the report for a loaded checkpoint.
pub fn inspect(ck: &Checkpoint) -> InspectReport {
    let mut matrices = Vec::new();
    let (mut z, mut p, mut m, mut n) = (0f64, 0f64, 0f64, 0f64);
    let (mut smin, mut smax) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut packed = 0u64;
    for (name, _, lin) in ck.linears() {
        let stats = lin.matrix.ternary().map(|mx| {
            let stats = mx.stats();
            let count = (mx.rows * mx.cols) as f64;
            z += stats.zeros * count;
            p += stats.plus * count;
            m += stats.minus * count;
            n += count;
            smin = smin.min(stats.scale_min);
            smax = smax.max(stats.scale_max);
            stats
        });
        packed += lin.matrix.stored_bytes() as u64;
        matrices.push(MatrixInfo {
            name,
            shape: [lin.matrix.rows(), lin.matrix.cols()],
            dtype: lin.matrix.dtype_name().into(),
            scales: lin.matrix.ternary().map_or(0, |t| t.scales.len()),
            stats,
        });
    }
    let n = n.max(1.0);
    let parameters = ck.parameter_count();
    InspectReport {
        path: ck.source.display().to_string(),
        format: ck.format.name(),
        quantization: ck.quantization.name(),
        linears: match ck.is_ternary() {
            true => "ternary (BitNet: int8 activations)".into(),
            false => format!("float ({}): activations unquantized", ck.linear_dtypes()),
        },
        config: ck.config.clone(),
        content_hash: ck.content_hash(),
        parameters,
        ternary_parameters: ck.ternary_parameter_count(),
        bytes_on_disk: ck.bytes_on_disk,
        bytes_f32: 4 * parameters as u64,
        bytes_ternary_packed: packed,
        embeddings: embeddings_line(ck),
        ternary: TernaryStats {
            zeros: z / n,
            plus: p / n,
            minus: m / n,
            scale_min: smin,
            scale_max: smax,
        },
        matrices,
    }
}

/// The embeddings' stored dtype and size, and whether the head is them or a matrix of its own.
fn embeddings_line(ck: &Checkpoint) -> String {
    let e = &ck.embed_tokens;
    let held = |m: &crate::engine::checkpoint::FloatMatrix| match m.dtype() {
        crate::engine::checkpoint::StoredDtype::F32 => "in memory",
        _ => "mapped from the file, rows widened to f32 on use",
    };
    let head = match &ck.lm_head {
        None => "the output head is the same matrix (tied)".to_string(),
        Some(h) => format!(
            "output head {} {}, {}",
            h.dtype().name(),
            human_bytes(h.stored_bytes() as u64),
            held(h)
        ),
    };
    format!(
        "{} [{}×{}] {}, {}; {head}",
        e.dtype().name(),
        e.rows,
        e.cols,
        human_bytes(e.stored_bytes() as u64),
        held(e)
    )
}

/// Bytes in a human unit.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

impl InspectReport {
    /// The human-readable form printed by `bitsvf inspect`.
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<22} {v}\n"));
        line("path", self.path.clone());
        line("format", self.format.clone());
        line("linears", self.linears.clone());
        if self.ternary_parameters > 0 {
            line("quantization", self.quantization.clone());
        }
        line("content hash", self.content_hash[..16].to_string());
        line(
            "architecture",
            format!(
                "{} layers, d {}, ffn {} ({:?}), heads {}/{} kv, head_dim {}, vocab {}",
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.hidden_act,
                c.num_attention_heads,
                c.kv_heads(),
                c.head_dim(),
                c.vocab_size
            ),
        );
        line(
            "details",
            format!(
                "rope_theta {}, rms_norm_eps {}, max_pos {}, sub-norms {}, tied embeddings {}",
                c.rope_theta,
                c.rms_norm_eps,
                c.max_position_embeddings,
                c.sub_norms.unwrap_or(false),
                c.tie_word_embeddings
            ),
        );
        line(
            "parameters",
            format!(
                "{} ({} ternary, {:.1}%)",
                self.parameters,
                self.ternary_parameters,
                100.0 * self.ternary_parameters as f64 / self.parameters.max(1) as f64
            ),
        );
        line(
            "bytes",
            format!(
                "{} on disk vs {} as f32 ({:.1}× smaller); linears as held {}",
                human_bytes(self.bytes_on_disk),
                human_bytes(self.bytes_f32),
                self.bytes_f32 as f64 / self.bytes_on_disk.max(1) as f64,
                human_bytes(self.bytes_ternary_packed)
            ),
        );
        line("embeddings", self.embeddings.clone());
        if self.ternary_parameters > 0 {
            line(
                "ternary values",
                format!(
                    "{:.1}% zero, {:.1}% +1, {:.1}% −1; scale γ in [{:.4e}, {:.4e}]",
                    100.0 * self.ternary.zeros,
                    100.0 * self.ternary.plus,
                    100.0 * self.ternary.minus,
                    self.ternary.scale_min,
                    self.ternary.scale_max
                ),
            );
        }
        s.push_str(&format!(
            "\n{:<40} {:>12} {:>7} {:>7} {:>11} {:>11}\n",
            "matrix", "shape", "zeros", "scales", "γ min", "γ max"
        ));
        for m in &self.matrices {
            let shape = format!("{}×{}", m.shape[0], m.shape[1]);
            s.push_str(&match &m.stats {
                Some(st) => format!(
                    "{:<40} {:>12} {:>6.1}% {:>7} {:>11.4e} {:>11.4e}\n",
                    m.name,
                    shape,
                    100.0 * st.zeros,
                    m.scales,
                    st.scale_min,
                    st.scale_max
                ),
                None => format!(
                    "{:<40} {:>12} {:>8} float ({})\n",
                    m.name, shape, "", m.dtype
                ),
            });
        }
        s
    }
}
