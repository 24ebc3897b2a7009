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
    #[arg(long, default_value_t = 1e-3, value_parser = non_negative)]
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
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    pub clip: f64,
    /// AdamW's decoupled weight decay (not applied to `@no_decay` parameters).
    #[arg(long, default_value_t = 0.01, value_parser = non_negative)]
    pub weight_decay: f64,
    /// AdamW's β1, in [0, 1).
    #[arg(long, default_value_t = 0.9, value_parser = decay_rate)]
    pub beta1: f64,
    /// AdamW's β2, in [0, 1).
    #[arg(long, default_value_t = 0.98, value_parser = decay_rate)]
    pub beta2: f64,
    /// AdamW's ε (positive).
    #[arg(long, default_value_t = 1e-8, value_parser = positive)]
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

/// A finite number ≥ 0 (a learning rate, a clipping norm, a weight decay): a negative
/// one would climb the loss, an infinite one write NaN parameters.
fn non_negative(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if x >= 0.0 { Ok(x) } else { Err("must be ≥ 0".into()) })
}

/// A finite number > 0 (AdamW's ε, which divides; `tnc verify`'s tolerance).
pub fn positive(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if x > 0.0 { Ok(x) } else { Err("must be > 0".into()) })
}

/// A moment's decay rate, in [0, 1): at 1 or past it the moments never forget, below 0
/// they alternate in sign (and the second moment's square root is NaN).
fn decay_rate(s: &str) -> Result<f64, String> {
    number(s).and_then(|x| if (0.0..1.0).contains(&x) { Ok(x) } else { Err("must be in [0, 1)".into()) })
}

fn number(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(_) => Err("must be a finite number".into()),
        Err(e) => Err(format!("not a number ({e})")),
    }
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

#[cfg(test)]
mod tests {
    use super::RunFlags;
    use clap::{Args, FromArgMatches};

    fn parse(args: &[&str]) -> Result<RunFlags, String> {
        let cmd = RunFlags::augment_args(clap::Command::new("t"));
        let m =
            cmd.try_get_matches_from(std::iter::once("t").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        RunFlags::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    #[test]
    fn optimizer_settings_out_of_their_range_are_refused() {
        let f = parse(&[]).unwrap();
        assert_eq!((f.lr, f.clip, f.weight_decay, f.beta1, f.beta2, f.eps), (1e-3, 1.0, 0.01, 0.9, 0.98, 1e-8));
        let f = parse(&["--lr", "0", "--clip", "0", "--weight-decay", "0", "--beta1", "0", "--eps", "1e-12"]).unwrap();
        assert_eq!((f.lr, f.clip, f.weight_decay, f.beta1, f.eps), (0.0, 0.0, 0.0, 0.0, 1e-12));
        for (flag, value, why) in [
            ("--lr", "-1", "must be ≥ 0"),
            ("--lr", "inf", "finite"),
            ("--clip", "nan", "finite"),
            ("--clip", "-1", "must be ≥ 0"),
            ("--weight-decay", "-5", "must be ≥ 0"),
            ("--beta1", "1.5", "[0, 1)"),
            ("--beta2", "1", "[0, 1)"),
            ("--beta2", "-0.1", "[0, 1)"),
            ("--eps", "0", "must be > 0"),
            ("--eps", "x", "not a number"),
        ] {
            let err = parse(&[&format!("{flag}={value}")]).map(|_| ()).unwrap_err();
            assert!(err.contains(flag) && err.contains(why), "{flag} {value}: {err}");
        }
    }
}
