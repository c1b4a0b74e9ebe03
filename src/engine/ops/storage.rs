//! CPU storage access shared by the fused ops: which tensors they take, views of their data,
//! the state a forward pass saves for its backward pass, and shape and tensor helpers.

use super::kernels::Real;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Shape, Storage, StorageRef, Tensor};
use std::sync::Mutex;

/// candle's result type, which `CustomOp` methods return.
pub(super) type CResult<T> = candle_core::Result<T>;

/// Whether the fused kernels apply: all on the CPU, one dtype, f32 or f64.
pub(super) fn fast(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// The contiguous data of a CPU tensor, read-locked for as long as the view lives.
pub(super) struct CpuView<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> CpuView<'a> {
    pub(super) fn of(t: &'a Tensor) -> CResult<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("fused op: tensor of shape {:?} is not contiguous", t.dims())
        };
        Ok(CpuView {
            storage,
            start,
            end,
        })
    }

    pub(super) fn get<T: Real>(&self) -> CResult<&[T]> {
        match &*self.storage {
            Storage::Cpu(s) => match T::slice(s) {
                Some(v) => Ok(&v[self.start..self.end]),
                None => bail!("fused op: unexpected dtype {:?}", s.dtype()),
            },
            _ => bail!("fused op: tensor is not on the CPU"),
        }
    }
}

/// The data of a `cpu_fwd` argument.
pub(super) fn input<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: input of shape {:?} is not contiguous", l.dims())
    };
    match T::slice(s) {
        Some(v) => Ok(&v[start..end]),
        None => bail!("{op}: mixed dtypes ({:?})", s.dtype()),
    }
}

/// State an op's forward pass leaves for its backward pass.
pub(super) struct Saved<S>(Mutex<Option<S>>);

impl<S> Saved<S> {
    pub(super) fn empty() -> Self {
        Saved(Mutex::new(None))
    }

    pub(super) fn put(&self, state: S) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Option<S>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The state in a [`Saved::lock`] guard, or an error naming `op` if no forward pass saved it.
pub(super) fn required<'a, S>(guard: &'a Option<S>, op: &str) -> CResult<&'a S> {
    match guard.as_ref() {
        Some(s) => Ok(s),
        None => bail!("{op}: backward without a saved forward pass"),
    }
}

/// State an op saved in its forward pass, in the dtype of its arguments.
pub(super) fn saved_slice<T: Real>(c: &CpuStorage) -> &[T] {
    T::slice(c).expect("an op's saved state has the dtype of its arguments")
}

/// A CPU tensor owning `v` (no copy).
pub(super) fn tensor<T: Real>(v: Vec<T>, shape: impl Into<Shape>) -> CResult<Tensor> {
    let (shape, dev) = (shape.into(), candle_core::Device::Cpu);
    match T::into_storage(v) {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &dev),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, &dev),
        other => bail!("fused op: unexpected dtype {:?}", other.dtype()),
    }
}

/// Run `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! with_real {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            dt => bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}
pub(super) use with_real;

/// A shape mismatch between the arguments of a fused op (a bug in the caller).
pub(super) fn shape_error(msg: String) -> crate::Error {
    candle_core::Error::Msg(msg).into()
}

/// A shape `[.., cols]` seen as a `rows × cols` matrix. The ops take N-d tensors as they are:
/// a reshape would be one more graph node whose backward allocates and adds a full gradient.
pub(super) fn rows_cols(shape: &Shape) -> CResult<(usize, usize)> {
    let Some((&cols, lead)) = shape.dims().split_last() else {
        bail!("fused op: a scalar has no feature dim")
    };
    Ok((lead.iter().product(), cols))
}

/// `shape` with its last dim replaced by `last`.
pub(super) fn with_last(shape: &Shape, last: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    *d.last_mut().expect("tensor has a feature dim") = last;
    d.into()
}
