//! The library's error type. Every variant names the file (and, where there is one, the tensor,
//! field or line) at fault and what was expected, so a user can act on the message alone.

use std::path::PathBuf;

/// Errors raised by bitsvf's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error (shown in the message, so not chained as a source).
        error: std::io::Error,
    },
    /// A safetensors file is truncated or its header is corrupt.
    #[error("{path}: not a valid safetensors file ({msg}); is it truncated or corrupt?")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser said.
        msg: String,
    },
    /// A tensor the format requires is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    #[error("{path}: tensor `{tensor}` has dtype {got}, expected {expected}")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What the format expects.
        expected: String,
        /// What the file holds.
        got: String,
    },
    /// A tensor's values are invalid (packed code 3, a non-ternary value, a NaN/Inf scale…).
    #[error("{path}: tensor `{tensor}`: {msg}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with the values.
        msg: String,
    },
    /// A config field is missing, malformed or disagrees with the weights.
    #[error("{path}: config field `{field}`: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// Settings (a run configuration, training options) that cannot work, every problem with
    /// the JSON path of its field; found before any work starts.
    #[error("{path}: invalid settings: {}", problems.iter().map(|(f, m)| format!("`{f}`: {m}")).collect::<Vec<_>>().join("; "))]
    Settings {
        /// Where the settings came from (a file, or a word such as `settings`).
        path: PathBuf,
        /// (JSON path of the field, what is wrong), in the order of the fields.
        problems: Vec<(String, String)>,
    },
    /// The files do not match any supported model format.
    #[error("{path}: unknown model format: {msg}")]
    UnknownFormat {
        /// The file or directory given.
        path: PathBuf,
        /// What was found and what was expected.
        msg: String,
    },
    /// Invalid user input that is not a file (a command-line value, token ids…).
    #[error("{0}")]
    Input(String),
    /// A model-level check failed (e.g. recovery below the 99% threshold).
    #[error("check failed: {0}")]
    Check(String),
    /// An error from the tensor library.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A JSON document could not be written or read.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An error of one of bitsvf's own modules with its own error type — the task suite
    /// (`tasks::TaskError`), the generator client (`tasks::RemoteError`), the SVD cache
    /// (`svf::svd::SvdError`), a search (`search::SearchError`), the tokenizer — kept whole
    /// (its message, its source chain, and its type for `downcast_ref`) instead of flattened
    /// into a string. Each owning module converts its type (`impl From<…> for Error`), so this
    /// file names no module above it.
    #[error(transparent)]
    Module(Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// `impl From<$ty> for Error` through [`Error::Module`], written once: each module with its
/// own error type invokes it beside the type, so this file names nothing above it.
#[macro_export]
#[doc(hidden)]
macro_rules! module_error {
    ($ty:ty) => {
        impl From<$ty> for $crate::Error {
            fn from(e: $ty) -> Self {
                $crate::Error::module(e)
            }
        }
    };
}

/// Result alias used across the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Keep a module's own error whole (see [`Error::Module`]).
    pub fn module(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Module(Box::new(e))
    }

    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    /// A bad-value error for `tensor` in `path`.
    pub fn bad_value(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::BadValue {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }

    /// A config error for `field` in `path`.
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}

/// The problems found in a settings structure, each with the JSON path of its field
/// (`train.steps`, `search.alpha_bounds.count`), gathered by one walk over every field so a
/// user sees them all at once. [`Checks::into_result`] turns them into an [`Error::Settings`].
#[derive(Debug, Default)]
pub struct Checks {
    prefix: Vec<String>,
    found: Vec<(String, String)>,
}

impl Checks {
    /// No problems yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check the fields of a nested structure under `key` (`c.nested("train", |c| …)`).
    pub fn nested(&mut self, key: &str, f: impl FnOnce(&mut Checks)) {
        self.prefix.push(key.to_string());
        f(self);
        self.prefix.pop();
    }

    /// Record a problem with `field` unless `ok`.
    pub fn that(&mut self, ok: bool, field: &str, msg: impl FnOnce() -> String) {
        if !ok {
            let path = (self.prefix.iter().map(String::as_str))
                .chain((!field.is_empty()).then_some(field))
                .collect::<Vec<_>>()
                .join(".");
            self.found.push((path, msg()));
        }
    }

    /// `field` must be a count in `1..=max`.
    pub fn count(&mut self, field: &str, v: usize, max: usize) {
        self.that((1..=max).contains(&v), field, || {
            format!("got {v}; expected between 1 and {max}")
        });
    }

    /// `field` must be a finite number in `[lo, hi]`.
    pub fn number(&mut self, field: &str, v: f64, lo: f64, hi: f64) {
        self.that(v.is_finite() && lo <= v && v <= hi, field, || {
            format!("got {v}; expected a finite value in [{lo}, {hi}]")
        });
    }

    /// The problems found so far, as (JSON path, what is wrong).
    pub fn problems(&self) -> &[(String, String)] {
        &self.found
    }

    /// `Ok` when nothing was found, else an [`Error::Settings`] naming `source` (the file the
    /// settings came from, or a word such as `settings`).
    pub fn into_result(self, source: impl Into<PathBuf>) -> Result<()> {
        if self.found.is_empty() {
            Ok(())
        } else {
            Err(Error::Settings {
                path: source.into(),
                problems: self.found,
            })
        }
    }
}
