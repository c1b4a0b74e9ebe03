//! Tokenizers: the built-in byte tokenizer of the default model (one id per ASCII byte) and,
//! for real models, Hugging Face `tokenizer.json` files.

use crate::error::{Error, Result};

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
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;
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
