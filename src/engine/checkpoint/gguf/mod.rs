//! The GGUF container (llama.cpp's model file, versions 2 and 3): a header, typed metadata,
//! a tensor directory and the aligned tensor data. [`Gguf::open`] memory-maps a file and
//! checks every count, length, type and offset against the file before using it, so a
//! truncated or hostile file is an error naming the byte where it went wrong, never a panic
//! or an allocation the file cannot back. [`GgufWriter`] writes the same layout.
//!
//! The block types bitsvf decodes itself (TQ1_0, TQ2_0 in [`crate::engine::ternary::ggml`],
//! Q8_0 in [`super::FloatMatrix`]) and the float types are named in [`GgmlType`]; other ggml
//! types are listed with their id, so a reader can say which tensor it cannot take.

use super::st::SharedBytes;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

mod quants;
mod writer;
pub use quants::decode_quant;
pub use writer::GgufWriter;

/// "GGUF" as a little-endian u32.
const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most tensors or metadata entries a file may declare (llama.cpp's models have a few
/// thousand); a larger count is refused before anything is allocated for it.
const MAX_ENTRIES: u64 = 1 << 20;
/// Most dimensions of a tensor (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// A ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// int8 blocks of 32 with an f16 scale.
    Q8_0,
    /// A block-quantized float type that bitsvf widens to f32 on load through candle's ggml
    /// codecs (Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K … Q6_K).
    Quant(QuantType),
    /// Ternary, five trits per byte.
    Tq1_0,
    /// Ternary, four trits per byte.
    Tq2_0,
    /// bitnet.cpp's ternary type: 2-bit codes for the whole tensor and one f32 scale
    /// ([`crate::engine::ternary::i2s`]). Its id, 36, is bitnet.cpp's; upstream ggml never
    /// kept a type under it.
    I2S,
    /// Any other type, by its ggml id.
    Other(u32),
}

/// The block-quantized float types read through candle: (type, ggml id, name, values per
/// block, bytes per block).
const QUANT_TYPES: [(QuantType, u32, &str, u64, u64); 9] = [
    (QuantType::Q4_0, 2, "Q4_0", 32, 18),
    (QuantType::Q4_1, 3, "Q4_1", 32, 20),
    (QuantType::Q5_0, 6, "Q5_0", 32, 22),
    (QuantType::Q5_1, 7, "Q5_1", 32, 24),
    (QuantType::Q2K, 10, "Q2_K", 256, 84),
    (QuantType::Q3K, 11, "Q3_K", 256, 110),
    (QuantType::Q4K, 12, "Q4_K", 256, 144),
    (QuantType::Q5K, 13, "Q5_K", 256, 176),
    (QuantType::Q6K, 14, "Q6_K", 256, 210),
];

/// A block-quantized float type ([`GgmlType::Quant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantType {
    fn entry(self) -> (QuantType, u32, &'static str, u64, u64) {
        *QUANT_TYPES
            .iter()
            .find(|e| e.0 == self)
            .expect("every quant type is in the table")
    }

    /// candle's name of the type.
    pub fn candle(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as C;
        match self {
            QuantType::Q4_0 => C::Q4_0,
            QuantType::Q4_1 => C::Q4_1,
            QuantType::Q5_0 => C::Q5_0,
            QuantType::Q5_1 => C::Q5_1,
            QuantType::Q2K => C::Q2K,
            QuantType::Q3K => C::Q3K,
            QuantType::Q4K => C::Q4K,
            QuantType::Q5K => C::Q5K,
            QuantType::Q6K => C::Q6K,
        }
    }
}

impl GgmlType {
    /// The type of ggml id `id`.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            34 => GgmlType::Tq1_0,
            35 => GgmlType::Tq2_0,
            36 => GgmlType::I2S,
            other => match QUANT_TYPES.iter().find(|e| e.1 == other) {
                Some(e) => GgmlType::Quant(e.0),
                None => GgmlType::Other(other),
            },
        }
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::Quant(q) => q.entry().1,
            GgmlType::Bf16 => 30,
            GgmlType::Tq1_0 => 34,
            GgmlType::Tq2_0 => 35,
            GgmlType::I2S => 36,
            GgmlType::Other(id) => id,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::Bf16 => "BF16".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Quant(q) => q.entry().2.into(),
            GgmlType::Tq1_0 => "TQ1_0".into(),
            GgmlType::Tq2_0 => "TQ2_0".into(),
            GgmlType::I2S => "I2_S".into(),
            GgmlType::Other(id) => format!("ggml type {id}"),
        }
    }

    /// (values, bytes) of one block; `None` for a type bitsvf does not know and for I2_S,
    /// whose size is per tensor ([`TensorInfo::bytes`]).
    pub fn block(self) -> Option<(u64, u64)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::Bf16 => Some((1, 2)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Quant(q) => Some((q.entry().3, q.entry().4)),
            GgmlType::Tq1_0 => Some((256, 54)),
            GgmlType::Tq2_0 => Some((256, 66)),
            GgmlType::I2S | GgmlType::Other(_) => None,
        }
    }

    /// Whether values of this type are ternary codes (TQ1_0, TQ2_0, I2_S).
    pub fn is_ternary(self) -> bool {
        matches!(self, GgmlType::Tq1_0 | GgmlType::Tq2_0 | GgmlType::I2S)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// 1.
    I8(i8),
    /// 2.
    U16(u16),
    /// 3.
    I16(i16),
    /// 4.
    U32(u32),
    /// 5.
    I32(i32),
    /// 6.
    F32(f32),
    /// 7.
    Bool(bool),
    /// 8.
    Str(String),
    /// 9: elements of one type.
    Array(Vec<MetaValue>),
    /// 10.
    U64(u64),
    /// 11.
    I64(i64),
    /// 12.
    F64(f64),
}

impl MetaValue {
    /// An integer value of any width, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A numeric value as f64. An f32 is read as the shortest decimal that names it, so a
    /// setting written from an f64 (an ε of 1e-5) reads back as that f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.to_string().parse().unwrap_or(v.into())),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The GGUF type id of the value.
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// ggml's dimensions, innermost first (`[cols, rows]` for a matrix).
    pub dims: Vec<u64>,
    /// Its type.
    pub ty: GgmlType,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Values in the tensor.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of its data, when the type is known and the rows are whole blocks.
    pub fn bytes(&self) -> Option<u64> {
        if self.ty == GgmlType::I2S {
            let n = self.elements();
            let groups = crate::engine::ternary::i2s::QK_I2_S as u64;
            return n
                .is_multiple_of(groups)
                .then(|| n / 4 + crate::engine::ternary::i2s::TRAILER as u64);
        }
        let (values, bytes) = self.ty.block()?;
        let row = *self.dims.first().unwrap_or(&1);
        if !row.is_multiple_of(values) {
            return None;
        }
        (self.elements() / values).checked_mul(bytes)
    }

    /// `(rows, cols)` of a tensor of at most two dimensions (a vector is one row).
    pub fn matrix_shape(&self) -> Option<(usize, usize)> {
        match self.dims[..] {
            [cols] => Some((1, cols as usize)),
            [cols, rows] => Some((rows as usize, cols as usize)),
            _ => None,
        }
    }
}

/// An opened GGUF file.
pub struct Gguf {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// The tensor directory in file order.
    pub tensors: Vec<TensorInfo>,
    /// Start of the data section in the file.
    pub data_start: u64,
    bytes: SharedBytes,
}

impl Gguf {
    /// Whether `path` starts with the GGUF magic.
    pub fn sniff(path: &Path) -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && &magic == MAGIC
    }

    /// Memory-map and parse `path`.
    pub fn open(path: &Path) -> Result<Gguf> {
        Gguf::parse(path, super::st::map_file(path)?)
    }

    /// Parse the bytes of a GGUF file (`path` names it in errors).
    pub fn parse(path: &Path, bytes: SharedBytes) -> Result<Gguf> {
        let mut r = Reader {
            bytes: &bytes,
            at: 0,
            path,
        };
        if r.take(4)? != MAGIC {
            return Err(r.error(0, "not a GGUF file (no GGUF magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.error(4, format!("GGUF version {version}; bitsvf reads 2 and 3")));
        }
        let n_tensors = r.count("tensors")?;
        let n_meta = r.count("metadata entries")?;
        let mut metadata = Vec::with_capacity(n_meta.min(1024) as usize);
        for _ in 0..n_meta {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 14) as usize);
        for _ in 0..n_tensors {
            let at = r.at;
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.error(at, format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            if dims
                .iter()
                .try_fold(1u64, |p, &d| p.checked_mul(d))
                .is_none()
            {
                return Err(r.error(at, format!("tensor `{name}`: dimensions {dims:?} overflow")));
            }
            let ty = GgmlType::from_id(r.u32()?);
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(r.error(
                        r.at,
                        format!("general.alignment {v:?} is not a power of two"),
                    ))
                }
            },
        };
        let data_start = (r.at as u64).next_multiple_of(alignment);
        let gguf = Gguf {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        };
        // Every tensor of a known type lies inside the file.
        let mut seen = std::collections::HashSet::new();
        for t in &gguf.tensors {
            if !seen.insert(&t.name) {
                return Err(gguf.tensor_error(&t.name, "appears twice in the tensor directory"));
            }
            if !t.offset.is_multiple_of(alignment) {
                return Err(gguf.tensor_error(
                    &t.name,
                    format!("offset {} is not aligned to {alignment}", t.offset),
                ));
            }
            if let Some(n) = t.bytes() {
                let end = data_start
                    .checked_add(t.offset)
                    .and_then(|s| s.checked_add(n));
                if end.is_none_or(|e| e > gguf.bytes.len() as u64) {
                    return Err(gguf.tensor_error(
                        &t.name,
                        format!(
                            "its {n} bytes at offset {} run past the end of the file ({} bytes)",
                            t.offset,
                            gguf.bytes.len()
                        ),
                    ));
                }
            }
        }
        Ok(gguf)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's directory entry.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// A tensor's data, shared with the mapped file.
    pub fn data(&self, t: &TensorInfo) -> Result<SharedBytes> {
        let n = t.bytes().ok_or_else(|| {
            self.tensor_error(
                &t.name,
                format!(
                    "type {} with {:?} is not one bitsvf reads",
                    t.ty.name(),
                    t.dims
                ),
            )
        })?;
        Ok(self
            .bytes
            .slice((self.data_start + t.offset) as usize, n as usize))
    }

    /// An error about tensor `name`.
    pub fn tensor_error(&self, name: &str, msg: impl Into<String>) -> Error {
        Error::bad_value(&self.path, name, msg)
    }
}

/// A cursor over the file's bytes whose every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn error(&self, at: usize, msg: impl Into<String>) -> Error {
        Error::Input(format!(
            "{}: GGUF at byte {at}: {}",
            self.path.display(),
            msg.into()
        ))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.error(
                self.at,
                format!(
                    "needs {n} more bytes; the file ends at {}",
                    self.bytes.len()
                ),
            ));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of entries, refused above [`MAX_ENTRIES`].
    fn count(&mut self, what: &str) -> Result<u64> {
        let at = self.at;
        let n = self.u64()?;
        if n > MAX_ENTRIES {
            return Err(self.error(at, format!("{n} {what} (at most {MAX_ENTRIES})")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String> {
        let at = self.at;
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| self.error(at, "string length overflows"))?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.error(at, "string is not UTF-8"))
    }

    /// A value of GGUF type `ty`; arrays nest at most once more.
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        let at = self.at;
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.error(at, format!("bool value {b}"))),
            },
            8 => MetaValue::Str(self.string()?),
            9 if depth < 2 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                // Each element takes at least one byte: a count the rest of the file cannot
                // hold is refused before allocating.
                if n > (self.bytes.len() - self.at) as u64 {
                    return Err(self.error(
                        at,
                        format!("array of {n} elements past the end of the file"),
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(at, format!("metadata value type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ternary::ggml::TernaryBlocks;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
    }

    fn floats(path: &Path) -> Vec<f32> {
        std::fs::read(path)
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Decode a tensor of the fixture to f32 through bitsvf's codecs.
    fn decode(g: &Gguf, name: &str) -> Vec<f32> {
        let t = g.tensor(name).unwrap();
        let data = g.data(t).unwrap();
        match t.ty {
            GgmlType::F32 => data
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            GgmlType::F16 => data
                .chunks(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlType::Q8_0 => {
                let (rows, cols) = t.matrix_shape().unwrap();
                super::super::FloatMatrix::from_q8_0_blocks(&data, rows, cols)
                    .unwrap()
                    .to_f32()
            }
            GgmlType::Tq1_0 => TernaryBlocks::Tq1_0.dequantize_row(&data),
            GgmlType::Tq2_0 => TernaryBlocks::Tq2_0.dequantize_row(&data),
            other => panic!("{other:?}"),
        }
    }

    /// The gguf package's file: every metadata type and tensor type reads back as written.
    #[test]
    fn reads_what_the_gguf_package_writes() {
        let path = fixture_dir().join("small.gguf");
        assert!(Gguf::sniff(&path));
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(
            g.get("general.architecture").unwrap().as_str(),
            Some("bitnet")
        );
        assert_eq!(g.get("test.u8"), Some(&MetaValue::U8(200)));
        assert_eq!(g.get("test.i8"), Some(&MetaValue::I8(-100)));
        assert_eq!(g.get("test.u16"), Some(&MetaValue::U16(60000)));
        assert_eq!(g.get("test.i16"), Some(&MetaValue::I16(-30000)));
        assert_eq!(g.get("test.u32"), Some(&MetaValue::U32(4_000_000_000)));
        assert_eq!(g.get("test.i32"), Some(&MetaValue::I32(-2_000_000_000)));
        assert_eq!(g.get("test.f32"), Some(&MetaValue::F32(1.5)));
        assert_eq!(g.get("test.bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(g.get("test.string").unwrap().as_str(), Some("ternäry"));
        assert_eq!(g.get("test.u64"), Some(&MetaValue::U64((1 << 40) + 3)));
        assert_eq!(g.get("test.i64"), Some(&MetaValue::I64(-(1 << 40))));
        assert_eq!(g.get("test.f64"), Some(&MetaValue::F64(-0.25)));
        let arr = g.get("test.array_u32").unwrap().as_array().unwrap();
        assert_eq!(
            arr.iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let strs = g.get("test.array_str").unwrap().as_array().unwrap();
        assert_eq!(
            strs.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>(),
            ["a", "bc", ""]
        );
        for (name, dims) in [
            ("f32", vec![4, 3]),
            ("f16", vec![8, 2]),
            ("q8_0", vec![64, 2]),
            ("tq2_0", vec![256, 2]),
            ("tq1_0", vec![256, 1]),
        ] {
            assert_eq!(g.tensor(name).unwrap().dims, dims, "{name}");
            let want = floats(&fixture_dir().join(format!("{name}.f32")));
            assert_eq!(decode(&g, name), want, "{name}");
        }
    }

    /// What the writer writes, the reader reads back; the gguf package's file round-trips
    /// to the same bytes.
    #[test]
    fn writes_what_it_reads() {
        let path = fixture_dir().join("small.gguf");
        let g = Gguf::open(&path).unwrap();
        let mut w = GgufWriter::default();
        for (k, v) in &g.metadata {
            w.meta(k, v.clone());
        }
        for t in &g.tensors {
            w.tensor(&t.name, t.ty, t.dims.clone(), g.data(t).unwrap().to_vec())
                .unwrap();
        }
        assert_eq!(w.to_bytes().unwrap(), std::fs::read(&path).unwrap());
    }

    /// Truncations and corruptions anywhere are errors naming the file, never panics.
    #[test]
    fn damaged_files_are_errors() {
        let path = fixture_dir().join("small.gguf");
        let good = std::fs::read(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.gguf");
        let try_bytes = |bytes: &[u8]| {
            std::fs::write(&bad, bytes).unwrap();
            Gguf::open(&bad).map(|g| {
                // A readable directory: every tensor's data must still be reachable.
                for t in &g.tensors {
                    let _ = g.data(t);
                }
            })
        };
        for cut in [0, 3, 4, 8, 20, 40, 100, 700, 1000, 1200] {
            let err = try_bytes(&good[..cut]).unwrap_err().to_string();
            assert!(err.contains("bad.gguf"), "cut {cut}: {err}");
        }
        // Every single byte flipped in the header and directory: no panic.
        for i in 0..736 {
            let mut b = good.clone();
            b[i] ^= 0xA5;
            let _ = try_bytes(&b);
        }
        // A huge count is refused before any allocation.
        let mut b = good.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(try_bytes(&b).unwrap_err().to_string().contains("tensors"));
    }
}
