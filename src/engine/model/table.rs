//! The embeddings and the output head of a [`Model`]: a matrix in the checkpoint's stored
//! dtype (or quantized to Q8_0 for decoding), or a tensor.

use super::Model;
use crate::engine::checkpoint::FloatMatrix;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// How the output head is held for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadFormat {
    /// As the checkpoint stores it (f32, bf16 or f16).
    #[default]
    Stored,
    /// Quantized to ggml's Q8_0 on load: 8.5 bits per weight, about half of bf16's bytes
    /// read per decoded token.
    Q8_0,
}

crate::value_names!(
    HeadFormat,
    "head format",
    [
        (
            Stored,
            "stored",
            "The checkpoint's dtype (f32, bf16 or f16)"
        ),
        (
            Q8_0,
            "q8_0",
            "ggml Q8_0: int8 in blocks of 32 with an f16 scale"
        ),
    ]
);

/// The embeddings or the output head.
#[derive(Debug, Clone)]
pub(super) enum Table {
    /// The checkpoint's `[vocab, d]` matrix in its stored dtype, shared (f32 models: the
    /// embeddings, and a bf16 / f16 head).
    Stored(FloatMatrix),
    /// A tensor: `[vocab, d]` embeddings, or the head transposed `[d, vocab]` — trained from
    /// scratch, or converted to a dtype other than f32.
    Tensor(Tensor),
}

impl Table {
    /// The checkpoint's `m` for an f32 model, else `m` (transposed when `head`) in `dt`.
    /// An f32 head is the exception: it is held transposed, because the product with the
    /// transposed copy is the one every figure so far was computed with, to the bit (a
    /// product over `m` in place rounds differently); bf16 and f16 heads stay stored.
    pub(super) fn new(m: &FloatMatrix, head: bool, dt: DType, dev: &Device) -> Result<Self> {
        let exact_f32_head = head && m.as_f32().is_some();
        if dt == DType::F32 && !exact_f32_head {
            return Ok(Table::Stored(m.clone()));
        }
        let t = Tensor::from_vec(m.to_f32(), (m.rows, m.cols), dev)?.to_dtype(dt)?;
        Ok(Table::Tensor(match head {
            true => t.t()?.contiguous()?,
            false => t,
        }))
    }

    /// As a `[vocab, d]` matrix (`head`: a tensor holds the transposed head).
    pub(super) fn to_matrix(&self, head: bool) -> Result<FloatMatrix> {
        match self {
            Table::Stored(m) => Ok(m.clone()),
            Table::Tensor(t) => {
                let t = if head { t.t()? } else { t.clone() };
                let (v, d) = t.dims2()?;
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Ok(FloatMatrix::from_f32(values, v, d))
            }
        }
    }
}

impl Model {
    /// This model with its output head held as `format`. Q8_0 quantizes the head (the
    /// embedding matrix when tied; the embeddings themselves stay as they are), letting go
    /// of the resident pages of a memory-mapped one as it reads them.
    pub fn with_head(mut self, format: HeadFormat) -> Result<Self> {
        if format == HeadFormat::Q8_0 {
            self.head = Table::Stored(self.head.to_matrix(true)?.to_q8_0()?);
        }
        Ok(self)
    }

    /// Start copying a memory-mapped bf16 / f16 head into huge-page memory on a thread of its
    /// own (see [`ModelOptions::defer_head_copy`](super::ModelOptions)): decoding goes on
    /// meanwhile, each part of the head read from its copy once that part is made. None when
    /// there is nothing to copy.
    pub fn copy_head_in_background(&self) -> Option<std::thread::JoinHandle<()>> {
        match &self.head {
            Table::Stored(m) => m.make_resident_in_background(),
            Table::Tensor(_) => None,
        }
    }

    /// Bytes of weights a decoded token reads: every linear (packed ternary or dense) and
    /// the output head, in the form they are held (a hybrid linear counts its packed base;
    /// a z-adapted one is not counted).
    pub fn weight_bytes_per_token(&self) -> usize {
        use super::LinearWeight;
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let linears: usize = (self.blocks.iter().flat_map(|b| &b.linears))
            .map(|l| match &l.weight {
                LinearWeight::Ternary(m) => m.packed_bytes(),
                LinearWeight::Hybrid(m, _) => m.stored_bytes(),
                LinearWeight::Dense(t) | LinearWeight::Qat(t) => tensor(t),
                LinearWeight::Float(m) => m.stored_bytes(),
                LinearWeight::Adapted(_) => 0,
            })
            .sum();
        let head = match &self.head {
            Table::Stored(m) => m.stored_bytes(),
            Table::Tensor(t) => tensor(t),
        };
        linears + head
    }

    /// How the output head is held now: its dtype's name.
    pub fn head_dtype(&self) -> String {
        match &self.head {
            Table::Stored(m) => m.dtype().name().to_string(),
            Table::Tensor(t) => format!("{:?}", t.dtype()).to_lowercase(),
        }
    }
}
