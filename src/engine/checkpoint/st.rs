//! Memory-mapped safetensors reading (single files and sharded indexes) and atomic writing.

use super::huge::HugeMap;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The bytes of one file: memory-mapped, or compiled into the binary; or bytes made on load,
/// on the heap or (large ones) in huge-page memory.
enum Backing {
    /// A read-only map of the file, and the file (to read a range without mapping it).
    Mmap(Mmap, std::fs::File),
    Static(&'static [u8]),
    Owned(Vec<u8>),
    Huge(HugeMap),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m, _) => m,
            Backing::Static(b) => b,
            Backing::Owned(b) => b,
            Backing::Huge(b) => b,
        }
    }
}

/// Bytes shared with the file they came from: cloning shares the mapping, which stays alive
/// while any clone does.
#[derive(Clone)]
pub struct SharedBytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

/// The whole file at `path`, memory-mapped read-only.
pub fn map_file(path: &Path) -> Result<SharedBytes> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: as in `TensorFiles::open`: a read-only map of a file nobody should change
    // while it loads.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let len = mmap.len();
    Ok(SharedBytes {
        backing: Arc::new(Backing::Mmap(mmap, file)),
        start: 0,
        len,
    })
}

impl SharedBytes {
    /// Bytes held in memory (a matrix rearranged on load).
    pub fn from_vec(bytes: Vec<u8>) -> SharedBytes {
        let len = bytes.len();
        SharedBytes {
            backing: Arc::new(Backing::Owned(bytes)),
            start: 0,
            len,
        }
    }

    /// `len` bytes written by `fill` (given them zeroed): in huge-page memory when they are
    /// large enough for it (see [`HugeMap`]), else on the heap.
    pub fn resident(len: usize, fill: impl FnOnce(&mut [u8])) -> SharedBytes {
        let filled = Self::try_resident(len, |bytes| {
            fill(bytes);
            Ok::<(), std::convert::Infallible>(())
        });
        match filled {
            Ok(bytes) => bytes,
            Err(never) => match never {},
        }
    }

    /// [`Self::resident`] with a `fill` that may fail.
    pub fn try_resident<E>(
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<SharedBytes, E> {
        let backing = match HugeMap::new(len) {
            Some(mut map) => {
                fill(map.as_mut_slice())?;
                Backing::Huge(map)
            }
            None => {
                let mut bytes = vec![0u8; len];
                fill(&mut bytes)?;
                Backing::Owned(bytes)
            }
        };
        Ok(SharedBytes {
            backing: Arc::new(backing),
            start: 0,
            len,
        })
    }

    /// These bytes copied by [`Self::resident`] when they are a file mapping's, else shared as
    /// they are; on the calling thread. The copy reads the file (the page cache straight into
    /// the new memory, none of the file's pages mapped), or where that fails copies from the
    /// mapping and lets go of its pages as it goes.
    pub fn into_resident(self) -> SharedBytes {
        let Backing::Mmap(_, file) = &*self.backing else {
            return self;
        };
        const CHUNK: usize = 8 << 20;
        SharedBytes::resident(self.len, |out| {
            for (i, dst) in out.chunks_mut(CHUNK).enumerate() {
                let at = i * CHUNK;
                if !read_at(file, dst, (self.start + at) as u64) {
                    self.populate_range(at, dst.len());
                    dst.copy_from_slice(&self[at..at + dst.len()]);
                    self.release_range(at, dst.len());
                }
            }
        })
    }

    /// Whether these bytes are a file mapping's.
    pub fn is_mapped(&self) -> bool {
        matches!(&*self.backing, Backing::Mmap(..))
    }

    /// Bytes `offset..offset + len` of these, sharing the mapping. Panics when out of range
    /// (callers check ranges against the file first).
    pub fn slice(&self, offset: usize, len: usize) -> SharedBytes {
        assert!(
            offset + len <= self.len,
            "slice {offset}+{len} of {} bytes",
            self.len
        );
        SharedBytes {
            backing: Arc::clone(&self.backing),
            start: self.start + offset,
            len,
        }
    }

    /// Map the file's pages of bytes `offset..offset + len` of these in one call, ahead of
    /// reading them all (rather than a page fault every few pages); best effort.
    pub fn populate_range(&self, offset: usize, len: usize) {
        if let Some((map, at, len)) = self.mapped_range(offset, len) {
            let _ = map.advise_range(memmap2::Advice::PopulateRead, at, len);
        }
    }

    /// The file mapping under bytes `offset..offset + len` of these, with that range's place
    /// in it clipped to these bytes; `None` when they are not a mapping's or the range is
    /// empty.
    fn mapped_range(&self, offset: usize, len: usize) -> Option<(&Mmap, usize, usize)> {
        let len = len.min(self.len.saturating_sub(offset));
        match &*self.backing {
            Backing::Mmap(map, _) if len > 0 => Some((map, self.start + offset, len)),
            _ => None,
        }
    }

    /// Give back the resident pages of bytes `offset..offset + len` of these when they are
    /// memory-mapped (see [`TensorFiles::release`]); best effort.
    pub fn release_range(&self, offset: usize, len: usize) {
        if let Some((map, at, len)) = self.mapped_range(offset, len) {
            // SAFETY: a read-only private file mapping: dropped pages are read again from
            // the file when next touched.
            let _ =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len) };
        }
    }
}

/// Fill `buf` from `file` at `offset`; false where that is not possible or fails.
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset).is_ok()
    }
    #[cfg(not(unix))]
    {
        let _ = (file, buf, offset);
        false
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len)
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }
}

struct StFile {
    path: PathBuf,
    mmap: Arc<Backing>,
    data_start: usize,
    meta: Metadata,
}

/// One or more memory-mapped safetensors files seen as one tensor namespace.
pub struct TensorFiles {
    files: Vec<StFile>,
    index: HashMap<String, usize>,
}

/// A borrowed tensor with the file it came from, for error messages.
pub struct RawTensor<'a> {
    /// The file holding it.
    pub path: &'a Path,
    /// Its name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Little-endian bytes.
    pub data: &'a [u8],
    backing: &'a Arc<Backing>,
    start: usize,
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl TensorFiles {
    /// Map and parse the headers of `paths`. Truncated or corrupt files give
    /// [`Error::Safetensors`] naming the file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a file changed underneath us while loading is
            // outside what any model loader can defend against (same as candle and HF).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            files.push(StFile::parse(path.clone(), Backing::Mmap(mmap, file))?);
            for name in files[i].meta.tensors().keys() {
                index.insert(name.clone(), i);
            }
        }
        Ok(TensorFiles { files, index })
    }

    /// A safetensors image compiled into the binary; `name` stands for its path in messages.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self> {
        let f = StFile::parse(PathBuf::from(name), Backing::Static(bytes))?;
        let index = f.meta.tensors().keys().map(|n| (n.clone(), 0)).collect();
        Ok(TensorFiles {
            files: vec![f],
            index,
        })
    }

    /// A metadata string of the first file's header (`__metadata__`).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.files
            .first()?
            .meta
            .metadata()
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// The first file's path (the one named in format-level errors).
    pub fn path(&self) -> &Path {
        &self.files[0].path
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Total bytes of the files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.mmap.len() as u64).sum()
    }

    /// Give back the memory of the mapped pages of every tensor whose name starts with
    /// `prefix`, once they are read into another layout: the pages leave this process's
    /// resident set (they stay in the page cache, and reading them again maps them again).
    /// Best effort: a failed advice changes nothing but the memory figure.
    pub fn release(&self, prefix: &str) {
        for (name, &i) in &self.index {
            let f = &self.files[i];
            let (Backing::Mmap(map, _), true) = (&*f.mmap, name.starts_with(prefix)) else {
                continue;
            };
            let Some(info) = f.meta.info(name) else {
                continue;
            };
            let (a, b) = info.data_offsets;
            // SAFETY: the map is a read-only private file mapping, so dropping its pages
            // loses nothing: a later read faults them in again from the file. Rounding the
            // start down to a page may drop a neighbour's pages, with the same effect.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    f.data_start + a,
                    b - a,
                )
            };
        }
    }

    /// A tensor, or [`Error::MissingTensor`].
    pub fn get<'a>(&'a self, name: &'a str) -> Result<RawTensor<'a>> {
        let Some(&i) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                path: self.path().to_path_buf(),
                tensor: name.to_string(),
            });
        };
        let f = &self.files[i];
        let info: &TensorInfo = f.meta.info(name).expect("indexed tensor has info");
        let (a, b) = info.data_offsets;
        Ok(RawTensor {
            path: &f.path,
            name,
            dtype: info.dtype,
            shape: &info.shape,
            data: &f.mmap[f.data_start + a..f.data_start + b],
            backing: &f.mmap,
            start: f.data_start + a,
        })
    }
}

impl StFile {
    fn parse(path: PathBuf, mmap: Backing) -> Result<Self> {
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(StFile {
            path,
            mmap: Arc::new(mmap),
            data_start: 8 + n,
            meta,
        })
    }
}

impl RawTensor<'_> {
    /// Error unless the shape is `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::Shape {
                path: self.path.to_path_buf(),
                tensor: self.name.to_string(),
                expected: expected.to_vec(),
                got: self.shape.to_vec(),
            });
        }
        Ok(())
    }

    fn dtype_error(&self, expected: &str) -> Error {
        Error::Dtype {
            path: self.path.to_path_buf(),
            tensor: self.name.to_string(),
            expected: expected.to_string(),
            got: dtype_name(self.dtype),
        }
    }

    /// Whether the element type is a float type we read.
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        )
    }

    /// Values as f32 from F32/F16/BF16/F64; errors on other dtypes and on NaN/Inf.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let v: Vec<f32> = match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            _ => return Err(self.dtype_error("F32, F16, BF16 or F64")),
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::bad_value(
                self.path,
                self.name,
                format!("non-finite value {} at index {i}", v[i]),
            ));
        }
        Ok(v)
    }

    /// Raw bytes of a U8 tensor.
    pub fn as_u8(&self) -> Result<&[u8]> {
        if self.dtype != Dtype::U8 {
            return Err(self.dtype_error("U8"));
        }
        Ok(self.data)
    }

    /// Values of an I8 tensor.
    pub fn as_i8(&self) -> Result<Vec<i8>> {
        if self.dtype != Dtype::I8 {
            return Err(self.dtype_error("I8"));
        }
        Ok(self.data.iter().map(|&b| b as i8).collect())
    }

    /// The bytes, shared with the mapped file (no copy).
    pub fn shared(&self) -> SharedBytes {
        SharedBytes {
            backing: self.backing.clone(),
            start: self.start,
            len: self.data.len(),
        }
    }

    /// An owned copy.
    pub fn to_owned(&self) -> OwnedTensor {
        OwnedTensor::raw(self.dtype, self.shape.to_vec(), self.data.to_vec())
    }

    /// A bad-value error about this tensor.
    pub fn bad(&self, msg: impl Into<String>) -> Error {
        Error::bad_value(self.path, self.name, msg)
    }
}

/// An owned tensor to write.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl OwnedTensor {
    /// A tensor from raw little-endian bytes.
    pub fn raw(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Self {
        OwnedTensor { dtype, shape, data }
    }
    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
    /// Mutable raw bytes.
    pub fn data_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }
    /// An f32 tensor.
    pub fn f32(shape: Vec<usize>, v: &[f32]) -> Self {
        OwnedTensor {
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    /// A u8 tensor.
    pub fn u8(shape: Vec<usize>, v: Vec<u8>) -> Self {
        OwnedTensor {
            dtype: Dtype::U8,
            shape,
            data: v,
        }
    }
    /// An i8 tensor.
    pub fn i8(shape: Vec<usize>, v: &[i8]) -> Self {
        OwnedTensor {
            dtype: Dtype::I8,
            shape,
            data: v.iter().map(|&x| x as u8).collect(),
        }
    }
    /// An f16 tensor.
    pub fn f16(shape: Vec<usize>, v: &[f32]) -> Self {
        OwnedTensor {
            dtype: Dtype::F16,
            shape,
            data: v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
    /// A bf16 tensor.
    pub fn bf16(shape: Vec<usize>, v: &[f32]) -> Self {
        OwnedTensor {
            dtype: Dtype::BF16,
            shape,
            data: v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
    /// An i64 tensor.
    pub fn i64(shape: Vec<usize>, v: &[i64]) -> Self {
        OwnedTensor {
            dtype: Dtype::I64,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A temporary sibling path for atomic writes of `path`, distinct per process and per call
/// (so concurrent writers never share one).
pub fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{k}", std::process::id()))
}

/// Write bytes to `path` atomically ([`crate::io::write_atomic`]): readers (and a crash) see
/// the old file or the new one, never a prefix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::io::write_atomic(path, bytes)
}

/// Serialize tensors (+ header metadata) to `path` atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    write_atomic(path, &sorted_header(bytes))
}

/// One tensor of a [`write_safetensors_streamed`] file: its name, dtype, shape, and what makes
/// its little-endian bytes when their turn comes.
pub struct Streamed<'a> {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Produces the bytes (exactly shape · dtype size of them).
    pub bytes: Box<dyn Fn() -> Vec<u8> + 'a>,
}

/// A safetensors file written one tensor at a time, atomically: only one tensor's bytes are
/// in memory at once, for files larger than the memory (a dequantized 2B model is 9.6 GB).
/// Tensors are laid out in name order and the header's keys are sorted, so the same tensors
/// always give the same bytes.
pub fn write_safetensors_streamed(
    path: &Path,
    mut tensors: Vec<Streamed>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(m));
    }
    let byte_len = |t: &Streamed| t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
    let mut offset = 0usize;
    for t in &tensors {
        let len = byte_len(t);
        let entry = serde_json::json!({
            "dtype": dtype_name(t.dtype),
            "shape": t.shape,
            "data_offsets": [offset, offset + len],
        });
        header.insert(t.name.clone(), entry);
        offset += len;
    }
    let mut head = serde_json::to_vec(&header).expect("a header serializes");
    head.resize(head.len().next_multiple_of(8), b' ');
    crate::io::write_atomic_with(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for t in &tensors {
            let bytes = (t.bytes)();
            let want = byte_len(t);
            if bytes.len() != want {
                return Err(std::io::Error::other(format!(
                    "tensor `{}` made {} bytes, its header says {want}",
                    t.name,
                    bytes.len()
                )));
            }
            w.write_all(&bytes)?;
        }
        Ok(())
    })
}

/// `bytes` (a serialized safetensors file) with its JSON header's keys sorted, so the same
/// tensors and metadata always give the same bytes (the safetensors crate writes its metadata
/// map in hash order). Same length: only the order of the header's entries changes.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("the header safetensors just wrote");
    let sorted = |v: &serde_json::Value| match v.as_object() {
        Some(m) => serde_json::to_value(m.iter().collect::<BTreeMap<_, _>>()).expect("json"),
        None => v.clone(),
    };
    let header: BTreeMap<&String, serde_json::Value> =
        header.iter().map(|(k, v)| (k, sorted(v))).collect();
    let mut text = serde_json::to_vec(&header).expect("json");
    if text.len() > n {
        return bytes; // cannot happen (same entries, same compact form); keep the crate's order
    }
    text.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&text);
    bytes
}
