//! `tnc generate RUN_DIR|CHECKPOINT --prompt TEXT`: text from a trained language model,
//! streamed to stdout as it is generated, with tokens/s on stderr at the end.
//!
//! The model is compiled as a decode-step bundle (`tnc compile --decode-step`,
//! `passes/decode_step.rs`, cached like training bundles) for this CPU, its parameters
//! come from the run's checkpoint, and prompts and output are spelled as the run's data
//! spells them (bytes, a tokenizer's subwords, or token ids for the synthetic tasks). The
//! prompt runs through the step one token at a time, carrying every layer's state; each
//! new token then costs one step, the same at any position for linear attention and
//! DiagAttention.

use crate::eval::find_checkpoint;
use crate::train::RunInfo;
use crate::{fail, Failure, ModelArgs};
use std::io::Write;
use std::path::{Path, PathBuf};
use tnc_grammar::Diagnostic;
use tnc_train::sampling::Sampling;
use tnc_train::text_codec::TextCodec;
use tnc_train::trainer::restore;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A run directory of `tnc train` (its latest valid checkpoint) or a checkpoint file
    /// in one.
    pub run: PathBuf,
    /// The text to continue; for a model trained on a task (`copy`, `mqar`), token ids
    /// separated by spaces, as `5 9 1`.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding (the most likely token, deterministic).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probability reaches P (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the draws: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The rows of a softmax attention's KV cache: such a model stops after this many
    /// tokens (default: the run's training length, `--seq`). Linear attention and
    /// DiagAttention keep no context-sized state and ignore it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub context: Option<u64>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: &GenerateArgs) -> Result<(), Failure> {
    let usage = |e: String| Failure::usage(Diagnostic::error(e));
    let sampling = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed }
        .validated()
        .map_err(usage)?;
    let (ckpt_path, ckpt) = find_checkpoint(&args.run)?;
    let run_dir = match ckpt_path.parent().and_then(Path::parent) {
        Some(d) if args.run.is_file() => d.to_path_buf(),
        _ => args.run.clone(),
    };
    let info_path = run_dir.join("run.json");
    let info: RunInfo = std::fs::read(&info_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| {
            fail(format!("{}: {e} (generation needs the run directory of `tnc train`)", info_path.display()))
        })?;
    let codec = TextCodec::for_data(&info.data).map_err(fail)?;
    let prompt = codec.encode(&args.prompt).map_err(usage)?;
    let model = ModelArgs { file: PathBuf::from(&info.model), sets: info.sets.clone(), model: None };
    if !model.file.exists() {
        return Err(fail(format!(
            "the run's model {} is not there (run.json names it relative to where `tnc train` ran)",
            model.file.display()
        )));
    }
    let choices = ("native", tnc_compiler::passes::Policy::F32, tnc_compiler::backend::CodeGen::default());
    let context = args.context.map_or(info.config.seq, |c| c as usize);
    let dir = crate::bundle_cache::decode_step_bundle(&model, choices, context as i64, &mut |s| eprintln!("{s}"))?;
    let bundle = tnc_runtime::Bundle::load(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let vocab = logits_width(&bundle.manifest).ok_or_else(|| fail("the decode-step bundle has no `logits` output"))?;
    if let Some(&t) = prompt.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        return Err(usage(format!("the prompt's token {t} is outside the model's vocabulary 0 … {}", vocab - 1)));
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut exec = crate::device::open(&bundle, crate::device::DeviceArg::Cpu, threads)?;
    restore(&mut exec, &ckpt, &[]).map_err(|e| fail(format!("{}: {e}", ckpt_path.display())))?;
    if bundle.manifest.scalars.iter().any(|s| s == "train") {
        exec.set_scalar("train", 0).map_err(|e| fail(e.to_string()))?;
    }
    if prompt.is_empty() {
        return Err(usage("the prompt is empty: generation starts after at least one token".into()));
    }
    let mut decoder = Decoder::new(&bundle.manifest).map_err(fail)?;
    // A KV cache (softmax attention over the whole sequence) holds `context` positions.
    let limit = decoder.has_kv_cache.then_some(context);
    if limit.is_some_and(|l| prompt.len() > l) {
        return Err(usage(format!(
            "the prompt has {} tokens but the model's KV cache holds {context} (raise --context)",
            prompt.len()
        )));
    }
    let end_of_text = codec.end_of_text();

    let mut tokens = prompt.clone();
    let mut shown = codec.printable(&tokens).map_err(fail)?;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| fail(format!("writing the text: {e}"));
    write!(out, "{shown}").and_then(|_| out.flush()).map_err(io)?;
    // Prefill: the prompt one token at a time through the step, which carries the states.
    let started = std::time::Instant::now();
    let mut logits = Vec::new();
    for (p, &t) in prompt.iter().enumerate() {
        logits = decoder.step(&mut exec, t, p).map_err(fail)?;
    }
    let prefill_secs = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let mut generated = 0;
    while generated < args.max_tokens {
        let next = sampling.choose(&logits, generated as u64).map_err(fail)?;
        generated += 1;
        if Some(next) == end_of_text {
            break;
        }
        tokens.push(next as i32);
        let text = codec.printable(&tokens).map_err(fail)?;
        if let Some(new) = text.strip_prefix(shown.as_str()) {
            write!(out, "{new}").and_then(|_| out.flush()).map_err(io)?;
            shown = text;
        }
        if generated == args.max_tokens {
            break;
        }
        if limit.is_some_and(|l| tokens.len() >= l) {
            writeln!(out).map_err(io)?;
            eprintln!("stopped at {context} tokens: the model's KV cache is full (raise --context)");
            break;
        }
        logits = decoder.step(&mut exec, next as i32, tokens.len() - 1).map_err(fail)?;
    }
    writeln!(out).map_err(io)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "prompt: {} tokens in {prefill_secs:.2} s; generated {generated} tokens in {secs:.2} s ({:.1} tokens/s, \
         recurrent decode step)",
        prompt.len(),
        generated as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Runs the decode step, carrying its states from one token to the next.
struct Decoder {
    /// (input name, value), zeros before the first token.
    states: Vec<(String, tnc_runtime::Tensor)>,
    has_kv_cache: bool,
}

impl Decoder {
    fn new(m: &tnc_runtime::Manifest) -> Result<Decoder, String> {
        use tnc_compiler::passes::decode_step::{KV_CACHE, STATE};
        let env = std::collections::HashMap::from([("B", 1i64)]);
        let mut states = Vec::new();
        for io in m.inputs.iter().filter(|io| io.name.starts_with(STATE) || io.name.starts_with(KV_CACHE)) {
            let shape = io
                .shape
                .iter()
                .map(|d| d.eval(&env).map(|v| v as usize).map_err(|e| format!("the state {}: {e}", io.name)))
                .collect::<Result<Vec<_>, _>>()?;
            let len = shape.iter().product();
            states.push((io.name.clone(), tnc_runtime::Tensor::f32(shape, vec![0.0; len])));
        }
        let has_kv_cache = states.iter().any(|(n, _)| n.starts_with(KV_CACHE));
        Ok(Decoder { states, has_kv_cache })
    }

    /// The logits after `token` at `position`.
    fn step(&mut self, exec: &mut tnc_runtime::Executor, token: i32, position: usize) -> Result<Vec<f32>, String> {
        use tnc_compiler::passes::decode_step::{NEXT, POSITION};
        let token = tnc_runtime::Tensor::i32(vec![1, 1], vec![token]);
        let position = tnc_runtime::Tensor::i32(vec![1], vec![position as i32]);
        let mut inputs: Vec<(&str, &tnc_runtime::Tensor)> = vec![("tokens", &token), (POSITION, &position)];
        inputs.extend(self.states.iter().map(|(n, t)| (n.as_str(), t)));
        exec.forward(&inputs).map_err(|e| e.to_string())?;
        for (name, t) in &mut self.states {
            *t = exec.output(&format!("{NEXT}{name}")).map_err(|e| e.to_string())?;
        }
        let logits = exec.output(tnc_compiler::passes::next_token::LOGITS).map_err(|e| e.to_string())?;
        logits.as_f32().map(<[f32]>::to_vec).ok_or_else(|| "the logits are not f32".to_string())
    }
}

/// V of the `logits [B, 1, V]` output.
fn logits_width(m: &tnc_runtime::Manifest) -> Option<usize> {
    let io = m.outputs.iter().find(|o| o.name == tnc_compiler::passes::next_token::LOGITS)?;
    usize::try_from(io.shape.last()?.as_const()?).ok()
}
