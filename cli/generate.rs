//! `tnc generate RUN_DIR|CHECKPOINT --prompt TEXT`: text from a trained language model,
//! streamed to stdout as it is generated, with tokens/s on stderr at the end.
//!
//! The model is compiled twice, as a prefill bundle (`tnc compile --prefill`,
//! `passes/prefill.rs`) and a decode-step bundle (`--decode-step`, `passes/decode_step.rs`),
//! cached like training bundles, for this CPU or a GPU; its parameters come from the run's
//! checkpoint, and prompts and output are spelled as the run's data spells them (bytes, a
//! tokenizer's subwords, or token ids for the synthetic tasks). The prompt runs through
//! the chunked forward at once, which returns every layer's state after it; each new token
//! then costs one step, the same at any position for linear attention and DiagAttention.

use crate::device::DeviceArg;
use crate::eval::find_checkpoint;
use crate::train::RunInfo;
use crate::{fail, Failure, ModelArgs};
use std::io::Write;
use std::path::{Path, PathBuf};
use tnc_compiler::passes::decode_step::{KV_CACHE, NEXT, POSITION, STATE};
use tnc_compiler::passes::next_token::LOGITS;
use tnc_compiler::pipeline::Program;
use tnc_grammar::Diagnostic;
use tnc_runtime::{Executor, Tensor};
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
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (empty lines skipped), generated together: prompts
    /// of the same length in tokens form one batch. When all are done each is printed
    /// after a line `# prompt I` (I counts the prompts), in the file's order; a prompt
    /// draws the same tokens as it would alone.
    #[arg(long, value_name = "PROMPTS")]
    pub batch: Option<PathBuf>,
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
    /// The target compiled for (default: this CPU, or `sm80` with a GPU `--device`).
    #[arg(long)]
    pub target: Option<String>,
    /// Where the bundles run: `cpu`, `cuda` (an NVIDIA GPU), or `emulated` (a GPU
    /// bundle's kernels on the CPU with GPU semantics; slow, for testing). Default: the
    /// target's.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
}

pub fn run(args: &GenerateArgs) -> Result<(), Failure> {
    let usage = |e: String| Failure::usage(Diagnostic::error(e));
    let sampling = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed }
        .validated()
        .map_err(usage)?;
    let target = args.target.clone().unwrap_or_else(|| args.device.unwrap_or_default().default_target().into());
    crate::compile::parse_target(&target)?;
    let device = args.device.unwrap_or_else(|| DeviceArg::for_target(&target));
    device.check(&target)?;
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
    let texts: Vec<String> = match (&args.prompt, &args.batch) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| fail(format!("{}: {e}", file.display())))?;
            let lines: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
            if lines.is_empty() {
                return Err(usage(format!("{}: no prompts (one per line)", file.display())));
            }
            lines
        }
        (None, None) => unreachable!("clap requires --prompt or --batch"),
    };
    let prompts = texts.iter().map(|t| codec.encode(t).map_err(usage)).collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        let which =
            if args.batch.is_some() { format!("prompt {} is empty", i + 1) } else { "the prompt is empty".into() };
        return Err(usage(format!("{which}: generation starts after at least one token")));
    }
    let model = ModelArgs { file: PathBuf::from(&info.model), sets: info.sets.clone(), model: None };
    if !model.file.exists() {
        return Err(fail(format!(
            "the run's model {} is not there (run.json names it relative to where `tnc train` ran)",
            model.file.display()
        )));
    }
    let context = args.context.map_or(info.config.seq, |c| c as usize);
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let open = |program: Program| -> Result<Executor, Failure> {
        let choices = (
            target.as_str(),
            tnc_compiler::passes::Policy::F32,
            tnc_compiler::backend::CodeGen::default(),
            tnc_compiler::backend::GpuGemm::Tiles,
        );
        let dir = crate::bundle_cache::generation_bundle(&model, choices, program, &mut |s| eprintln!("{s}"))?;
        let bundle = crate::device::load(&dir)?;
        let mut exec = crate::device::open(&bundle, device, threads)?;
        restore(&mut exec, &ckpt, &[]).map_err(|e| fail(format!("{}: {e}", ckpt_path.display())))?;
        if bundle.manifest.scalars.iter().any(|s| s == "train") {
            exec.set_scalar("train", 0).map_err(|e| fail(e.to_string()))?;
        }
        Ok(exec)
    };
    let context_i = context as i64;
    let step = open(Program::DecodeStep { context: context_i })?;
    let prefill = match open(Program::Prefill { context: context_i }) {
        Ok(p) => Some(p),
        Err(f) => {
            eprintln!(
                "no prefill ({}): the prompt goes through the decode step one token at a time",
                f.diagnostic.message
            );
            None
        }
    };
    let mut decoder = Decoder::new(prefill, step);
    let vocab =
        logits_width(decoder.step.manifest()).ok_or_else(|| fail("the decode-step bundle has no `logits` output"))?;
    let which = |i: usize| if args.batch.is_some() { format!("prompt {}", i + 1) } else { "the prompt".into() };
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&t) = p.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(usage(format!("{}'s token {t} is outside the model's vocabulary 0 … {}", which(i), vocab - 1)));
        }
    }
    // A KV cache (softmax attention over the whole sequence) holds `context` positions.
    let limit = decoder.has_kv_cache().then_some(context);
    if let (Some(l), Some(i)) = (limit, prompts.iter().position(|p| p.len() > context)) {
        return Err(usage(format!(
            "{} has {} tokens but the model's KV cache holds {l} (raise --context)",
            which(i),
            prompts[i].len()
        )));
    }
    let full = || eprintln!("stopped at a full KV cache of {context} tokens (raise --context)");
    let job = Job { sampling, max_tokens: args.max_tokens, limit, end_of_text: codec.end_of_text() };
    let started = std::time::Instant::now();
    let (mut prefill_secs, mut generated) = (0.0, 0);
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| fail(format!("writing the text: {e}"));
    if args.batch.is_none() {
        let mut shown = codec.printable(&prompts[0]).map_err(fail)?;
        write!(out, "{shown}").and_then(|_| out.flush()).map_err(io)?;
        let mut show = |tokens: &[Vec<i32>]| -> Result<(), Failure> {
            let text = codec.printable(&tokens[0]).map_err(fail)?;
            if let Some(new) = text.strip_prefix(shown.as_str()) {
                write!(out, "{new}").and_then(|_| out.flush()).map_err(io)?;
                shown = text;
            }
            Ok(())
        };
        let (_, secs, n, stopped) = decoder.generate(&prompts, &job, &mut show)?;
        writeln!(out).map_err(io)?;
        (prefill_secs, generated) = (secs, n);
        if stopped {
            full();
        }
    } else {
        // Prompts of one length in token form run as one batch.
        let mut by_length: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, p) in prompts.iter().enumerate() {
            by_length.entry(p.len()).or_default().push(i);
        }
        let mut results = vec![Vec::new(); prompts.len()];
        for rows in by_length.values() {
            let group: Vec<Vec<i32>> = rows.iter().map(|&i| prompts[i].clone()).collect();
            let (tokens, secs, n, stopped) = decoder.generate(&group, &job, &mut |_| Ok(()))?;
            if stopped {
                full();
            }
            prefill_secs += secs;
            generated += n;
            for (&i, t) in rows.iter().zip(tokens) {
                results[i] = t;
            }
        }
        for (i, tokens) in results.iter().enumerate() {
            let text = codec.printable(tokens).map_err(fail)?;
            writeln!(out, "# prompt {}\n{text}", i + 1).map_err(io)?;
        }
    }
    let secs = started.elapsed().as_secs_f64() - prefill_secs;
    let total: usize = prompts.iter().map(Vec::len).sum();
    eprintln!(
        "prompt{}: {total} tokens in {prefill_secs:.2} s (prefill); generated {generated} tokens in {secs:.2} s \
         ({:.1} tokens/s, recurrent decode step, {})",
        if prompts.len() > 1 { "s" } else { "" },
        generated as f64 / secs.max(1e-9),
        decoder.step.describe_device()
    );
    Ok(())
}

/// How tokens are drawn and when a sequence stops.
struct Job {
    sampling: Sampling,
    max_tokens: usize,
    /// The rows of a KV cache, when the model has one.
    limit: Option<usize>,
    end_of_text: Option<usize>,
}

/// The prefill and the decode step, carrying the states from one to the other and from
/// one token to the next.
struct Decoder {
    /// `None` where the model has no prefill: the prompt then goes through the step.
    prefill: Option<Executor>,
    step: Executor,
    /// (input name of the step, value) of every state after the prefill, given to the
    /// first step; later steps find their states on the device (`Executor::carry`).
    states: Vec<(String, Tensor)>,
    /// (output, input) of every state: `next_state.0` → `state.0`, ….
    carried: Vec<(String, String)>,
}

impl Decoder {
    fn new(prefill: Option<Executor>, step: Executor) -> Decoder {
        let names = step.manifest().inputs.iter().map(|io| &io.name);
        let names = names.filter(|n| n.starts_with(STATE) || n.starts_with(KV_CACHE));
        let carried = names.map(|n| (format!("{NEXT}{n}"), n.clone())).collect();
        Decoder { prefill, step, states: Vec::new(), carried }
    }

    fn has_kv_cache(&self) -> bool {
        self.step.manifest().inputs.iter().any(|io| io.name.starts_with(KV_CACHE))
    }

    /// Continues `prompts` (one length) together, one row each: the prefill, then the step
    /// until every row has `max_tokens` or ended. `show` sees the tokens after every step.
    /// Returns each row's tokens (prompt and continuation), the prefill's seconds, the
    /// tokens generated, and whether a KV cache filled up.
    fn generate(
        &mut self,
        prompts: &[Vec<i32>],
        job: &Job,
        show: &mut dyn FnMut(&[Vec<i32>]) -> Result<(), Failure>,
    ) -> Result<(Vec<Vec<i32>>, f64, usize, bool), Failure> {
        let started = std::time::Instant::now();
        let mut logits = self.run_prefill(prompts).map_err(fail)?;
        let prefill_secs = started.elapsed().as_secs_f64();
        let mut tokens = prompts.to_vec();
        let mut done = vec![false; prompts.len()];
        let mut generated = 0;
        for step in 0..job.max_tokens {
            let mut next = Vec::with_capacity(prompts.len());
            for (row, l) in logits.chunks(logits.len() / prompts.len()).enumerate() {
                let t = job.sampling.choose(l, step as u64).map_err(fail)?;
                if !done[row] {
                    if Some(t) == job.end_of_text {
                        done[row] = true;
                    } else {
                        tokens[row].push(t as i32);
                        generated += 1;
                    }
                }
                next.push(t as i32);
            }
            show(&tokens)?;
            let length = prompts[0].len() + step + 1;
            if done.iter().all(|&d| d) || step + 1 == job.max_tokens {
                break;
            }
            // The step at position `length − 1` writes the cache's last row at `l − 1`.
            if job.limit.is_some_and(|l| length > l) {
                return Ok((tokens, prefill_secs, generated, true));
            }
            logits = self.run_step(&next, length - 1).map_err(fail)?;
        }
        Ok((tokens, prefill_secs, generated, false))
    }

    /// The logits after the prompts `[B, N]`, and the states after them.
    fn run_prefill(&mut self, prompts: &[Vec<i32>]) -> Result<Vec<f32>, String> {
        let Some(prefill) = &mut self.prefill else {
            return self.step_through(prompts);
        };
        let tokens = Tensor::i32(vec![prompts.len(), prompts[0].len()], prompts.concat());
        prefill.forward(&[("tokens", &tokens)]).map_err(|e| e.to_string())?;
        let prefill = &*prefill;
        self.states = self
            .carried
            .iter()
            .map(|(next, n)| Ok((n.clone(), prefill.output(next).map_err(|e| e.to_string())?)))
            .collect::<Result<_, String>>()?;
        logits_of(prefill)
    }

    /// The prompts through the step one position at a time from zero states (a model
    /// without a prefill).
    fn step_through(&mut self, prompts: &[Vec<i32>]) -> Result<Vec<f32>, String> {
        let b = prompts.len() as i64;
        let env = std::collections::HashMap::from([("B", b)]);
        self.states.clear();
        for io in self.step.manifest().inputs.iter().filter(|io| self.carried.iter().any(|(_, n)| *n == io.name)) {
            let shape = io.shape.iter().map(|d| d.eval(&env).map(|v| v as usize).map_err(|e| e.to_string()));
            let shape = shape.collect::<Result<Vec<_>, _>>()?;
            let len = shape.iter().product();
            self.states.push((io.name.clone(), Tensor::f32(shape, vec![0.0; len])));
        }
        let mut logits = Vec::new();
        for p in 0..prompts[0].len() {
            let column: Vec<i32> = prompts.iter().map(|row| row[p]).collect();
            logits = self.run_step(&column, p)?;
        }
        Ok(logits)
    }

    /// The logits after `tokens` (one per row) at `position`. The states stay on the
    /// device: each step's new states are copied into its state inputs for the next.
    fn run_step(&mut self, tokens: &[i32], position: usize) -> Result<Vec<f32>, String> {
        let tokens = Tensor::i32(vec![tokens.len(), 1], tokens.to_vec());
        let position = Tensor::i32(vec![1], vec![position as i32]);
        let mut inputs: Vec<(&str, &Tensor)> = vec![("tokens", &tokens), (POSITION, &position)];
        let after_prefill = std::mem::take(&mut self.states);
        inputs.extend(after_prefill.iter().map(|(n, t)| (n.as_str(), t)));
        self.step.forward(&inputs).map_err(|e| e.to_string())?;
        let pairs: Vec<(&str, &str)> = self.carried.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        self.step.carry(&pairs).map_err(|e| e.to_string())?;
        logits_of(&self.step)
    }
}

fn logits_of(exec: &Executor) -> Result<Vec<f32>, String> {
    let logits = exec.output(LOGITS).map_err(|e| e.to_string())?;
    logits.as_f32().map(<[f32]>::to_vec).ok_or_else(|| "the logits are not f32".to_string())
}

/// V of the `logits [B, 1, V]` output.
fn logits_width(m: &tnc_runtime::Manifest) -> Option<usize> {
    let io = m.outputs.iter().find(|o| o.name == LOGITS)?;
    usize::try_from(io.shape.last()?.as_const()?).ok()
}
