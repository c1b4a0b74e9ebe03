//! The block-quantized float types of ggml (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K) widened to f32
//! by candle's ggml codecs, which know them all; bitsvf keeps these tensors as f32 once read.

use super::QuantType;

/// The `rows × cols` values of a `ty` tensor stored as `bytes`, widened to f32 and checked
/// finite. The error says what is wrong (a row that is not whole blocks, a byte count that is
/// not the matrix's, a non-finite value).
pub fn decode_quant(
    ty: QuantType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> std::result::Result<Vec<f32>, String> {
    let c = ty.candle();
    let (block, size) = (c.block_size(), c.type_size());
    if !cols.is_multiple_of(block) {
        return Err(format!(
            "rows of {cols} values are not whole {block}-value blocks"
        ));
    }
    let want = rows * (cols / block) * size;
    if bytes.len() != want {
        return Err(format!(
            "{} bytes for a {rows}×{cols} matrix; expected {want}",
            bytes.len()
        ));
    }
    // candle views the bytes as blocks in place: give it a copy aligned for any block (a
    // block's widest field is an f32), never the file's bytes at an odd address.
    let mut aligned = vec![0u64; want.div_ceil(8)];
    let view: &mut [u8] = bytemuck::cast_slice_mut(&mut aligned);
    view[..want].copy_from_slice(bytes);
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
        c,
        &view[..want],
        vec![rows, cols],
        &candle_core::Device::Cpu,
    )
    .map_err(|e| e.to_string())?;
    let values: Vec<f32> = q
        .dequantize(&candle_core::Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .map_err(|e| e.to_string())?;
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(format!("non-finite value {} at index {i}", values[i]));
    }
    Ok(values)
}
