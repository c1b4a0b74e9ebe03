//! The tokenizer inside a GGUF file's metadata (`tokenizer.ggml.*`, as llama.cpp's converter
//! writes it), rebuilt as a Hugging Face tokenizer for the `tokenizers` crate:
//!
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, split first by the pre-tokenizer that
//!   `tokenizer.ggml.pre` names (`llama-bpe`: Llama 3's split, whole words in the vocabulary
//!   taken as they are, as llama.cpp does; `default` / `gpt-2`: GPT-2's);
//! - `llama`: SentencePiece BPE with byte fallback from `tokens` and `scores`, the merges
//!   derived from the scores the way Hugging Face converts a SentencePiece model (every split
//!   of a piece into two pieces, ranked by the piece's score), a `▁` prepended unless
//!   `tokenizer.ggml.add_space_prefix` is false.
//!
//! Control and user-defined tokens (`token_type` 3 and 4) are added tokens, matched whole in
//! the text; control ones are special (dropped when decoding). tests/fixtures/gguf-tokenizer
//! holds one of each kind made by llama.cpp's converter logic and the ids the `tokenizers` and
//! `sentencepiece` packages give (scripts/reference/make_gguf_tokenizer_fixture.py).

use crate::engine::checkpoint::gguf::{Gguf, MetaValue};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Llama 3's pre-tokenizer split (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer stored in `g`, or `None` when the file has none (`tokenizer.ggml.model`
/// absent). Errors name the metadata key that is wrong.
pub fn tokenizer(g: &Gguf) -> Result<Option<tokenizers::Tokenizer>> {
    from_metadata(&g.path, &g.metadata)
}

/// The tokenizer in the metadata `meta` of the GGUF file `path`.
fn from_metadata(
    path: &Path,
    meta: &[(String, MetaValue)],
) -> Result<Option<tokenizers::Tokenizer>> {
    let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let Some(model) = get("tokenizer.ggml.model") else {
        return Ok(None);
    };
    let bad = |key: &str, msg: String| Error::config(path, key, msg);
    let strings = |key: &str| strings(path, key, get(key));
    let model = model
        .as_str()
        .ok_or_else(|| bad("tokenizer.ggml.model", "not a string".into()))?;
    let tokens = strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| bad("tokenizer.ggml.tokens", "missing".into()))?;
    let n = tokens.len();
    let types = match get("tokenizer.ggml.token_type") {
        None => vec![1; n],
        Some(v) => numbers(v, n)
            .ok_or_else(|| bad("tokenizer.ggml.token_type", format!("not {n} integers")))?
            .into_iter()
            .map(|t| t as i64)
            .collect(),
    };
    let mut vocab = serde_json::Map::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        // A repeated token keeps its first id, as llama.cpp's text-to-id map does.
        vocab.entry(t.clone()).or_insert(json!(id));
    }
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == CONTROL || ty == USER_DEFINED)
        .map(|(id, (t, &ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": ty == CONTROL})
        })
        .collect();
    let unk = get("tokenizer.ggml.unknown_token_id")
        .and_then(MetaValue::as_u64)
        .and_then(|i| tokens.get(i as usize).cloned());
    let spec = match model {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?
                .ok_or_else(|| bad("tokenizer.ggml.merges", "missing for a gpt2 model".into()))?;
            let merges = merges
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| {
                            bad(
                                "tokenizer.ggml.merges",
                                format!("entry {i} {m:?} is not two tokens"),
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let pre = get("tokenizer.ggml.pre")
                .and_then(MetaValue::as_str)
                .unwrap_or("default");
            let (pre_tokenizer, ignore_merges) = match pre {
                "llama-bpe" | "llama3" | "llama-v3" => (
                    json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT},
                         "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                         "use_regex": false}]}),
                    true,
                ),
                "default" | "gpt-2" | "gpt2" => (
                    json!({"type": "ByteLevel", "add_prefix_space": false,
                           "trim_offsets": true, "use_regex": true}),
                    false,
                ),
                other => {
                    return Err(bad(
                        "tokenizer.ggml.pre",
                        format!(
                            "pre-tokenizer `{other}` is not one bitsvf rebuilds (llama-bpe, \
                             default, gpt-2); put the model's tokenizer.json beside the file"
                        ),
                    ))
                }
            };
            json!({
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                            "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
            })
        }
        "llama" => {
            let scores = get("tokenizer.ggml.scores")
                .and_then(|v| numbers(v, n))
                .ok_or_else(|| bad("tokenizer.ggml.scores", format!("not {n} numbers")))?;
            let space_prefix = match get("tokenizer.ggml.add_space_prefix") {
                Some(MetaValue::Bool(b)) => *b,
                _ => true,
            };
            let mut normalizers = vec![];
            if space_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            normalizers
                .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            json!({
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": spm_merges(&tokens, &scores)},
            })
        }
        other => {
            return Err(bad(
                "tokenizer.ggml.model",
                format!(
                    "`{other}`; bitsvf rebuilds gpt2 (byte-level BPE) and llama (SentencePiece) \
                     tokenizers; put the model's tokenizer.json beside the file"
                ),
            ))
        }
    };
    let mut spec = spec;
    spec["version"] = json!("1.0");
    spec["truncation"] = Value::Null;
    spec["padding"] = Value::Null;
    spec["post_processor"] = Value::Null;
    spec["added_tokens"] = Value::Array(added);
    let text = spec.to_string();
    let t = text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        bad(
            "tokenizer.ggml.model",
            format!("the tokenizer does not build: {e}"),
        )
    })?;
    Ok(Some(t))
}

/// The `tokenizer.*` metadata llama.cpp needs for the Hugging Face `tokenizer.json` at `path`
/// (a byte-level BPE: `gpt2` with the tokens, their types, the merges and the pre-tokenizer
/// it uses, `llama-bpe` or `gpt-2`), padded with unused `[PADi]` tokens to `vocab_size`
/// as llama.cpp's converter pads them. Another kind of tokenizer is an error saying why.
pub fn metadata_for(path: &Path, vocab_size: usize) -> Result<Vec<(String, MetaValue)>> {
    let bad = |field: &str, msg: String| Error::config(path, field, msg);
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let tj: Value =
        serde_json::from_str(&text).map_err(|e| bad("(file)", format!("not JSON: {e}")))?;
    let model = &tj["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(bad(
            "model.type",
            "not a byte-level BPE; bitsvf writes gpt2-style GGUF tokenizers only".into(),
        ));
    }
    let pre = &tj["pre_tokenizer"];
    let byte_level = |p: &Value, regex: bool| p["type"] == "ByteLevel" && p["use_regex"] == regex;
    let pre_name = if byte_level(pre, true) {
        "gpt-2"
    } else if pre["type"] == "Sequence"
        && pre["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_SPLIT
        && byte_level(&pre["pretokenizers"][1], false)
    {
        "llama-bpe"
    } else {
        return Err(bad(
            "pre_tokenizer",
            "neither GPT-2's byte-level split nor Llama 3's; llama.cpp would split text \
             differently"
                .into(),
        ));
    };
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![None; vocab_size];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab", "not an object".into()))?;
    let mut place = |t: &str, id: &Value, ty: i64| -> Result<()> {
        let id = id
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < vocab_size)
            .ok_or_else(|| {
                bad(
                    "model.vocab",
                    format!("token {t:?} has id {id}, outside the model's {vocab_size}"),
                )
            })?;
        tokens[id] = t.to_string();
        types[id] = Some(ty);
        Ok(())
    };
    for (t, id) in vocab {
        place(t, id, 1)?;
    }
    for at in tj["added_tokens"].as_array().into_iter().flatten() {
        let content = at["content"].as_str().unwrap_or_default();
        let ty = if at["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(content, &at["id"], ty)?;
    }
    const UNUSED: i64 = 5;
    for (i, (t, ty)) in tokens.iter_mut().zip(&mut types).enumerate() {
        if ty.is_none() {
            *t = format!("[PAD{i}]");
            *ty = Some(UNUSED);
        }
    }
    let merges: Vec<MetaValue> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => MetaValue::Str(s.clone()),
            Value::Array(pair) => MetaValue::Str(
                pair.iter()
                    .map(|p| p.as_str().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            other => MetaValue::Str(other.to_string()),
        })
        .collect();
    let strs = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::Str).collect());
    Ok(vec![
        ("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), MetaValue::Str(pre_name.into())),
        ("tokenizer.ggml.tokens".into(), strs(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(
                types
                    .into_iter()
                    .map(|t| MetaValue::I32(t.unwrap_or(1) as i32))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), MetaValue::Array(merges)),
    ])
}

/// A string array, or `None` when the key is absent.
fn strings(path: &Path, key: &str, v: Option<&MetaValue>) -> Result<Option<Vec<String>>> {
    let Some(v) = v else {
        return Ok(None);
    };
    let items = v
        .as_array()
        .ok_or_else(|| Error::config(path, key, "not an array"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::config(path, key, format!("entry {i} is not a string")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An array of exactly `n` numbers.
fn numbers(v: &MetaValue, n: usize) -> Option<Vec<f64>> {
    let items = v.as_array()?;
    (items.len() == n)
        .then(|| items.iter().map(MetaValue::as_f64).collect())
        .flatten()
}

/// The BPE merges of a SentencePiece vocabulary: every split of a piece into two pieces of the
/// vocabulary, ordered by the piece's score (highest first; a piece's own splits by the ids of
/// their halves), as Hugging Face's SentencePiece converter derives them.
fn spm_merges(tokens: &[String], scores: &[f64]) -> Vec<Value> {
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*id.get(&piece[..at])?, *id.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    // Stable: equal scores keep vocabulary order.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf-tokenizer")
            .join(name)
    }

    /// Both kinds give the reference libraries' ids for every text, and decode them back.
    #[test]
    fn gguf_tokenizers_match_their_reference_libraries() {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap())
                .unwrap();
        for kind in ["gpt2", "llama"] {
            let g = Gguf::open(&fixture(&format!("{kind}.gguf"))).unwrap();
            let t = tokenizer(&g).unwrap().unwrap();
            let cases = expected[kind].as_array().unwrap();
            assert!(cases.len() >= 10);
            for case in cases {
                let text = case["text"].as_str().unwrap();
                let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
                let got = t.encode(text, false).unwrap().get_ids().to_vec();
                assert_eq!(got, want, "{kind}: {text:?}");
                if !text.contains("<|") {
                    assert_eq!(t.decode(&got, true).unwrap(), text, "{kind} decode");
                }
            }
        }
    }

    /// What bitsvf writes for a tokenizer.json is what llama.cpp's converter (through the
    /// `gguf` package) wrote for the same file, key for key.
    #[test]
    fn metadata_for_a_tokenizer_json_is_what_the_converter_writes() {
        let g = Gguf::open(&fixture("gpt2.gguf")).unwrap();
        let n = g
            .get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len();
        let ours = metadata_for(&fixture("gpt2.tokenizer.json"), n).unwrap();
        assert_eq!(ours.len(), 5);
        for (k, v) in &ours {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        // Padded to the model's vocabulary with unused tokens.
        let padded = metadata_for(&fixture("gpt2.tokenizer.json"), n + 2).unwrap();
        let tokens = padded[2].1.as_array().unwrap();
        assert_eq!(
            tokens[n + 1].as_str(),
            Some(format!("[PAD{}]", n + 1).as_str())
        );
        let e = metadata_for(&fixture("gpt2.tokenizer.json"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the model's 10"), "{e}");
        let e = metadata_for(&fixture("expected.json"), n)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.type"), "{e}");
    }

    #[test]
    fn bad_tokenizer_metadata_names_the_key() {
        let g = Gguf::open(&fixture("gpt2.gguf")).unwrap();
        let with = |key: &str, value: Option<MetaValue>| {
            let mut meta = g.metadata.clone();
            meta.retain(|(k, _)| k != key);
            meta.extend(value.map(|v| (key.to_string(), v)));
            from_metadata(&g.path, &meta)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = with("tokenizer.ggml.model", Some(MetaValue::Str("rwkv".into())));
        assert!(
            e.contains("tokenizer.ggml.model") && e.contains("rwkv"),
            "{e}"
        );
        let e = with("tokenizer.ggml.pre", Some(MetaValue::Str("qwen2".into())));
        assert!(
            e.contains("tokenizer.ggml.pre") && e.contains("qwen2"),
            "{e}"
        );
        let e = with("tokenizer.ggml.merges", None);
        assert!(e.contains("tokenizer.ggml.merges"), "{e}");
        let e = with("tokenizer.ggml.token_type", Some(MetaValue::Array(vec![])));
        assert!(e.contains("tokenizer.ggml.token_type"), "{e}");
        let e = with(
            "tokenizer.ggml.merges",
            Some(MetaValue::Array(vec![MetaValue::Str("nospace".into())])),
        );
        assert!(e.contains("entry 0"), "{e}");
        assert!(with("tokenizer.ggml.model", None).is_empty());
    }
}
