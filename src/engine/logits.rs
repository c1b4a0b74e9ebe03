//! The raw logits of one forward pass, written to a safetensors file (`bitsvf logits`): the
//! parity check against a reference implementation such as transformers.

use crate::engine::checkpoint::st::{write_safetensors, OwnedTensor};
use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{Model, ModelOptions};
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Run `ck` under `options` on the token id `rows` (equal lengths) and write tensors `logits`
/// (f32 `[rows, T, vocab]`) and `input_ids` (i64 `[rows, T]`) to `out`; returns the logits'
/// shape.
pub fn write_logits(
    ck: &Checkpoint,
    rows: &[Vec<u32>],
    options: ModelOptions,
    out: &Path,
) -> Result<Vec<usize>> {
    write_model_logits(&Model::new(ck, options)?, rows, out)
}

/// [`write_logits`] of a model already built (an expert's, say).
pub fn write_model_logits(net: &Model, rows: &[Vec<u32>], out: &Path) -> Result<Vec<usize>> {
    let logits = net.forward(&net.ids_tensor(rows)?, None)?;
    let shape = logits.dims().to_vec();
    let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let ids: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    let tensors = BTreeMap::from([
        (
            "logits".to_string(),
            OwnedTensor::f32(shape.clone(), &values),
        ),
        (
            "input_ids".to_string(),
            OwnedTensor::i64(vec![rows.len(), rows[0].len()], &ids),
        ),
    ]);
    write_safetensors(out, &tensors, None)?;
    Ok(shape)
}
