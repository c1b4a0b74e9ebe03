//! Chat templates: the Jinja template a model ships (`chat_template` in Hugging Face's
//! `tokenizer_config.json`, a `chat_template.jinja` file, or `tokenizer.chat_template` in a GGUF
//! file) rendered with `minijinja` the way Hugging Face transformers renders it: blocks trimmed
//! and left-stripped, loop controls, `raise_exception(msg)`, Python's string methods
//! (`.strip()`, `.startswith()`, …), and `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` as variables. tests/fixtures/chat-templates holds templates of the usual styles
//! and what Jinja2 renders for them in that environment
//! (scripts/reference/render_chat_templates.py).

use crate::engine::checkpoint::gguf::Gguf;
use crate::engine::tokenizer::{model_dir, Tokenizer};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, … as the template expects.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Which template to use: the model's own (`auto`), none (`none`), or a file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TemplateChoice {
    /// The model's template; an error where `--chat` needs one and the model has none.
    #[default]
    Auto,
    /// No template: prompts are used as they are.
    None,
    /// A Jinja file.
    File(PathBuf),
}

impl std::str::FromStr for TemplateChoice {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "auto" => TemplateChoice::Auto,
            "none" => TemplateChoice::None,
            file => TemplateChoice::File(file.into()),
        })
    }
}

/// A compiled-checked chat template with the model's special tokens.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// Where it came from (a file, or a file and a key), for messages.
    pub origin: String,
    bos_token: String,
    eos_token: String,
}

/// The environment templates render in (Hugging Face's settings).
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env
}

impl ChatTemplate {
    /// `source` from `origin`, with the model's BOS and EOS texts; a template that does not
    /// parse is an error naming `origin` and the line.
    pub fn new(
        source: String,
        origin: impl Into<String>,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate> {
        let origin = origin.into();
        environment()
            .template_from_str(&source)
            .map_err(|e| Error::Input(format!("chat template of {origin}: {e:#}")))?;
        Ok(ChatTemplate {
            source,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// The conversation as the model's prompt text; with `add_generation_prompt` it ends where
    /// the assistant's answer begins. A template's own `raise_exception` is an error.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let t = env
            .template_from_str(&self.source)
            .map_err(|e| Error::Input(format!("chat template of {}: {e:#}", self.origin)))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| {
            let why = match e.kind() {
                minijinja::ErrorKind::InvalidOperation => {
                    e.detail().unwrap_or_default().to_string()
                }
                _ => format!("{e:#}"),
            };
            Error::Input(format!(
                "the chat template of {} refused the conversation: {why}",
                self.origin
            ))
        })
    }
}

impl ChatTemplate {
    /// A task prompt as one user turn ready for the answer, without the template's leading BOS
    /// text (the prompt's token ids start with the BOS id, as every prompt's do).
    pub fn wrap(&self, prompt: &str) -> Result<String> {
        let text = self.render(&[Message::new("user", prompt)], true)?;
        Ok(match self.bos_token.is_empty() {
            true => text,
            false => text
                .strip_prefix(&self.bos_token)
                .map(str::to_string)
                .unwrap_or(text),
        })
    }
}

/// The chat template `choice` names for the model at `source` (`None`: the embedded model),
/// with the BOS/EOS texts of `tok`: `auto` looks in the GGUF file's metadata, then for
/// `chat_template.jinja` and `tokenizer_config.json`'s `chat_template` beside the model.
pub fn choose(
    choice: &TemplateChoice,
    source: Option<&Path>,
    tok: &dyn Tokenizer,
) -> Result<Option<ChatTemplate>> {
    let special = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
    let (bos, eos) = (special(tok.bos()), special(Some(tok.eos())));
    match choice {
        TemplateChoice::None => Ok(None),
        TemplateChoice::File(path) => {
            let source = read_text(path)?;
            ChatTemplate::new(source, path.display().to_string(), bos, eos).map(Some)
        }
        TemplateChoice::Auto => {
            let Some(src) = source else {
                return Ok(None);
            };
            let found = model_template(src)?;
            found
                .map(|(text, origin)| ChatTemplate::new(text, origin, bos, eos))
                .transpose()
        }
    }
}

/// Most bytes of a template or tokenizer_config.json file (real ones are tens of KB).
const MAX_TEXT_BYTES: u64 = 16 << 20;

/// A regular UTF-8 file of at most [`MAX_TEXT_BYTES`], read whole.
fn read_text(path: &Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_TEXT_BYTES {
        return Err(Error::Input(format!(
            "{} is not a regular file of at most {MAX_TEXT_BYTES} bytes",
            path.display()
        )));
    }
    let mut text = String::new();
    f.take(MAX_TEXT_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    Ok(text)
}

/// The template text a model carries and where it was found.
pub(crate) fn model_template(src: &Path) -> Result<Option<(String, String)>> {
    if Gguf::sniff(src) {
        let g = Gguf::open(src)?;
        if let Some(v) = g.get("tokenizer.chat_template") {
            let text = v
                .as_str()
                .ok_or_else(|| Error::config(src, "tokenizer.chat_template", "not a string"))?;
            let origin = format!("{} (tokenizer.chat_template)", src.display());
            return Ok(Some((text.to_string(), origin)));
        }
    }
    let dir = model_dir(src);
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = read_text(&jinja)?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    let config = dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = read_text(&config)?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&config, "(file)", format!("not JSON: {e}")))?;
    let origin = format!("{} (chat_template)", config.display());
    match &json["chat_template"] {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some((s.clone(), origin))),
        // A list of named templates: the one named `default`.
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(|s| Some((s.to_string(), format!("{origin}, `default`"))))
            .ok_or_else(|| {
                Error::config(
                    &config,
                    "chat_template",
                    "a list without a `default` template",
                )
            }),
        _ => Err(Error::config(
            &config,
            "chat_template",
            "neither a string nor a list of named templates",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Every case renders as Jinja2 renders it in transformers' environment, errors included.
    #[test]
    fn templates_render_as_transformers_renders_them() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-templates");
        let f: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let cases = f["cases"].as_array().unwrap();
        assert!(cases.len() >= 30);
        for case in cases {
            let name = case["template"].as_str().unwrap();
            let t = ChatTemplate::new(
                f["templates"][name].as_str().unwrap().to_string(),
                name,
                f["bos_token"].as_str().unwrap().into(),
                f["eos_token"].as_str().unwrap().into(),
            )
            .unwrap();
            let conversation = case["conversation"].as_str().unwrap();
            let messages: Vec<Message> =
                serde_json::from_value(f["conversations"][conversation].clone()).unwrap();
            let got = t.render(&messages, case["add_generation_prompt"].as_bool().unwrap());
            let what = format!("{name} on {conversation}");
            match (&case["expected"], &case["error"]) {
                (Value::String(want), _) => assert_eq!(&got.unwrap(), want, "{what}"),
                (_, Value::String(want)) => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(want.as_str()) && e.contains(name), "{what}: {e}");
                }
                _ => panic!("case without expected or error"),
            }
        }
    }

    #[test]
    fn a_template_that_does_not_parse_names_its_origin() {
        let e = ChatTemplate::new(
            "{% for m in messages %}".into(),
            "x/tokenizer_config.json",
            String::new(),
            String::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x/tokenizer_config.json"), "{e}");
        // A device or a directory as the template file: refused, not read without end.
        for bad in ["/dev/zero", "/"] {
            let choice = TemplateChoice::File(bad.into());
            let tok = crate::engine::tokenizer::ByteTokenizer;
            let e = choose(&choice, None, &tok).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
    }

    /// A GGUF file's `tokenizer.chat_template` (written by the `gguf` package).
    #[test]
    fn the_template_inside_a_gguf_file_is_found() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-tokenizer/gpt2.gguf");
        let (text, origin) = model_template(&path).unwrap().unwrap();
        assert!(origin.contains("tokenizer.chat_template"), "{origin}");
        let t = ChatTemplate::new(text, origin, "<s>".into(), "</s>".into()).unwrap();
        let got = t.render(&[Message::new("user", " hi ")], true).unwrap();
        assert_eq!(got, "<s>User: hi<|eot_id|>Assistant: ");
    }
}
