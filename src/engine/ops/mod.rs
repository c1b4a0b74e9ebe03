//! Fused CPU kernels with hand-written backward passes for the dense and SVF forward pass.
//!
//! Built from candle's composable ops, one SVF training step (`benches/svf_step.rs`) spent most
//! of its time outside the matrix products: every small op allocates its output and runs on
//! candle's element-wise thread pool, and in the backward pass each graph node (reshapes and
//! transposes included) allocates a zero gradient that the real one is then added to. Each
//! function here is one `CustomOp` instead — forward and backward written out side by side
//! (llm.c style), matrix products through `gemm` on the storage slices, rows spread over rayon:
//!
//! - [`matmul_const`], [`svf_linear`]: x·W and ((x·V) ⊙ s)·Uᵀ with constant factors;
//! - [`matmul_rows`]: x·Wᵀ over a matrix kept in its stored dtype (the output head);
//! - [`ternary_linear`]: BitNet's int8 × packed ternary product, differentiable in x;
//! - [`rms_norm`], [`softmax`], [`log_softmax`], [`target_log_probs`], [`gated_activation`],
//!   [`fake_quant_ste`]: row-wise and element-wise layers;
//! - [`causal_attention`]: RoPE, grouped-query causal attention and the head layout in one op.
//!
//! Every op takes f32 or f64 CPU tensors (made contiguous first). Any other dtype or device
//! falls back to the composable version in [`composable`], which is also the reference the
//! tests compare against (forward values, and finite differences for the backward).

pub mod composable;

mod attention;
mod fake_quant;
mod gated;
mod kernels;
mod matmul_const;
mod matmul_rows;
mod rms_norm;
mod softmax;
mod storage;
mod svf_linear;
mod target_log_probs;
mod ternary_linear;
#[cfg(test)]
mod testing;

pub use attention::{causal_attention, causal_attention_keys, rotate_keys};
pub use fake_quant::fake_quant_ste;
pub use gated::gated_activation;
pub use kernels::on_pool;
pub use matmul_const::matmul_const;
pub use matmul_rows::matmul_rows;
pub use rms_norm::rms_norm;
pub use softmax::{log_softmax, softmax};
pub use svf_linear::svf_linear;
pub use target_log_probs::target_log_probs;
pub use ternary_linear::ternary_linear;
