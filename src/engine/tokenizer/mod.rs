//! Tokenizers: the built-in byte tokenizer of the default model (one id per ASCII byte) and,
//! for real models, Hugging Face `tokenizer.json` files or the tokenizer in a GGUF file's
//! metadata ([`gguf`]).

use crate::error::{Error, Result};

pub mod gguf;

/// Token ids of the byte tokenizer: id = ASCII code, plus three control codes as specials.
pub mod byte_ids {
    /// Padding (NUL).
    pub const PAD: u32 = 0;
    /// Beginning of sequence (STX).
    pub const BOS: u32 = 2;
    /// End of an answer: the newline that terminates every task text.
    pub const EOS: u32 = b'\n' as u32;
}

/// Vocabulary size of the byte tokenizer (7-bit ASCII).
pub const BYTE_VOCAB: usize = 128;

/// A tokenizer: text ↔ ids.
pub trait Tokenizer: Send + Sync {
    /// Encode `text` (no specials added).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decode ids to text (specials dropped).
    fn decode(&self, ids: &[u32]) -> String;
    /// The beginning-of-sequence id, if the model uses one.
    fn bos(&self) -> Option<u32>;
    /// The id that ends an answer.
    fn eos(&self) -> u32;
    /// Every id that ends an answer (the terminator and the model's end of sequence).
    fn stop_ids(&self) -> Vec<u32> {
        vec![self.eos()]
    }
    /// Every id that ends a chat turn: the end of sequence and the model's end-of-turn tokens
    /// (`<|eot_id|>`, `<|im_end|>`, … — what llama.cpp treats as end of generation).
    fn end_of_turn_ids(&self) -> Vec<u32> {
        vec![self.eos()]
    }
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
    /// The text of token `id` as the vocabulary spells it (special tokens included), where the
    /// tokenizer knows it.
    fn token_text(&self, id: u32) -> Option<String> {
        let _ = id;
        None
    }
}

/// One id per ASCII byte. The default model's tokenizer: every task prompt is printable ASCII.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.char_indices()
            .map(|(i, c)| {
                if c.is_ascii() && (c == '\n' || !c.is_ascii_control()) {
                    Ok(c as u32)
                } else {
                    Err(Error::Input(format!(
                        "character {c:?} at byte {i} of {text:?} is not printable ASCII, which \
                         the byte tokenizer of the default model cannot encode"
                    )))
                }
            })
            .collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter(|&&i| i < BYTE_VOCAB as u32 && (i == byte_ids::EOS || i >= 32))
            .map(|&i| i as u8 as char)
            .collect()
    }

    fn bos(&self) -> Option<u32> {
        Some(byte_ids::BOS)
    }

    fn eos(&self) -> u32 {
        byte_ids::EOS
    }

    fn vocab_size(&self) -> usize {
        BYTE_VOCAB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_roundtrip_and_errors() {
        let t = ByteTokenizer;
        let ids = t.encode("12+34=46\n").unwrap();
        assert_eq!(ids[0], b'1' as u32);
        assert_eq!(*ids.last().unwrap(), byte_ids::EOS);
        assert_eq!(t.decode(&ids), "12+34=46\n");
        assert_eq!(t.decode(&[byte_ids::BOS, b'a' as u32, byte_ids::PAD]), "a");
        let e = t.encode("naïve").unwrap_err().to_string();
        assert!(e.contains("byte 2"), "{e}");
    }
}

/// The `tokenizer.json` at `path`, parsed.
fn read_tokenizer_json(path: &std::path::Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::UnknownFormat {
        path: path.to_path_buf(),
        msg: format!("not a readable tokenizer.json: {e}"),
    })
}

/// A parsed tokenizer and the tokens whose decoded text holds a newline.
struct Parsed {
    inner: tokenizers::Tokenizer,
    newline: Vec<u32>,
}

impl Parsed {
    /// Decoding all of a 128k vocabulary takes a third of a second, so only the tokens that
    /// can decode to a newline are decoded: those that hold one as written, as byte-level BPE's
    /// `Ċ` or as a byte fallback's `<0x0A>`. A decoder that replaces text could make one of
    /// anything, so with one every token is decoded.
    fn new(inner: tokenizers::Tokenizer) -> Self {
        let replaces = (inner.get_decoder())
            .is_some_and(|d| serde_json::to_string(d).map_or(true, |j| j.contains("\"Replace\"")));
        let may = |t: &str| replaces || t.contains(['\n', 'Ċ']) || t.contains("<0x0A>");
        let ids = 0..inner.get_vocab_size(true) as u32;
        let newline = (ids.filter(|&id| inner.id_to_token(id).is_some_and(|t| may(&t))))
            .filter(|&id| inner.decode(&[id], false).is_ok_and(|s| s.contains('\n')))
            .collect();
        Parsed { inner, newline }
    }
}

/// A Hugging Face `tokenizer.json`, through the `tokenizers` crate.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    stop: Vec<u32>,
    turn_end: Vec<u32>,
    vocab: usize,
}

/// Special tokens that end a chat turn in the usual chat formats (llama.cpp's end-of-generation
/// list).
const END_OF_TURN: [&str; 9] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|eom_id|>",
    "</s>",
];

impl HfTokenizer {
    /// Load `path`; `bos`/`eos` come from the model config (eos also ends answers, as does
    /// any token containing a newline — the task suite's answer terminator).
    pub fn from_file(path: &std::path::Path, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        Self::new(Parsed::new(read_tokenizer_json(path)?), path, bos, eos)
    }

    /// `parsed`, read from `path`, with the model's `bos` and `eos`.
    fn new(
        parsed: Parsed,
        path: &std::path::Path,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        let Parsed { inner, newline } = parsed;
        let vocab = inner.get_vocab_size(true);
        let mut stop = newline;
        stop.extend(eos);
        stop.sort_unstable();
        stop.dedup();
        if stop.is_empty() {
            return Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                msg: "the tokenizer has no newline token and the config no eos_token_id, so \
                      answers could never end"
                    .into(),
            });
        }
        let mut turn_end: Vec<u32> = END_OF_TURN
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .chain(eos)
            .collect();
        turn_end.sort_unstable();
        turn_end.dedup();
        if turn_end.is_empty() {
            turn_end.push(stop[0]);
        }
        Ok(HfTokenizer {
            inner,
            bos,
            stop,
            turn_end,
            vocab,
        })
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Input(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    fn bos(&self) -> Option<u32> {
        self.bos
    }

    fn eos(&self) -> u32 {
        self.stop[0]
    }

    fn stop_ids(&self) -> Vec<u32> {
        self.stop.clone()
    }

    fn end_of_turn_ids(&self) -> Vec<u32> {
        self.turn_end.clone()
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// The directory a model's companion files (`config.json`, `tokenizer.json`) sit in: the model
/// itself when it is a directory, else the directory of its file.
pub fn model_dir(source: &std::path::Path) -> std::path::PathBuf {
    if source.is_dir() {
        source.to_path_buf()
    } else {
        source.parent().map(|p| p.to_path_buf()).unwrap_or_default()
    }
}

/// The `tokenizer.json` beside a model, if there is one.
pub fn file_for_model(source: &std::path::Path) -> Option<std::path::PathBuf> {
    Some(model_dir(source).join("tokenizer.json")).filter(|tj| tj.is_file())
}

/// The tokenizer of a model: the one inside a GGUF file, else the `tokenizer.json` beside the
/// model, else the byte tokenizer when the vocabulary is the byte tokenizer's.
pub fn for_model(
    source: Option<&std::path::Path>,
    config: &crate::engine::config::ModelConfig,
) -> Result<Box<dyn Tokenizer>> {
    read_for_model(source)?.finish(config)
}

/// A model's tokenizer read before its config is known (parsing a 128k-token
/// `tokenizer.json` takes about as long as loading a 2B model, so the two can run side by
/// side); [`PendingTokenizer::finish`] applies and checks the config. Errors are
/// [`for_model`]'s.
pub fn read_for_model(source: Option<&std::path::Path>) -> Result<PendingTokenizer> {
    let Some(src) = source else {
        return Ok(PendingTokenizer {
            found: None,
            dir: None,
        });
    };
    let inside = match crate::engine::checkpoint::gguf::Gguf::sniff(src) {
        true => {
            let g = crate::engine::checkpoint::gguf::Gguf::open(src)?;
            gguf::tokenizer(&g)?.map(|t| (Parsed::new(t), src.to_path_buf()))
        }
        false => None,
    };
    let found = match inside {
        Some(t) => Some(t),
        None => file_for_model(src)
            .map(|tj| Ok::<_, Error>((Parsed::new(read_tokenizer_json(&tj)?), tj)))
            .transpose()?,
    };
    Ok(PendingTokenizer {
        found,
        dir: Some(model_dir(src)),
    })
}

/// See [`read_for_model`].
pub struct PendingTokenizer {
    /// The tokenizer and the file it came from.
    found: Option<(Parsed, std::path::PathBuf)>,
    /// The model's directory, when the model is not the embedded one.
    dir: Option<std::path::PathBuf>,
}

impl PendingTokenizer {
    /// The tokenizer with the model's BOS and EOS, its vocabulary checked against the model's.
    pub fn finish(self, config: &crate::engine::config::ModelConfig) -> Result<Box<dyn Tokenizer>> {
        let Some(dir) = self.dir else {
            return Ok(Box::new(ByteTokenizer));
        };
        let (bos, eos) = (config.bos_token_id, config.eos_token_id);
        if let Some((inner, from)) = self.found {
            let t = HfTokenizer::new(inner, &from, bos, eos)?;
            if t.vocab_size() > config.vocab_size {
                return Err(Error::config(
                    &from,
                    "vocab",
                    format!(
                        "tokenizer has {} tokens but the model's vocab_size is {}",
                        t.vocab_size(),
                        config.vocab_size
                    ),
                ));
            }
            return Ok(Box::new(t));
        }
        if config.vocab_size != BYTE_VOCAB {
            return Err(Error::Input(format!(
                "no tokenizer in the model and no tokenizer.json in {}, and the model's \
                 vocabulary ({}) is not the byte tokenizer's ({BYTE_VOCAB}); put the model's \
                 tokenizer.json beside it",
                dir.display(),
                config.vocab_size
            )));
        }
        Ok(Box::new(ByteTokenizer))
    }
}

#[cfg(test)]
mod hf_tests {
    use super::*;

    #[test]
    fn hf_tokenizer_json_roundtrip() {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null,
          "pre_tokenizer": {"type": "WhitespaceSplit"},
          "post_processor": null, "decoder": null,
          "model": {"type": "WordLevel", "unk_token": "[UNK]",
                    "vocab": {"[UNK]": 0, "12+34=": 1, "46": 2, "\n": 3}}
        }"#;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("tokenizer.json");
        std::fs::write(&p, json).unwrap();
        let t = HfTokenizer::from_file(&p, None, None).unwrap();
        assert_eq!(t.encode("12+34= 46").unwrap(), vec![1, 2]);
        assert_eq!(t.encode("what").unwrap(), vec![0]);
        assert_eq!(t.stop_ids(), vec![3]);
        assert_eq!(t.vocab_size(), 4);
        std::fs::write(&p, "{ not json").unwrap();
        let e = HfTokenizer::from_file(&p, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }

    /// The newline tokens found by decoding only the candidates are those found by decoding
    /// every token: byte-level BPE, byte fallback, and a decoder that replaces text.
    #[test]
    fn newline_tokens_match_a_decode_of_every_token() {
        let tokenizer = |model: &str, decoder: &str| {
            let json = format!(
                r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": null, "post_processor": null,
                "decoder": {decoder}, "model": {model}}}"#
            );
            tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap()
        };
        let vocab = r#"{"a": 0, "Ċ": 1, "aĊ": 2, "<0x0A>": 3, "<n>": 4, "▁b": 5, "ĊĊ": 6}"#;
        let bpe =
            format!(r#"{{"type": "BPE", "vocab": {vocab}, "merges": [], "byte_fallback": true}}"#);
        let cases = [
            (
                r#"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}"#,
                vec![1, 2, 6],
            ),
            (
                r#"{"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}"#,
                vec![3],
            ),
            (
                r#"{"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "<n>"}, "content": "\n"}, {"type": "ByteFallback"}]}"#,
                vec![3, 4],
            ),
        ];
        for (decoder, expected) in cases {
            let inner = tokenizer(&bpe, decoder);
            let mut all: Vec<u32> = (inner.get_vocab(true).into_values())
                .filter(|&id| inner.decode(&[id], false).unwrap().contains('\n'))
                .collect();
            all.sort_unstable();
            assert_eq!(all, expected, "{decoder}");
            assert_eq!(Parsed::new(inner).newline, expected, "{decoder}");
        }
    }
}
