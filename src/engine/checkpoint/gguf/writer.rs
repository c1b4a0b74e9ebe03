//! Writing GGUF files: [`GgufWriter`] collects metadata and tensors (bytes, or how to encode
//! them) and writes the file in one atomic pass, a tensor at a time.

use super::{GgmlType, MetaValue, TensorInfo, DEFAULT_ALIGNMENT, MAGIC};
use crate::error::{Error, Result};
use std::path::Path;

/// A tensor's data for [`GgufWriter`]: its bytes, or how to make them when the file is
/// written.
enum TensorData<'a> {
    Bytes(Vec<u8>),
    Lazy(Box<dyn Fn() -> Result<Vec<u8>> + 'a>),
}

/// Writes a GGUF (version 3) file: metadata and tensors are collected, then written in one
/// pass through an atomic writer (a killed write leaves no partial file). Tensors added with
/// [`GgufWriter::tensor_with`] are encoded one at a time as the file is written, so a model
/// need not be held twice in memory.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(TensorInfo, u64, TensorData<'a>)>,
}

impl<'a> GgufWriter<'a> {
    /// A writer for architecture `arch` (`general.architecture`).
    pub fn new(arch: &str) -> GgufWriter<'a> {
        let mut w = GgufWriter::default();
        w.meta("general.architecture", MetaValue::Str(arch.into()));
        w
    }

    /// Add (or replace) a metadata entry.
    pub fn meta(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// The directory entry of a tensor, and its size, checked against its type.
    fn info(name: &str, ty: GgmlType, dims: Vec<u64>) -> Result<(TensorInfo, u64)> {
        let info = TensorInfo {
            name: name.to_string(),
            dims,
            ty,
            offset: 0,
        };
        let bytes = info.bytes().ok_or_else(|| {
            Error::Input(format!(
                "GGUF tensor `{name}`: dims {:?} are not whole {} blocks",
                info.dims,
                ty.name()
            ))
        })?;
        Ok((info, bytes))
    }

    /// Add a tensor of `ty` with ggml `dims` (innermost first) and its encoded bytes.
    pub fn tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<()> {
        let (info, bytes) = Self::info(name, ty, dims)?;
        if bytes != data.len() as u64 {
            return Err(Error::Input(format!(
                "GGUF tensor `{name}`: {} bytes for a {} tensor of dims {:?}",
                data.len(),
                ty.name(),
                info.dims
            )));
        }
        self.tensors.push((info, bytes, TensorData::Bytes(data)));
        Ok(())
    }

    /// Add a tensor whose bytes `encode` makes when the file is written (checked then against
    /// the size its type and dims give).
    pub fn tensor_with(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: Vec<u64>,
        encode: impl Fn() -> Result<Vec<u8>> + 'a,
    ) -> Result<()> {
        let (info, bytes) = Self::info(name, ty, dims)?;
        self.tensors
            .push((info, bytes, TensorData::Lazy(Box::new(encode))));
        Ok(())
    }

    /// The header: magic, counts, metadata and the tensor directory, padded to the alignment.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (t, bytes, _) in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + bytes).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        // The data section starts aligned, and every tensor's data is padded to the alignment
        // (the last one too, as ggml's writers do).
        out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT as usize), 0);
        out
    }

    /// The whole file through `sink`, a tensor at a time.
    fn write_to(&self, sink: &mut dyn std::io::Write) -> Result<()> {
        let io = |e: std::io::Error| Error::Input(format!("writing GGUF: {e}"));
        sink.write_all(&self.header()).map_err(io)?;
        let align = DEFAULT_ALIGNMENT as usize;
        for (t, bytes, data) in &self.tensors {
            let made;
            let data: &[u8] = match data {
                TensorData::Bytes(b) => b,
                TensorData::Lazy(encode) => {
                    made = encode()?;
                    &made
                }
            };
            if data.len() as u64 != *bytes {
                return Err(Error::Input(format!(
                    "GGUF tensor `{}`: {} bytes for a {} tensor of dims {:?}",
                    t.name,
                    data.len(),
                    t.ty.name(),
                    t.dims
                )));
            }
            sink.write_all(data).map_err(io)?;
            let pad = data.len().next_multiple_of(align) - data.len();
            sink.write_all(&vec![0u8; pad]).map_err(io)?;
        }
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Write the file atomically, encoding the tensors one at a time.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut failed = None;
        let written = crate::io::write_atomic_with(path, |w| {
            self.write_to(w).map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                std::io::Error::other(msg)
            })
        });
        match failed {
            Some(e) => Err(e),
            None => written,
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => put_string(out, s),
        MetaValue::Array(items) => {
            let elem = items.first().map_or(4, MetaValue::type_id);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}
