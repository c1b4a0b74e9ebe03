//! Causal grouped-query attention with rotate-half RoPE as one op: the RoPE rows, the
//! per-head score / softmax / value products and the hand-written backward pass.

use super::composable;
use super::kernels::{
    dot, flush, flush_subnormals, simd_fn, softmax_in_place, task_rows, tile_gemm, Real, SendPtr,
    View, NEGLIGIBLE_PROB,
};
use super::storage::{
    fast, input, required, saved_slice, shape_error, tensor, with_real, CResult, CpuView, Saved,
};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rotate-half RoPE (HF convention) of `x` `[B, L, n·hd]`, position `first + l` for row l of
/// each batch, tables `cos`, `sin` `[≥ first + L, hd]`. `inverse` applies the transposed
/// rotation (the backward pass).
#[allow(clippy::too_many_arguments)]
fn rope_rows<T: Real>(
    x: &[T],
    len: usize,
    row: usize,
    hd: usize,
    first: usize,
    cos: &[T],
    sin: &[T],
    inverse: bool,
) -> Vec<T> {
    let half = hd / 2;
    let mut y = vec![T::ZERO; x.len()];
    if row == 0 || len == 0 {
        return y;
    }
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .with_min_len(task_rows(row))
        .for_each(|(bl, (y, x))| {
            let p = first + bl % len;
            let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
            let (c1, c2) = c.split_at(half);
            let (s1, s2) = s.split_at(half);
            for (y, x) in y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    if inverse {
                        y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                        y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                    } else {
                        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                    }
                }
            }
        });
    y
}

/// Causal grouped-query attention with rotate-half RoPE: softmax(q̃·k̃ᵀ/√hd + mask)·v, where q̃,
/// k̃ are q, k rotated by the tables `cos`, `sin` `[max_pos, hd]`.
///
/// `q` is `[B, T, heads·hd]`, `k` and `v` are `[B, S, kv_heads·hd]` (unrotated), S ≥ T: the
/// queries are the last T of the S positions, so a KV cache is the first S − T. Query head h
/// reads kv head h·kv_heads/heads. Returns `[B, T, heads·hd]`.
///
/// One op in the token-major layout of the projections: the head transposes, RoPE, the mask
/// and the softmax never become tensors (graph nodes) of their own, and the backward pass
/// reuses the rotated q, k and the attention probabilities of the forward pass.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    causal_attention_keys((q, k, v), (heads, kv_heads), (cos, sin), false)
}

/// Keys `k` `[B, L, kv_heads·hd]` at positions `first..first + L` rotated by the RoPE tables
/// `cos`, `sin` `[≥ first + L, hd]`, as [`causal_attention`] rotates them (no gradient: for a
/// KV cache).
pub fn rotate_keys(
    k: &Tensor,
    kv_heads: usize,
    (cos, sin): (&Tensor, &Tensor),
    first: usize,
) -> Result<Tensor> {
    let (b, l, w) = k.dims3()?;
    let hd = w.checked_div(kv_heads).unwrap_or(0);
    if kv_heads == 0 || w != kv_heads * hd || hd % 2 != 0 || cos.dims2()?.1 != hd {
        return Err(shape_error(format!(
            "rotate_keys: k {:?} with {kv_heads} heads and RoPE tables {:?}",
            k.dims(),
            cos.dims()
        )));
    }
    if cos.dim(0)? < first + l || sin.dims() != cos.dims() {
        return Err(shape_error(format!(
            "rotate_keys: RoPE tables {:?} do not reach position {}",
            cos.dims(),
            first + l
        )));
    }
    let k = k.detach();
    if !fast(&[&k, cos, sin]) {
        let x = k.reshape((b, l, kv_heads, hd))?;
        return Ok(composable::rope(&x, cos, sin, first)?.reshape((b, l, w))?);
    }
    let k = k.contiguous()?;
    let (kv, cv, sv) = (CpuView::of(&k)?, CpuView::of(cos)?, CpuView::of(sin)?);
    fn rotated<T: Real + candle_core::WithDType>(
        (k, cos, sin): (&CpuView, &CpuView, &CpuView),
        (b, l, w, hd, first): (usize, usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let y = rope_rows(
            k.get::<T>()?,
            l,
            w,
            hd,
            first,
            cos.get()?,
            sin.get()?,
            false,
        );
        Ok(Tensor::from_vec(y, (b, l, w), &candle_core::Device::Cpu)?)
    }
    let dims = (b, l, w, hd, first);
    match k.dtype() {
        DType::F64 => rotated::<f64>((&kv, &cv, &sv), dims),
        _ => rotated::<f32>((&kv, &cv, &sv), dims),
    }
}

/// [`causal_attention`], or with `keys_rotated` over keys already rotated to their positions
/// ([`rotate_keys`]): a KV cache that stores rotated keys rotates each key once, not once per
/// decoded token. The gradient of k is then the gradient of the rotated keys.
pub fn causal_attention_keys(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    keys_rotated: bool,
) -> Result<Tensor> {
    if !fast(&[q, k, v, cos, sin]) {
        return composable::causal_attention_keys(
            (q, k, v),
            (heads, kv_heads),
            (cos, sin),
            keys_rotated,
        );
    }
    let (b, t, qw) = q.dims3()?;
    let (b2, s, kw) = k.dims3()?;
    let hd = qw.checked_div(heads).unwrap_or(0);
    let fits = heads > 0
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && qw == heads * hd
        && hd % 2 == 0
        && b2 == b
        && kw == kv_heads * hd
        && v.dims() == k.dims()
        && s >= t
        && cos.dims2()?.1 == hd
        && cos.dim(0)? >= s
        && sin.dims() == cos.dims();
    if !fits {
        return Err(shape_error(format!(
            "causal_attention: q {:?}, k {:?}, v {:?} with {heads}/{kv_heads} heads and RoPE \
             tables {:?} do not fit [B,T,H·hd], [B,S,KV·hd], [≥S, hd]",
            q.dims(),
            k.dims(),
            v.dims(),
            cos.dims()
        )));
    }
    let op = Attention {
        heads,
        kv_heads,
        scale: 1.0 / (hd as f64).sqrt(),
        cos: cos.narrow(0, 0, s)?.contiguous()?,
        sin: sin.narrow(0, 0, s)?.contiguous()?,
        keys_rotated,
        keep: q.track_op() || k.track_op() || v.track_op(),
        saved: Saved::empty(),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f64,
    /// RoPE tables of positions 0..S, `[S, hd]`.
    cos: Tensor,
    sin: Tensor,
    /// Whether k comes rotated (then neither rotated here nor its gradient rotated back).
    keys_rotated: bool,
    /// Whether a backward pass may follow (then `saved` is filled).
    keep: bool,
    saved: Saved<AttentionSaved>,
}

/// What the backward pass reuses from the forward pass.
struct AttentionSaved {
    /// Rotated q `[B, T, H·hd]` and k `[B, S, KV·hd]`.
    q: CpuStorage,
    k: CpuStorage,
    /// Attention probabilities `[B, H, T, S]`.
    probs: CpuStorage,
}

simd_fn! {
    /// Rows of `p` (length `s`; query i sees keys 0..=offset + i) from scores to causal
    /// softmax probabilities, negligible ones flushed to 0.
    fn causal_softmax_rows<T: Real>(p: &mut [T], s: usize, offset: usize) {
        let negligible = T::from_f64(NEGLIGIBLE_PROB);
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            let (keep, masked) = row.split_at_mut(offset + i + 1);
            softmax_in_place(keep);
            for p in keep.iter_mut() {
                *p = flush(*p, negligible);
            }
            masked.fill(T::ZERO);
        }
    }
}

simd_fn! {
    /// ∂L/∂scores from ∂L/∂p (in `ds`, overwritten) and p, rows of length `s`:
    /// ds = p ⊙ (dp − Σ_j p ⊙ dp) · scale (masked entries have p = 0).
    fn attention_score_grads<T: Real>(ds: &mut [T], p: &[T], s: usize, scale: T) {
        for (dsr, pr) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
            let c = dot(dsr, pr);
            for (a, &pv) in dsr.iter_mut().zip(pr) {
                *a = flush(pv * (*a - c) * scale, T::MIN_NORMAL);
            }
        }
    }
}

/// (B, T, S, H, KV, hd) of an attention call.
type AttnDims = (usize, usize, usize, usize, usize, usize);

impl Attention {
    fn dims(&self, q: &Shape, k: &Shape) -> CResult<AttnDims> {
        let (b, t, qw) = q.dims3()?;
        let s = k.dims3()?.1;
        Ok((b, t, s, self.heads, self.kv_heads, qw / self.heads))
    }

    /// Rotate `x` `[B, L, n·hd]` whose rows sit at positions `S − L..S`.
    fn rope<T: Real>(&self, x: &[T], d: AttnDims, len: usize, inverse: bool) -> CResult<Vec<T>> {
        let (_, _, s, _, _, hd) = d;
        let (cv, sv) = (CpuView::of(&self.cos)?, CpuView::of(&self.sin)?);
        let row = x.len() / (d.0 * len).max(1);
        Ok(rope_rows(
            x,
            len,
            row,
            hd,
            s - len,
            cv.get()?,
            sv.get()?,
            inverse,
        ))
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], d: AttnDims) -> (Vec<T>, Vec<T>) {
        let (b, t, s, h, kv, hd) = d;
        let (rep, offset) = (h / kv, s - t);
        let (scale, one) = (T::from_f64(self.scale), T::ONE);
        let mut out = vec![T::ZERO; b * t * h * hd];
        let mut probs = vec![T::ZERO; b * h * t * s];
        let out_ptr = SendPtr(out.as_mut_ptr());
        if t * s > 0 {
            probs.par_chunks_mut(t * s).enumerate().for_each(|(bh, p)| {
                let (bi, hi) = (bh / h, bh % h);
                let q_off = bi * t * h * hd + hi * hd;
                let kv_off = bi * s * kv * hd + (hi / rep) * hd;
                let qm = View::rows(&q[q_off..], h * hd);
                let km = View::rows(&k[kv_off..], kv * hd);
                let vm = View::rows(&v[kv_off..], kv * hd);
                // Safety: q/k/v views stay inside their slices for these shapes (checked
                // in `causal_attention`); `p` is this task's own chunk and each task writes
                // the disjoint columns of head `hi` in batch `bi` of `out`.
                unsafe {
                    tile_gemm((t, s, hd), (p.as_mut_ptr(), s), false, (qm, km.t()), scale);
                }
                causal_softmax_rows(p, s, offset);
                unsafe {
                    let pm = View::rows(p, s);
                    let out_at = (out_ptr.at(q_off), h * hd);
                    tile_gemm((t, hd, s), out_at, false, (pm, vm), one);
                }
            });
        }
        (out, probs)
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Real>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        dout: &[T],
        probs: &[T],
        d: AttnDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (b, t, s, h, kv, hd) = d;
        let rep = h / kv;
        let (scale, one) = (T::from_f64(self.scale), T::ONE);
        let (mut dq, mut dk, mut dv) = (
            vec![T::ZERO; q.len()],
            vec![T::ZERO; k.len()],
            vec![T::ZERO; v.len()],
        );
        if t * s * hd == 0 {
            return (dq, dk, dv);
        }
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        // One task per kv head: the query heads that share it accumulate into its dk, dv.
        (0..b * kv).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kv, bg % kv);
            let kv_off = bi * s * kv * hd + g * hd;
            let km = View::rows(&k[kv_off..], kv * hd);
            let vm = View::rows(&v[kv_off..], kv * hd);
            let mut ds = vec![T::ZERO; t * s];
            let (dk_at, dv_at) = ((dk_ptr.at(kv_off), kv * hd), (dv_ptr.at(kv_off), kv * hd));
            for hi in g * rep..(g + 1) * rep {
                let p = &probs[(bi * h + hi) * t * s..][..t * s];
                let q_off = bi * t * h * hd + hi * hd;
                let qm = View::rows(&q[q_off..], h * hd);
                let dom = View::rows(&dout[q_off..], h * hd);
                let pm = View::rows(p, s);
                // Safety: views as in the forward pass; this task alone writes the columns of
                // kv head `g` in batch `bi` of dk, dv and those of its query heads in dq.
                unsafe {
                    // dv += pᵀ · dout
                    tile_gemm((s, hd, t), dv_at, true, (pm.t(), dom), one);
                    // dp = dout · vᵀ
                    tile_gemm((t, s, hd), (ds.as_mut_ptr(), s), false, (dom, vm.t()), one);
                }
                attention_score_grads(&mut ds, p, s, scale);
                let dsm = View::rows(&ds, s);
                unsafe {
                    // dq = ds · k
                    let dq_at = (dq_ptr.at(q_off), h * hd);
                    tile_gemm((t, hd, s), dq_at, false, (dsm, km), one);
                    // dk += dsᵀ · q
                    tile_gemm((s, hd, t), dk_at, true, (dsm.t(), qm), one);
                }
            }
        });
        for g in [&mut dq, &mut dk, &mut dv] {
            flush_subnormals(g);
        }
        (dq, dk, dv)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = self.dims(ql.shape(), kl.shape())?;
        let (t, s) = (d.1, d.2);
        with_real!(qs.dtype(), self.name(), T => {
            let q = self.rope(input::<T>(qs, ql, self.name())?, d, t, false)?;
            let k = input::<T>(ks, kl, self.name())?;
            let k = match self.keys_rotated {
                true => std::borrow::Cow::Borrowed(k),
                false => std::borrow::Cow::Owned(self.rope(k, d, s, false)?),
            };
            let (out, probs) = self.forward(&q, &k, input::<T>(vs, vl, self.name())?, d);
            if self.keep {
                self.saved.put(AttentionSaved {
                    q: T::into_storage(q),
                    k: T::into_storage(k.into_owned()),
                    probs: T::into_storage(probs),
                });
            }
            Ok((T::into_storage(out), ql.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape(), k.shape())?;
        let (t, s) = (d.1, d.2);
        let dout = dout.contiguous()?;
        let (vv, dv) = (CpuView::of(v)?, CpuView::of(&dout)?);
        let guard = self.saved.lock();
        let saved = required(&guard, self.name())?;
        with_real!(q.dtype(), self.name(), T => {
            let (gq, gk, gv) = self.backward(
                (saved_slice(&saved.q), saved_slice(&saved.k), vv.get::<T>()?),
                dv.get::<T>()?,
                saved_slice(&saved.probs),
                d,
            );
            // Gradients w.r.t. the rotated q, k → w.r.t. q, k: the inverse rotation.
            let gq = if q.track_op() { self.rope(&gq, d, t, true)? } else { gq };
            let gk = match k.track_op() && !self.keys_rotated {
                true => self.rope(&gk, d, s, true)?,
                false => gk,
            };
            let grad = |g: Vec<T>, like: &Tensor| -> CResult<Option<Tensor>> {
                like.track_op().then(|| tensor(g, like.shape().clone())).transpose()
            };
            Ok((grad(gq, q)?, grad(gk, k)?, grad(gv, v)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

    #[test]
    fn causal_attention_matches_and_differentiates() {
        // (B, T, S, H, KV, hd): plain, grouped-query, a KV cache (S > T), one query token.
        for (b, t, s, h, kv, hd) in [
            (1, 3, 3, 2, 2, 4),
            (2, 4, 4, 4, 2, 6),
            (1, 3, 5, 2, 1, 4),
            (2, 1, 4, 2, 2, 2),
            (1, 6, 6, 2, 1, 4),
            (2, 5, 7, 4, 2, 6),
        ] {
            // RoPE tables longer than S: only positions 0..S are read.
            let (cos, sin) = (uniform(&[s + 2, hd], 11), uniform(&[s + 2, hd], 12));
            let inputs = [
                uniform(&[b, t, h * hd], 14),
                uniform(&[b, s, kv * hd], 15),
                uniform(&[b, s, kv * hd], 16),
                cos,
                sin,
            ];
            let fused = |a: &[Tensor]| causal_attention(&a[0], &a[1], &a[2], h, kv, &a[3], &a[4]);
            same_forward(
                &inputs,
                &fused,
                &|a| composable::causal_attention((&a[0], &a[1], &a[2]), (h, kv), (&a[3], &a[4])),
                1e-6,
            );
            check_gradients(&inputs, &[true, true, true, false, false], &fused);
            check_gradients(&inputs, &[false, true, false, false, false], &fused);

            // Keys rotated beforehand (a KV cache's): the same attention, and the gradient of
            // the rotated keys.
            let rotated = |a: &[Tensor]| {
                let k = rotate_keys(&a[1], kv, (&a[3], &a[4]), 0)?;
                causal_attention_keys((&a[0], &k, &a[2]), (h, kv), (&a[3], &a[4]), true)
            };
            same_forward(&inputs, &rotated, &fused, 1e-6);
            let given = |a: &[Tensor]| {
                causal_attention_keys((&a[0], &a[1], &a[2]), (h, kv), (&a[3], &a[4]), true)
            };
            let composable_given = |a: &[Tensor]| {
                let (qkv, heads, rope) = ((&a[0], &a[1], &a[2]), (h, kv), (&a[3], &a[4]));
                composable::causal_attention_keys(qkv, heads, rope, true)
            };
            same_forward(&inputs, &given, &composable_given, 1e-6);
            check_gradients(&inputs, &[true, true, true, false, false], &given);
        }
    }

    #[test]
    fn keys_rotate_at_their_positions() {
        // Rotating keys 2..5 of a sequence alone gives rows 2..5 of rotating all of it.
        let (cos, sin) = (uniform(&[6, 4], 11), uniform(&[6, 4], 12));
        let k = uniform(&[1, 5, 8], 13);
        let all = rotate_keys(&k, 2, (&cos, &sin), 0).unwrap();
        let tail = rotate_keys(&k.narrow(1, 2, 3).unwrap(), 2, (&cos, &sin), 2).unwrap();
        let want = all.narrow(1, 2, 3).unwrap();
        let diff = (tail - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        // Past the tables' end, a clear error.
        assert!(rotate_keys(&k, 2, (&cos, &sin), 2).is_err());
    }

    #[test]
    fn rope_rotates_pairs_of_features() {
        // Pair (i, i + hd/2) rotated by θ: cos = cos θ and sin = sin θ at every position.
        let (theta, hd) = (0.3f64, 4);
        let cos = vec![theta.cos(); 2 * hd];
        let sin = vec![theta.sin(); 2 * hd];
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = rope_rows(&x, 1, hd, hd, 1, &cos, &sin, false);
        let (c, s) = (theta.cos(), theta.sin());
        let want = [
            c - 3.0 * s,
            2.0 * c - 4.0 * s,
            3.0 * c + s,
            4.0 * c + 2.0 * s,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        // The inverse rotation undoes it.
        let back = rope_rows(&y, 1, hd, hd, 1, &cos, &sin, true);
        for (a, b) in back.iter().zip(x) {
            assert!((a - b).abs() < 1e-15);
        }
    }
}
