//! The command-line flags of a training run (clap), shared by `tnc train`, `tnc ablate`
//! and the runtime-only `tnc-train`, and the [`Config`] they make.

use crate::{Config, Schedule};

/// The flags of a training run, shared by `tnc train`, `tnc ablate` and `tnc-train`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunFlags {
    /// Training data: `copy[:len=L,vocab=V]`, `mqar[:pairs=K,vocab=V]` (synthetic tasks
    /// generated from the seed; nothing to download) or `text:PATH` (bytes of a file,
    /// vocabulary 256; the last 10% is the validation split). For classifiers (a model
    /// with `input labels: i32[B]`): `listops[:depth=D,args=A]` (LRA's ListOps, 10
    /// classes, vocabulary 16, generated from the seed; defaults depth 10, args 10) or
    /// `jsonl:PATH` (one `{"text": …, "label": k}` or `{"tokens": […], "label": k}` per
    /// line; the last 10% is the validation split).
    #[arg(long, default_value = "copy")]
    pub data: String,
    /// A tokenizer for `text:PATH` data (a Hugging Face `tokenizer.json`, e.g. from `tnc
    /// tokenizer train`): the file's subword tokens instead of its bytes, tokenized once
    /// and cached next to it. The model's vocabulary must hold the tokenizer's. Also for
    /// `jsonl:PATH` text rows (ids shifted by one: 0 stays padding).
    #[arg(long, value_name = "TOKENIZER.json")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Sequences per batch (B).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// Tokens per sequence (N).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(2..))]
    pub seq: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Batches (forward + backward) per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub accumulate: u64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Learning-rate schedule after warm-up: cosine (to 10% of the peak), inverse-sqrt or constant.
    #[arg(long, default_value = "cosine", value_parser = Schedule::parse)]
    pub schedule: Schedule,
    /// Clip the global gradient norm to this value (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// AdamW's decoupled weight decay (not applied to `@no_decay` parameters).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// AdamW's β1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW's β2.
    #[arg(long, default_value_t = 0.98)]
    pub beta2: f64,
    /// AdamW's ε.
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Seed of the parameters, the data and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate every K steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_batches: u64,
    /// Checkpoint every K steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Checkpoints to keep (0: all).
    #[arg(long, default_value_t = 3)]
    pub keep_last: u64,
    /// Worker threads (default: every core). Bit-identical results need the same count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// With --resume: settings allowed to differ from the checkpoint's run, by flag name
    /// (e.g. `steps,lr`). Without it a resume that would change the result is refused. A
    /// changed --steps re-plans the learning-rate schedule for the new length from the
    /// resume step on (the rate jumps where cosine decay differs).
    #[arg(long, value_delimiter = ',', value_name = "FLAGS")]
    pub allow_changed: Vec<String>,
}

impl RunFlags {
    /// The data source: `--data` with `--tokenizer`'s file, parsed (a text corpus is
    /// tokenized here, or read from its cache); `warn` hears what does not stop it.
    pub fn data_source(&self, warn: &mut dyn FnMut(&str)) -> Result<crate::DataSource, String> {
        let spec = crate::DataSource::spec_with_tokenizer(&self.data, self.tokenizer.as_deref())?;
        crate::DataSource::parse_warning(&spec, warn)
    }

    pub fn config(&self) -> Config {
        Config {
            steps: self.steps,
            batch: self.batch as usize,
            seq: self.seq as usize,
            lr: self.lr,
            accumulate: self.accumulate as usize,
            warmup: self.warmup,
            schedule: self.schedule,
            clip: self.clip,
            seed: self.seed,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            eval_every: self.eval_every,
            eval_batches: self.eval_batches as usize,
            save_every: self.save_every,
            keep_last: self.keep_last as usize,
            threads: self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }
}
