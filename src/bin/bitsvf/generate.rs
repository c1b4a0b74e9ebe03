//! `bitsvf generate`: text from a model, streamed to stdout as it is produced — from the base
//! model alone, or with two-pass adaptation over the experts of a handoff directory.

use crate::common::svd_cache;
use anyhow::{Context, Result};
use bitsvf::adapt::dispatch::{Library, Strategy};
use bitsvf::adapt::two_pass::{checked_cem, pass1, pass2};
use bitsvf::engine::chat::{self, Message, TemplateChoice};
use bitsvf::engine::model::{GenerateOptions, HeadFormat, Model, ModelOptions};
use bitsvf::engine::{checkpoint, tokenizer};
use bitsvf::eval::prompt_ids;
use bitsvf::pipeline::Handoff;
use bitsvf::tasks::Dataset;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The model (default: the handoff's `model/` with --experts, else the embedded model);
    /// with --experts it must be the model the experts were trained on.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Handoff directory of `bitsvf run`: adapt to the prompt with its experts (two passes).
    #[arg(long)]
    experts: Option<PathBuf>,
    /// The prompt (with --chat: the user's message).
    #[arg(long)]
    prompt: String,
    /// Chat: render the prompt (and --system) with the model's chat template, stop at the end
    /// of the assistant's turn. The base model alone.
    #[arg(long)]
    chat: bool,
    /// With --chat, a system message before the prompt.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// With --chat, the template: auto (the model's own: a GGUF file's
    /// tokenizer.chat_template, else chat_template.jinja or tokenizer_config.json's
    /// chat_template beside the model), or a Jinja FILE.
    #[arg(long, default_value = "auto", requires = "chat")]
    chat_template: TemplateChoice,
    /// With --experts, how pass 1 chooses: prompt (the model labels its own prompt),
    /// classifier (the classifier expert labels it), cem (α fitted on --shots), none (base).
    #[arg(long, default_value = "classifier")]
    dispatch: String,
    /// Labelled examples for --dispatch cem: JSONL lines {"prompt", "answer"}.
    #[arg(long)]
    shots: Option<PathBuf>,
    /// Most new tokens.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How the output head is held: as stored, or quantized to q8_0 on load (about half the
    /// bytes read per token of a bf16 head; `bitsvf inspect MODEL --head q8_0` measures the
    /// change in the next-token distribution). The base model alone only.
    #[arg(long, value_enum, default_value = "stored")]
    head: HeadFormat,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let Some(experts) = a.experts.clone() else {
        return plain(a);
    };
    anyhow::ensure!(
        a.head == HeadFormat::Stored,
        "--head {} is for the base model alone; with --experts the head stays as stored",
        a.head.name()
    );
    anyhow::ensure!(
        !a.chat,
        "--chat is for the base model alone; with --experts the prompt is a task prompt"
    );
    let mut strategy: Strategy = a.dispatch.parse()?;
    let h = Handoff::open(&experts)?;
    if let Some(m) = &a.model {
        checkpoint::load(m)?.check_is_base_of(m, &h.ck, &experts)?;
    }
    let model_dir = a.model.unwrap_or_else(|| experts.join("model"));
    let tok = tokenizer::for_model(Some(&model_dir), &h.ck.config)?;
    let cache = svd_cache(a.cache_dir);
    let classifier = h.classifier()?;
    let mut lib = Library::new(&h.ck, h.experts()?, classifier.as_ref(), &cache)?;
    lib.thresholds = h.manifest.metrics.thresholds;
    let alpha = match (strategy, &a.shots) {
        (Strategy::Cem, Some(path)) => {
            let shots = Dataset::load_jsonl(path, "exact".parse()?)?.items;
            let cem = &h.manifest.options.cem;
            let (alpha, verdict) =
                checked_cem(&mut lib.mixer, &lib.base, tok.as_ref(), shots, cem)?;
            eprintln!("{verdict}");
            if alpha.is_none() {
                strategy = Strategy::None;
            }
            alpha
        }
        (Strategy::Cem, None) => {
            anyhow::bail!("--dispatch cem needs --shots FILE.jsonl (labelled examples)")
        }
        _ => None,
    };
    let (model, chosen) = pass1(
        &mut lib,
        tok.as_ref(),
        strategy,
        &a.prompt,
        alpha.as_deref(),
    )?;
    eprintln!("{chosen}");
    let answer = pass2(
        model,
        tok.as_ref(),
        &a.prompt,
        a.max_tokens,
        a.temperature,
        a.seed,
    )?;
    println!("{answer}");
    Ok(())
}

/// The model alone: the prompt (after the tokenizer's BOS), then each new token's text as soon
/// as it is complete; prefill and decode speed on stderr.
fn plain(a: Args) -> Result<()> {
    let start = Instant::now();
    // The tokenizer is read while the model loads: parsing a 128k-token tokenizer.json takes
    // about as long as loading a 2B model.
    let (ck, tok) = std::thread::scope(|s| {
        let tok = s.spawn(|| tokenizer::read_for_model(a.model.as_deref()));
        let ck = crate::common::load_model(a.model.as_deref(), a.ternarize);
        let tok = tok
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (ck, tok)
    });
    let ck = ck?;
    let tok = tok?.finish(&ck.config)?;
    tracing::info!("model loaded after {:.2} s", start.elapsed().as_secs_f64());
    // The head's huge-page copy is made once the first token is out (see below).
    let options = ModelOptions {
        head: a.head,
        defer_head_copy: true,
        ..Default::default()
    };
    let model = Model::new(&ck, options)?;
    tracing::info!("model built after {:.2} s", start.elapsed().as_secs_f64());
    let (prompt, stop) = match a.chat {
        false => (prompt_ids(tok.as_ref(), &a.prompt)?, tok.stop_ids()),
        true => {
            let template = chat::choose(&a.chat_template, a.model.as_deref(), tok.as_ref())?
                .with_context(|| match &a.model {
                    None => "the embedded model has no chat template; give --chat-template FILE"
                        .to_string(),
                    Some(m) => format!(
                        "{} carries no chat template (none in the GGUF metadata, no \
                         chat_template.jinja or tokenizer_config.json chat_template beside it); \
                         give --chat-template FILE",
                        m.display()
                    ),
                })?;
            let messages: Vec<Message> = (a.system.iter())
                .map(|s| Message::new("system", s))
                .chain([Message::new("user", &a.prompt)])
                .collect();
            // The template places BOS and every special token itself, as transformers'
            // apply_chat_template does.
            let text = template.render(&messages, true)?;
            (tok.encode(&text)?, tok.end_of_turn_ids())
        }
    };
    let room = ck.config.max_position_embeddings;
    anyhow::ensure!(
        prompt.len() < room,
        "the prompt is {} tokens; the model's context holds {room}",
        prompt.len()
    );
    let options = GenerateOptions {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        stop,
        ..Default::default()
    };
    let (mut ids, mut shown, mut first) = (Vec::new(), 0, None);
    let mut out = std::io::stdout().lock();
    let stats = model.generate_streaming(&prompt, &options, |id| {
        first.get_or_insert_with(|| {
            // Decoding reads the whole head per token, faster from huge pages: copy it while
            // the next tokens are decoded (a detached thread; the process may end first).
            if options.max_new_tokens > 1 {
                let _ = model.copy_head_in_background();
            }
            start.elapsed()
        });
        if options.stop.contains(&id) {
            return true;
        }
        ids.push(id);
        // Decode everything so far and print what is new: a character split over several
        // tokens appears once it is whole.
        let text = tok.decode(&ids);
        if let (Some(new), false) = (text.get(shown..), text.ends_with('\u{FFFD}')) {
            let _ = out.write_all(new.as_bytes());
            let _ = out.flush();
            shown = text.len();
        }
        true
    })?;
    writeln!(out)?;
    let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
    let first = first.map_or("no token generated".into(), |t| {
        format!("first token after {:.2} s", t.as_secs_f64())
    });
    eprintln!(
        "prefill {} tokens at {} tok/s; decode {} tokens at {} tok/s; {first}",
        stats.prompt_tokens,
        rate(stats.prefill_rate()),
        stats.new_tokens.saturating_sub(1),
        rate(stats.decode_rate()),
    );
    Ok(())
}
