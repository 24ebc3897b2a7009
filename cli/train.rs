//! `tnc train MODEL.tn|BUNDLE --data SOURCE --out RUN_DIR …`: train a model with a
//! compiled training bundle (compiled on the fly, and cached, from a .tn file), with a
//! progress bar, `metrics.jsonl`, checkpoints, `--resume`, and a loss plot at the end.
//!
//! A run directory holds `run.json` (what was trained, for `tnc eval`), `metrics.jsonl`,
//! `checkpoints/ckpt-<step>.safetensors` and `loss.svg`.

use crate::device::{self, DeviceArg};
use crate::{bundle_cache, fail, Failure, ModelArgs};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tnc_grammar::Diagnostic;
use tnc_train::flags::RunFlags;
use tnc_train::{Config, DataSource, EvalReport, Trainer};

/// The training flags shared by `tnc train` and `tnc ablate`: the run's, and how the
/// model is compiled and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFlags {
    #[command(flatten)]
    pub run: RunFlags,
    /// Dropout rate: compiles the model with `--set drop=P` (.tn models with a `drop` argument).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Target of the compiled bundle: a CPU (`native`, `x86-64-v3`, `x86-64-v4`) or a GPU
    /// (`sm80` … `sm90a`). Default: `native`, or `sm80` with `--device cuda|emulated`.
    #[arg(long)]
    pub target: Option<String>,
    /// Where training runs. Default: the CPU for CPU targets, CUDA for GPU targets.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// The code generator of a CPU target (a .tn model is compiled with it): `llvm`
    /// (vectorized, the default) or `cranelift` (compiles several times faster).
    #[arg(long, value_enum, default_value_t)]
    pub backend: crate::BackendArg,
    /// The element type of products' operands (a .tn model is compiled with it).
    #[arg(long, value_enum, default_value_t)]
    pub precision: crate::PrecisionArg,
    /// How a GPU target computes dense products (a .tn model is compiled with it): `tiles`
    /// (generated kernels) or `cublas` (cuBLAS calls; libcublas must load where it runs).
    #[arg(long, value_enum, default_value_t)]
    pub gemm: crate::compile::GemmArg,
    /// No progress bar or progress lines; warnings, errors and the summary still print.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The model (.tn file, compiled with `--train` and cached) or a training bundle directory.
    pub model: PathBuf,
    /// Override a hyper-parameter of a .tn model (`name=value`); repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub flags: TrainFlags,
    /// The run directory: metrics, checkpoints and plots go here.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in `--out` from its latest valid checkpoint.
    #[arg(long)]
    pub resume: bool,
}

impl TrainFlags {
    /// The target and the device, from what was given, checked before anything compiles.
    pub fn target_and_device(&self) -> Result<(String, DeviceArg), Failure> {
        let (target, device) = match (&self.target, self.device) {
            (Some(t), Some(d)) => (t.clone(), d),
            (Some(t), None) => (t.clone(), DeviceArg::for_target(t)),
            (None, Some(d)) => (d.default_target().to_string(), d),
            (None, None) => ("native".to_string(), DeviceArg::Cpu),
        };
        // An unknown target is bad usage, found before anything compiles (as in `tnc compile`).
        crate::compile::parse_target(&target)?;
        device.check(&target)?;
        self.backend.check(&target)?;
        Ok((target, device))
    }

    pub fn config(&self) -> Config {
        self.run.config()
    }
}

/// The bundle for `model`: a directory is used as it is; a .tn file is compiled (cached).
pub(crate) fn resolve_bundle(
    model: &Path,
    sets: &[String],
    flags: &TrainFlags,
    status: &mut dyn FnMut(&str),
) -> Result<PathBuf, Failure> {
    if model.is_dir() {
        let compiled_in = flags.precision != crate::PrecisionArg::F32 || flags.gemm != crate::compile::GemmArg::Tiles;
        if !sets.is_empty() || flags.dropout.is_some() || compiled_in {
            return Err(Failure::usage(
                Diagnostic::error(
                    "`--set`, `--dropout`, `--precision` and `--gemm` need a .tn model; a bundle is already compiled",
                )
                .with_hint("pass the model file instead, or recompile the bundle with the new values"),
            ));
        }
        return Ok(model.to_path_buf());
    }
    let mut sets = sets.to_vec();
    if let Some(p) = flags.dropout {
        sets.push(format!("drop={p}"));
    }
    let args = ModelArgs { file: model.to_path_buf(), sets, model: None };
    let (target, _) = flags.target_and_device()?;
    flags.gemm.check(&crate::compile::parse_target(&target)?)?;
    let choices = (target.as_str(), flags.precision.policy(), flags.backend.codegen(), flags.gemm.gemm());
    bundle_cache::training_bundle(&args, choices, status)
}

/// The run directory's copy of its bundle, relative to the run directory (as `run.json`
/// and the checkpoints name it).
pub(crate) const RUN_BUNDLE: &str = "bundle";

/// Copies the bundle `from` into `run/bundle` (unless it is that directory, or an
/// identical copy is there already: same manifest checksum), through a temporary
/// directory renamed into place; returns the copy.
fn keep_bundle(from: &Path, run: &Path) -> Result<PathBuf, String> {
    let to = run.join(RUN_BUNDLE);
    let same_dir = |a: &Path, b: &Path| {
        std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(a, b)| a == b)
    };
    if same_dir(from, &to) {
        return Ok(to);
    }
    let hash = tnc_train::trainer::bundle_hash(from)?;
    if to.is_dir() && tnc_train::trainer::bundle_hash(&to).ok().as_ref() == Some(&hash) {
        return Ok(to);
    }
    let tmp = run.join(format!(".{RUN_BUNDLE}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(from, &tmp).map_err(|e| format!("copying the bundle {} into {}: {e}", from.display(), run.display()))?;
    if to.exists() {
        // Another bundle (the run's model changed; `--resume` then refuses its checkpoints
        // by their bundle hash, or continues the same model compiled for another target).
        std::fs::remove_dir_all(&to).map_err(|e| format!("{}: {e}", to.display()))?;
    }
    std::fs::rename(&tmp, &to).map_err(|e| format!("{}: {e}", to.display()))?;
    Ok(to)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// What `run.json` records about a run.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RunInfo {
    pub model: String,
    pub sets: Vec<String>,
    pub data: String,
    pub bundle: PathBuf,
    pub config: Config,
}

pub fn run(args: &TrainArgs) -> Result<(), Failure> {
    let bar = if args.flags.quiet { ProgressBar::hidden() } else { ProgressBar::new(args.flags.run.steps) };
    let summary = train_one(&args.model, &args.sets, &args.flags, &args.out, args.resume, &bar)?;
    print_summary(&summary, &args.out);
    Ok(())
}

/// The result of one run.
pub(crate) struct Summary {
    pub model: String,
    pub data: DataSource,
    pub steps: u64,
    /// Mean training loss of the last tenth of the steps (at least one).
    pub final_loss: f64,
    pub eval: Option<EvalReport>,
    /// Median tokens per second over the run's steps (every life's, from the metrics:
    /// a resumed run that had nothing left to train still has its figure).
    pub tokens_per_s: Option<f64>,
    pub parameters: u64,
    /// Bytes the runtime allocated for the model at the run's B and N.
    pub memory_bytes: u64,
    /// (step, training loss) of every step.
    pub losses: Vec<(f64, f64)>,
}

/// Trains `model` into `out`, showing progress on `bar`; writes `run.json`, metrics,
/// checkpoints and `loss.svg`.
pub(crate) fn train_one(
    model: &Path,
    sets: &[String],
    flags: &TrainFlags,
    out: &Path,
    resume: bool,
    bar: &ProgressBar,
) -> Result<Summary, Failure> {
    let data = flags.run.data_source(&mut |w| say(bar, &format!("warning: {w}"))).map_err(|e| {
        // A tokenizer or corpus that cannot be read is a usage error, like a bad spec.
        Failure::usage(Diagnostic::error(e))
    })?;
    let cfg = flags.config();
    let (_, mut device) = flags.target_and_device()?;
    let bundle_dir = resolve_bundle(model, sets, flags, &mut |s| say(bar, s))?;
    let bundle = device::load(&bundle_dir)?;
    if model.is_dir() && flags.device.is_none() {
        // A bundle given as it is runs where its target does.
        device = DeviceArg::for_target(&bundle.manifest.target.name);
    }
    device.check(&bundle.manifest.target.name)?;
    let mut exec = device::open(&bundle, device, cfg.threads)?;
    say(bar, &format!("training on {}", exec.describe_device()));
    // The activations at B, N are allocated before the run directory is made, so a run
    // that cannot fit leaves nothing behind.
    let sizes: Vec<(&str, i64)> = [("B", cfg.batch as i64), ("N", cfg.seq as i64)]
        .into_iter()
        .filter(|(n, _)| bundle.manifest.sizes.iter().any(|s| s == n))
        .collect();
    if sizes.len() == bundle.manifest.sizes.len() {
        exec.reserve(&sizes).map_err(|e| fail(e.to_string()))?;
    }
    // Data the model cannot take is refused before the run directory is made too.
    tnc_train::trainer::check_labels(&bundle.manifest, &data).map_err(fail)?;
    tnc_train::trainer::check_vocabulary(&bundle.manifest, &data).map_err(fail)?;
    std::fs::create_dir_all(out).map_err(|e| fail(format!("cannot create {}: {e}", out.display())))?;
    let info = RunInfo {
        model: model.display().to_string(),
        sets: sets.to_vec(),
        data: data.to_string(),
        bundle: PathBuf::from(RUN_BUNDLE),
        config: cfg.clone(),
    };
    let meta = BTreeMap::from([
        ("model".to_string(), info.model.clone()),
        ("data".to_string(), info.data.clone()),
        ("bundle".to_string(), RUN_BUNDLE.to_string()),
    ]);
    let mut trainer =
        Trainer::new(exec, data.clone(), cfg.clone(), out, resume, &flags.run.allow_changed, meta, &mut |w| {
            say(bar, &format!("warning: {w}"))
        })
        .map_err(fail)?;
    // The run keeps its own copy of the bundle (once the trainer has accepted the run
    // directory), so that `tnc eval` and `--resume` work after the compile cache is
    // cleared and after the run directory is moved.
    keep_bundle(&bundle_dir, out).map_err(fail)?;
    write_atomically(&out.join("run.json"), serde_json::to_string_pretty(&info).expect("serializable").as_bytes())?;

    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed} < {eta}]").expect("valid template"),
    );
    bar.set_length(cfg.steps);
    bar.set_position(trainer.step_count());
    if trainer.step_count() > 0 {
        say(bar, &format!("resuming {} at step {}", out.display(), trainer.step_count()));
    }
    if trainer.done() {
        say(
            bar,
            &format!("the run is at step {} of --steps {}: nothing left to train", trainer.step_count(), cfg.steps),
        );
    }
    let mut eval = None;
    tnc_train::interrupt::install();
    // Without a terminal (a log file, CI) the bar is hidden: a plain line every 5% of the run.
    let every = (cfg.steps / 20).max(1);
    while !trainer.done() {
        let r = trainer.step().map_err(fail)?;
        bar.set_position(r.step);
        let progress = format!("loss {:.4} lr {:.2e} {:.0} tok/s", r.loss, r.lr, r.tokens_per_s);
        if bar.is_hidden() && !flags.quiet && (r.step.is_multiple_of(every) || r.step == cfg.steps) {
            eprintln!("step {}/{}: {progress}", r.step, cfg.steps);
        }
        bar.set_message(progress);
        if trainer.eval_due() {
            let e = trainer.evaluate().map_err(fail)?;
            say(bar, &format!("step {}: {}", r.step, describe_eval(&e, &data)));
            eval = Some(e);
        }
        if trainer.save_due() {
            trainer.save().map_err(fail)?;
        }
        if tnc_train::interrupt::requested() {
            let path = trainer.save().map_err(fail)?;
            bar.abandon();
            return Err(Failure {
                diagnostic: Diagnostic::error(format!(
                    "interrupted after step {}: checkpoint {} written",
                    r.step,
                    path.display()
                ))
                .with_hint("continue the run with the same command and `--resume`"),
                sources: tnc_grammar::SourceMap::new(),
                status: tnc_train::interrupt::EXIT_STATUS,
            });
        }
    }
    if eval.is_none() {
        // Resumed at (or past) the end: evaluate what there is.
        eval = Some(trainer.evaluate().map_err(fail)?);
    }
    bar.finish_and_clear();

    let records = tnc_train::metrics::read(&out.join("metrics.jsonl")).map_err(fail)?;
    let series = |key: &str| -> Vec<(f64, f64)> {
        records.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect::<Vec<_>>()
    };
    let losses = series("loss");
    let eval_losses = series("eval_loss");
    let mut plot = vec![tnc_train::Series { label: "train loss".into(), points: losses.clone() }];
    if !eval_losses.is_empty() {
        plot.push(tnc_train::Series { label: "eval loss".into(), points: eval_losses.clone() });
    }
    let name = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    tnc_train::loss_plot(&out.join("loss.svg"), &format!("{name} on {data}"), &plot).map_err(fail)?;

    let tail = (losses.len() / 10).max(1).min(losses.len());
    let final_loss = losses[losses.len() - tail..].iter().map(|p| p.1).sum::<f64>() / tail.max(1) as f64;
    let mut speeds: Vec<f64> = series("tokens_per_s").into_iter().map(|p| p.1).collect();
    speeds.sort_by(f64::total_cmp);
    let m = trainer.executor().manifest();
    let parameters = m.params.iter().filter(|p| p.trainable).map(|p| p.shape.iter().product::<i64>() as u64).sum();
    Ok(Summary {
        model: name,
        data,
        steps: trainer.step_count(),
        final_loss,
        eval,
        tokens_per_s: speeds.get(speeds.len() / 2).copied(),
        parameters,
        memory_bytes: trainer.executor().allocated_bytes() as u64,
        losses,
    })
}

/// A line above the progress bar, or on standard error when the bar is hidden (not a
/// terminal), so logs of non-interactive runs keep it.
pub(crate) fn say(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// One line describing an evaluation.
pub(crate) fn describe_eval(e: &EvalReport, data: &DataSource) -> String {
    // Bits per byte: per token divided by the bytes a token covers (1 for byte-level
    // text; with a tokenizer, the corpus average).
    let per_byte = match data {
        DataSource::Text { tokenizer: None, .. } => format!(", bits per byte {:.4}", e.bits_per_token()),
        DataSource::Text { tokenizer: Some(t), .. } => format!(
            ", bits per byte {:.4} ({:.2} bytes per token, the corpus average)",
            e.bits_per_token() / t.bytes_per_token,
            t.bytes_per_token
        ),
        _ => String::new(),
    };
    if data.classes().is_some() {
        // A classifier: a loss per sequence, and its accuracy.
        let mut s = format!("eval loss {:.4} on {} sequences", e.loss, e.sequences);
        if let Some(a) = e.accuracy {
            s.push_str(&format!(", accuracy {:.2}%", 100.0 * a));
        }
        return s;
    }
    let mut s = format!(
        "eval loss {:.4}, perplexity {:.3} per token, bits per token {:.4}{per_byte} on {} tokens ({} sequences)",
        e.loss,
        e.perplexity(),
        e.bits_per_token(),
        e.tokens,
        e.sequences
    );
    if let Some(a) = e.accuracy {
        s.push_str(&format!(", accuracy {:.2}% on {} answers", 100.0 * a, e.answers));
    }
    s
}

fn print_summary(s: &Summary, out: &Path) {
    println!("trained {} on {} for {} steps", s.model, s.data, s.steps);
    println!("  final train loss {:.4} (mean of the last tenth of the steps)", s.final_loss);
    if let Some(e) = &s.eval {
        println!("  {}", describe_eval(e, &s.data));
    }
    let speed = s.tokens_per_s.map_or("no steps timed".into(), |t| format!("{t:.0} tokens/s (median)"));
    println!("  {speed}, {} parameters, {:.1} MiB allocated", s.parameters, s.memory_bytes as f64 / 1048576.0);
    println!(
        "  wrote {}/metrics.jsonl, {}/loss.svg, checkpoints in {}/checkpoints",
        out.display(),
        out.display(),
        out.display()
    );
}

/// Writes a small file through a temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
}
