//! `tnc eval RUN_DIR|CHECKPOINT [--data SOURCE]`: evaluate a trained model on the
//! validation split of a data source: loss, perplexity, bits per byte (text) or per
//! token, and for the synthetic tasks the accuracy on the answer tokens.

use crate::fail;
use crate::train::describe_eval;
use crate::Failure;
use std::path::{Path, PathBuf};
use tnc_grammar::Diagnostic;
use tnc_train::checkpoint::{self, Checkpoint};
use tnc_train::trainer::{bundle_hash, checkpoint_dir, evaluate, restore};
use tnc_train::{Config, DataSource};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A run directory of `tnc train` (its latest valid checkpoint) or a checkpoint file.
    pub run: PathBuf,
    /// The data to evaluate on (default: the run's own, with its tokenizer); its
    /// validation split is used.
    #[arg(long)]
    pub data: Option<String>,
    /// A tokenizer for `--data text:PATH` (see `tnc train --tokenizer`).
    #[arg(long, value_name = "TOKENIZER.json", requires = "data")]
    pub tokenizer: Option<PathBuf>,
    /// Validation batches (default: the run's `--eval-batches`).
    #[arg(long, value_parser = crate::count_at_least::<1>)]
    pub batches: Option<usize>,
    /// Sequences per batch (default: the run's).
    #[arg(long, value_parser = crate::count_at_least::<1>)]
    pub batch: Option<usize>,
    /// Tokens per sequence (default: the run's).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the model runs (default: where the run's bundle runs: the CPU, or CUDA for a
    /// GPU bundle).
    #[arg(long, value_enum)]
    pub device: Option<crate::device::DeviceArg>,
}

pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    let (path, ckpt) = find_checkpoint(&args.run)?;
    let meta = |k: &str| ckpt.meta.get(k).cloned();
    let named = meta("bundle").ok_or_else(|| fail(format!("{} does not name its bundle", path.display())))?;
    // Runs keep their bundle, named relative to the run directory (older runs named a path
    // in the compile cache); the checkpoint is RUN/checkpoints/ckpt-….safetensors.
    let bundle_dir = match path.parent().and_then(Path::parent) {
        Some(run) if Path::new(&named).is_relative() => run.join(&named).display().to_string(),
        _ => named,
    };
    let config: Config = meta("config")
        .and_then(|c| serde_json::from_str(&c).ok())
        .ok_or_else(|| fail(format!("{} has no readable training configuration", path.display())))?;
    let spec = match &args.data {
        Some(d) => DataSource::spec_with_tokenizer(d, args.tokenizer.as_deref())
            .map_err(|e| Failure::usage(Diagnostic::error(e)))?,
        None => meta("data").ok_or_else(|| fail(format!("{} does not name its data; pass --data", path.display())))?,
    };
    let data = DataSource::parse_warning(&spec, &mut |w| eprintln!("warning: {w}"))
        .map_err(|e| Failure::usage(Diagnostic::error(e)))?;
    let bundle = tnc_runtime::Bundle::load(&bundle_dir)
        .map_err(|e| fail(format!("the run's bundle {bundle_dir} cannot be loaded ({e}); retrain or recompile it")))?;
    if meta("bundle_sha256") != Some(bundle_hash(&bundle.dir).map_err(fail)?) {
        return Err(fail(format!("{bundle_dir} has changed since {} was written", path.display())));
    }
    tnc_train::trainer::check_labels(&bundle.manifest, &data).map_err(fail)?;
    tnc_train::trainer::check_vocabulary(&bundle.manifest, &data).map_err(fail)?;
    let target = &bundle.manifest.target.name;
    let device = args.device.unwrap_or_else(|| crate::device::DeviceArg::for_target(target));
    device.check(target)?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut exec = crate::device::open(&bundle, device, threads)?;
    eprintln!("evaluating on {}", exec.describe_device());
    restore(&mut exec, &ckpt, &[]).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let (b, n) = (args.batch.unwrap_or(config.batch), args.seq.unwrap_or(config.seq));
    let count = args.batches.unwrap_or(config.eval_batches);
    // The batches are made in host memory before any runs: refuse sizes it cannot hold.
    let token_bytes = 4 * (count as u128) * (b as u128) * (n as u128);
    tnc_runtime::host_memory::check_fits(token_bytes, &format!("{count} batches of {b} × {n} tokens")).map_err(fail)?;
    let batches = data.eval_batches(config.seed, b, n, count).map_err(fail)?;
    let report = evaluate(&mut exec, &batches).map_err(fail)?;
    println!("{} at step {} on {data} (validation split):", path.display(), ckpt.step);
    println!("  {}", describe_eval(&report, &data));
    Ok(())
}

/// The checkpoint a path names: a checkpoint file, or a run directory's latest valid one.
pub(crate) fn find_checkpoint(path: &Path) -> Result<(PathBuf, Checkpoint), Failure> {
    if path.is_file() {
        let c = checkpoint::load(path).map_err(fail)?;
        return Ok((path.to_path_buf(), c));
    }
    if !path.is_dir() {
        return Err(Failure::usage(Diagnostic::error(format!(
            "{} is neither a run directory nor a checkpoint file",
            path.display()
        ))));
    }
    let dir = checkpoint_dir(path);
    match checkpoint::latest_valid(&dir).map_err(fail)? {
        Some((p, c, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            Ok((p, c))
        }
        None => Err(fail(format!("{} has no checkpoint (is it a `tnc train` run directory?)", path.display()))),
    }
}
