//! The training loop over a compiled training bundle (`tnc compile --train`). The bundle
//! computes everything — forward, backward, gradient accumulation, the global gradient
//! norm and AdamW — and this loop only moves batches in, sets the hyper-parameters of
//! each step (learning rate, bias corrections) and reads back the loss, the norms and
//! the per-token accuracy.
//!
//! It runs on any device the executor has (CPU threads, CUDA, the emulated GPU):
//! parameters, gradients and AdamW state stay on the device, and a step moves one batch
//! in and reads back the loss and the global gradient norm.
//!
//! Determinism: batches are a pure function of (seed, data position), dropout of (seed,
//! micro-step), and the kernels' results depend only on the thread count on CPUs and on
//! nothing on GPUs (fixed reduction orders, no atomics), so a run resumed from a
//! checkpoint reproduces the uninterrupted run bit for bit on the same device with the
//! same seed (and thread count). A checkpoint of the same model written on another
//! target or device resumes too, with a warning that the runs are not bit-identical.

use crate::checkpoint::{self, Checkpoint};
use crate::data::{Batch, DataSource};
use crate::lr::{lr, Schedule};
use crate::metrics::MetricsLog;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tnc_runtime::manifest::{BufferRole, Hyper, MANIFEST_CHECKSUM_FILE, OPTIMIZER_HYPER};
use tnc_runtime::{Executor, Manifest, Tensor};

/// Everything that decides what a run computes (and how often it reports).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    pub lr: f64,
    /// Backward passes per optimizer step.
    pub accumulate: usize,
    pub warmup: u64,
    pub schedule: Schedule,
    /// Largest global gradient norm; 0 disables clipping.
    pub clip: f64,
    pub seed: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Checkpoints to keep (0: all).
    pub keep_last: usize,
    pub threads: usize,
}

/// One optimizer step's numbers.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: u64,
    /// Mean training loss over the step's accumulated batches.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

/// An evaluation on the validation batches.
#[derive(Clone, Debug)]
pub struct EvalReport {
    /// Mean loss (nats) over every prediction: every next token, or (for a classifier)
    /// every sequence's class.
    pub loss: f64,
    /// Predictions scored: tokens, or a classifier's sequences.
    pub tokens: usize,
    /// Fraction of the task's answer tokens predicted exactly (top-1), when the task has
    /// answers and the bundle an accuracy output.
    pub accuracy: Option<f64>,
    /// Answer tokens scored.
    pub answers: usize,
    pub sequences: usize,
}

impl EvalReport {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }

    /// Bits per token (per byte for byte-level text).
    pub fn bits_per_token(&self) -> f64 {
        self.loss / std::f64::consts::LN_2
    }
}

/// The model's vocabulary (its `embedding`'s rows) holds every token `data` yields:
/// training and evaluation refuse a mismatch up front, naming the fix.
pub fn check_vocabulary(m: &Manifest, data: &DataSource) -> Result<(), String> {
    if let Some(e) = m.params.iter().find(|p| p.name == "embedding") {
        let model_vocab = e.shape.first().copied().unwrap_or(0) as usize;
        if model_vocab < data.vocab() {
            return Err(format!(
                "the model's vocabulary ({model_vocab}) is smaller than the data's ({}, {data}): use `--set vocab={}`",
                data.vocab(),
                data.vocab()
            ));
        }
    }
    Ok(())
}

/// A classifier (a model with an input `labels`) needs labelled data, and labelled data
/// a classifier.
pub fn check_labels(m: &Manifest, data: &DataSource) -> Result<(), String> {
    let labels = m.inputs.iter().find(|i| i.name == LABELS);
    match (labels, data.classes()) {
        (Some(_), None) => Err(format!(
            "the model has an input `{LABELS}` (a classifier), but `{data}` has no labels: use labelled data, \
             `--data listops` or `--data jsonl:PATH`"
        )),
        (None, Some(_)) => Err(format!(
            "`{data}` is labelled data (a class per sequence), but the model has no input `{LABELS}`: \
             declare `input {LABELS}: i32[B]` and a loss over it (see models/tasks/listops_encoder.tn)"
        )),
        (Some(io), Some(classes)) => {
            // The model's own bound on its labels (its classes), where it is a constant:
            // a label past it would stop the run at the first batch that holds one.
            let empty = std::collections::HashMap::new();
            match io.bounds.iter().filter_map(|b| b.eval(&empty).ok()).min() {
                Some(bound) if classes as i64 > bound => Err(format!(
                    "`{data}` has labels up to {}, but the model's `{LABELS}` must lie in 0..{bound} (its classes): \
                     use `--set classes={classes}` or relabel the data",
                    classes - 1
                )),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// The input a classifier's labels are fed to.
pub const LABELS: &str = "labels";

/// Runs the forward pass on a batch: its tokens, and its labels where it has them.
fn forward(exec: &mut Executor, batch: &Batch) -> Result<(), String> {
    let tokens = Tensor::i32(vec![batch.batch, batch.seq], batch.tokens.clone());
    if batch.labels.is_empty() {
        return exec.forward(&[("tokens", &tokens)]).map_err(|e| e.to_string());
    }
    let labels = Tensor::i32(vec![batch.batch], batch.labels.clone());
    exec.forward(&[("tokens", &tokens), (LABELS, &labels)]).map_err(|e| e.to_string())
}

/// The SHA-256 of the manifest of the bundle in `dir` (which holds the SHA-256 of every
/// other file).
pub fn bundle_hash(dir: &Path) -> Result<String, String> {
    let path = dir.join(MANIFEST_CHECKSUM_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.split_whitespace().next().unwrap_or_default().to_string())
}

/// The checkpoint directory of a run directory.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub struct Trainer {
    exec: Executor,
    data: DataSource,
    cfg: Config,
    run_dir: PathBuf,
    bundle_hash: String,
    /// Extra checkpoint metadata (model, data source, …), stored verbatim.
    meta: BTreeMap<String, String>,
    /// Optimizer steps done.
    step: u64,
    /// The next training batch.
    position: u64,
    trainable: Vec<String>,
    log: MetricsLog,
    eval_set: Option<Vec<Batch>>,
}

impl Trainer {
    /// A trainer running `exec` (an executor of a training bundle, on any device) and
    /// writing into `run_dir`. With `resume`, continues from the latest valid checkpoint
    /// there (`warn` hears about skipped corrupt ones, and about a checkpoint of the same
    /// model written on another target or device, which resumes but not bit for bit),
    /// refusing settings that differ from the checkpoint's run unless `allow_changed`
    /// names them ([`changed_settings`]);
    /// without, the parameters are initialized from the seed and `run_dir` must hold no
    /// checkpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut exec: Executor,
        data: DataSource,
        cfg: Config,
        run_dir: &Path,
        resume: bool,
        allow_changed: &[String],
        meta: BTreeMap<String, String>,
        warn: &mut dyn FnMut(&str),
    ) -> Result<Trainer, String> {
        if let Some(bad) = allow_changed.iter().find(|a| !RESULT_FLAGS.iter().any(|f| f.0 == a.as_str())) {
            let names: Vec<&str> = RESULT_FLAGS.iter().map(|f| f.0).collect();
            return Err(format!(
                "--allow-changed: `{bad}` is not a setting that changes a run (those are: {})",
                names.join(", ")
            ));
        }
        let m = exec.manifest().clone();
        for entry in ["forward", "backward", "accumulate", "grad_norm", "step"] {
            if m.entry_points.get(entry).is_none_or(|s| s.is_empty()) {
                return Err(format!(
                    "the bundle has no `{entry}` entry point: compile it with `tnc compile --train` (or pass the .tn file)"
                ));
            }
        }
        if !m.outputs.iter().any(|o| o.name == "loss") {
            return Err("the model has no output `loss`".into());
        }
        if !m.inputs.iter().any(|i| i.name == "tokens") {
            return Err("the model has no input `tokens` (training feeds token sequences)".into());
        }
        check_labels(&m, &data)?;
        check_vocabulary(&m, &data)?;
        if cfg.batch == 0 || cfg.seq < 2 || cfg.accumulate == 0 {
            return Err("batch and accumulate must be ≥ 1 and seq ≥ 2".into());
        }
        let trainable: Vec<String> = m
            .buffers
            .iter()
            .filter(|b| b.role == BufferRole::Optimizer)
            .filter_map(|b| b.name.as_deref()?.strip_prefix("adam_m.").map(String::from))
            .collect();
        let hash = bundle_hash(exec.bundle_dir())?;
        let ckpt_dir = checkpoint_dir(run_dir);
        std::fs::create_dir_all(run_dir).map_err(|e| format!("run directory {}: {e}", run_dir.display()))?;
        let (step, position) = if resume {
            match checkpoint::latest_valid(&ckpt_dir)? {
                Some((path, ckpt, warnings)) => {
                    for w in &warnings {
                        warn(w);
                    }
                    let same_model =
                        m.model_sha256.is_some() && ckpt.meta.get("model_sha256") == m.model_sha256.as_ref();
                    if ckpt.meta.get("bundle_sha256") != Some(&hash) {
                        if !same_model {
                            return Err(format!(
                                "{} was written by another bundle (model, --set values or precision differ); resume with the same model and options",
                                path.display()
                            ));
                        }
                        warn(&format!(
                            "{} was written by the same model compiled for {} on {}; this run uses {} on {}: it continues from there, but not bit-identically to an uninterrupted run",
                            path.display(),
                            ckpt.meta.get("target").map_or("another target", String::as_str),
                            ckpt.meta.get("device").map_or("another device", String::as_str),
                            m.target.name,
                            exec.describe_device(),
                        ));
                    } else if ckpt.threads != cfg.threads && !m.target.name.starts_with("sm") {
                        warn(&format!(
                            "{} was written with {} threads, this run uses {}: results will not be bit-identical to an uninterrupted run",
                            path.display(),
                            ckpt.threads,
                            cfg.threads
                        ));
                    }
                    let changed = changed_settings(&ckpt.meta, &cfg, meta.get("data"), warn)?;
                    let refused: Vec<&Change> =
                        changed.iter().filter(|c| !allow_changed.iter().any(|a| a == c.flag)).collect();
                    if !refused.is_empty() {
                        let list: Vec<String> =
                            refused.iter().map(|c| format!("--{} {} (now {})", c.flag, c.was, c.now)).collect();
                        let flags: Vec<&str> = refused.iter().map(|c| c.flag).collect();
                        return Err(format!(
                            "{} was written by a run with other settings: {}; resuming would change what the run computes. Resume with the same flags, or allow the changes with `--allow-changed {}`",
                            path.display(),
                            list.join(", "),
                            flags.join(",")
                        ));
                    }
                    for c in &changed {
                        warn(&format!("resuming with --{} {} (the run had {})", c.flag, c.now, c.was));
                    }
                    restore(&mut exec, &ckpt, &trainable).map_err(|e| format!("{}: {e}", path.display()))?;
                    (ckpt.step, ckpt.data_position)
                }
                None => {
                    exec.set_params_from_seed(cfg.seed).map_err(|e| e.to_string())?;
                    (0, 0)
                }
            }
        } else {
            if checkpoint::latest_valid(&ckpt_dir)?.is_some() {
                return Err(format!(
                    "{} already holds checkpoints: pass --resume to continue that run, or choose another --out",
                    run_dir.display()
                ));
            }
            exec.set_params_from_seed(cfg.seed).map_err(|e| e.to_string())?;
            (0, 0)
        };
        let log = MetricsLog::open(&run_dir.join("metrics.jsonl"), Some(step))?;
        Ok(Trainer {
            exec,
            data,
            cfg,
            run_dir: run_dir.to_path_buf(),
            bundle_hash: hash,
            meta,
            step,
            position,
            trainable,
            log,
            eval_set: None,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn done(&self) -> bool {
        self.step >= self.cfg.steps
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// One optimizer step: `accumulate` batches forward and backward, then AdamW.
    /// A non-finite loss or gradient stops with an error naming the step and the tensor;
    /// nothing is updated or saved then.
    pub fn step(&mut self) -> Result<StepReport, String> {
        let started = Instant::now();
        let step = self.step + 1;
        let k = self.cfg.accumulate;
        self.exec.set_scalar("seed", self.cfg.seed as i64).map_err(|e| e.to_string())?;
        self.exec.set_scalar("train", 1).map_err(|e| e.to_string())?;
        let mut loss_sum = 0.0;
        for micro in 0..k {
            let batch =
                self.data.train_batch(self.cfg.seed, self.position + micro as u64, self.cfg.batch, self.cfg.seq)?;
            // Dropout's counter: one value per backward pass of the whole run.
            self.exec.set_scalar("step", ((step - 1) * k as u64 + micro as u64) as i64).map_err(|e| e.to_string())?;
            forward(&mut self.exec, &batch)?;
            let loss = scalar(&self.exec, "loss")?;
            if !loss.is_finite() {
                return Err(format!("step {step}: the loss is non-finite ({loss}){}", self.intact()));
            }
            loss_sum += loss;
            self.exec.backward(&[]).map_err(|e| e.to_string())?;
            self.exec.run("accumulate", &[]).map_err(|e| e.to_string())?;
        }
        let lr = lr(self.cfg.schedule, self.cfg.lr, self.cfg.warmup, self.cfg.steps, step);
        let mut h = vec![0f32; Hyper::LEN];
        h[Hyper::LearningRate as usize] = lr as f32;
        h[Hyper::Beta1 as usize] = self.cfg.beta1 as f32;
        h[Hyper::Beta2 as usize] = self.cfg.beta2 as f32;
        h[Hyper::Eps as usize] = self.cfg.eps as f32;
        h[Hyper::WeightDecay as usize] = self.cfg.weight_decay as f32;
        h[Hyper::BiasCorrection1 as usize] = (1.0 - self.cfg.beta1.powi(step.min(i32::MAX as u64) as i32)) as f32;
        h[Hyper::BiasCorrection2 as usize] = (1.0 - self.cfg.beta2.powi(step.min(i32::MAX as u64) as i32)) as f32;
        h[Hyper::GradScale as usize] = (1.0 / k as f64) as f32;
        h[Hyper::ClipNorm as usize] = self.cfg.clip as f32;
        self.exec.set_optimizer_buffer(OPTIMIZER_HYPER, &h).map_err(|e| e.to_string())?;
        self.exec.run("grad_norm", &[]).map_err(|e| e.to_string())?;
        // One read (a synchronization on a GPU) when all is well; the per-parameter norms
        // only to name the culprit.
        let grad_norm =
            self.exec.optimizer_buffer(OPTIMIZER_HYPER).map_err(|e| e.to_string())?[Hyper::GradNorm as usize];
        if !grad_norm.is_finite() {
            for name in &self.trainable {
                let sq = self.exec.optimizer_buffer(&format!("grad_sqnorm.{name}")).map_err(|e| e.to_string())?[0];
                if !sq.is_finite() {
                    return Err(format!("step {step}: the gradient of `{name}` is non-finite{}", self.intact()));
                }
            }
            return Err(format!("step {step}: the global gradient norm is non-finite ({grad_norm}){}", self.intact()));
        }
        self.exec.run("step", &[]).map_err(|e| e.to_string())?;
        self.step = step;
        self.position += k as u64;
        let seconds = started.elapsed().as_secs_f64();
        let report = StepReport {
            step,
            loss: loss_sum / k as f64,
            lr,
            grad_norm: grad_norm as f64,
            tokens_per_s: (self.cfg.batch * self.cfg.seq * k) as f64 / seconds.max(1e-9),
        };
        self.log.append(&json!({
            "step": report.step,
            "loss": report.loss,
            "lr": report.lr,
            "grad_norm": report.grad_norm,
            "tokens_per_s": report.tokens_per_s,
            "bundle_sha256": self.bundle_hash,
        }))?;
        Ok(report)
    }

    fn intact(&self) -> String {
        match checkpoint::latest_valid(&checkpoint_dir(&self.run_dir)) {
            Ok(Some((path, _, _))) => format!("; stopping, the last good checkpoint {} is intact", path.display()),
            _ => "; stopping (no checkpoint was written yet)".into(),
        }
    }

    /// Whether the configuration asks for an evaluation after the current step.
    pub fn eval_due(&self) -> bool {
        self.done() || self.step.is_multiple_of(self.cfg.eval_every)
    }

    /// Whether the configuration asks for a checkpoint after the current step.
    pub fn save_due(&self) -> bool {
        self.done() || self.step.is_multiple_of(self.cfg.save_every)
    }

    /// Evaluates on the validation batches and logs the result with the current step.
    pub fn evaluate(&mut self) -> Result<EvalReport, String> {
        if self.eval_set.is_none() {
            self.eval_set =
                Some(self.data.eval_batches(self.cfg.seed, self.cfg.batch, self.cfg.seq, self.cfg.eval_batches)?);
        }
        let batches = self.eval_set.take().expect("set above");
        let report = evaluate(&mut self.exec, &batches);
        self.eval_set = Some(batches);
        let report = report?;
        let mut record = json!({ "step": self.step, "eval_loss": report.loss, "eval_bpb": report.bits_per_token() });
        if let Some(a) = report.accuracy {
            record["eval_accuracy"] = json!(a);
        }
        self.log.append(&record)?;
        Ok(report)
    }

    /// Writes a checkpoint of the current step.
    pub fn save(&self) -> Result<PathBuf, String> {
        let mut tensors = Vec::new();
        for p in &self.exec.manifest().params {
            let t = self.exec.param(&p.name).map_err(|e| e.to_string())?;
            let values = t.as_f32().ok_or_else(|| format!("parameter `{}` is not f32", p.name))?.to_vec();
            tensors.push((p.name.clone(), t.shape.clone(), values));
        }
        for name in &self.trainable {
            let shape = self.exec.param(name).map_err(|e| e.to_string())?.shape;
            for moment in ["adam_m", "adam_v"] {
                let key = format!("{moment}.{name}");
                let values = self.exec.optimizer_buffer(&key).map_err(|e| e.to_string())?;
                tensors.push((key, shape.clone(), values));
            }
        }
        let mut meta = self.meta.clone();
        meta.insert("bundle_sha256".into(), self.bundle_hash.clone());
        let m = self.exec.manifest();
        if let Some(model) = &m.model_sha256 {
            meta.insert("model_sha256".into(), model.clone());
        }
        meta.insert("target".into(), m.target.name.clone());
        meta.insert("device".into(), self.exec.describe_device());
        meta.insert("config".into(), serde_json::to_string(&self.cfg).map_err(|e| e.to_string())?);
        let ckpt = Checkpoint {
            step: self.step,
            data_position: self.position,
            rng: self.cfg.seed,
            threads: self.cfg.threads,
            tensors,
            meta,
        };
        checkpoint::save(&checkpoint_dir(&self.run_dir), &ckpt, self.cfg.keep_last)
    }
}

/// The flags whose values decide what a run computes, and [`Config`]'s field for each
/// (`data` is the checkpoint's metadata). Evaluation, checkpointing and thread counts are
/// not among them (threads are warned about separately).
const RESULT_FLAGS: &[(&str, &str)] = &[
    ("steps", "steps"),
    ("batch", "batch"),
    ("seq", "seq"),
    ("lr", "lr"),
    ("accumulate", "accumulate"),
    ("warmup", "warmup"),
    ("schedule", "schedule"),
    ("clip", "clip"),
    ("seed", "seed"),
    ("beta1", "beta1"),
    ("beta2", "beta2"),
    ("eps", "eps"),
    ("weight-decay", "weight_decay"),
    ("data", ""),
];

/// A setting that differs between a checkpoint's run and this one.
#[derive(Debug)]
pub struct Change {
    pub flag: &'static str,
    pub was: String,
    pub now: String,
}

/// The settings of `cfg` (and the data source `data`) that differ from those of the run
/// that wrote a checkpoint with metadata `meta`. A checkpoint without its configuration
/// (written before tnc recorded it) is not compared, and `warn` says so.
pub fn changed_settings(
    meta: &BTreeMap<String, String>,
    cfg: &Config,
    data: Option<&String>,
    warn: &mut dyn FnMut(&str),
) -> Result<Vec<Change>, String> {
    let Some(saved) = meta.get("config") else {
        warn("the checkpoint does not record its run's settings; they are not compared");
        return Ok(Vec::new());
    };
    let saved: serde_json::Value =
        serde_json::from_str(saved).map_err(|e| format!("the checkpoint's settings are unreadable: {e}"))?;
    let now = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let shown = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "(unset)".into(),
    };
    let mut out = Vec::new();
    for &(flag, field) in RESULT_FLAGS {
        let (was, is) = if field.is_empty() {
            (meta.get("data").cloned(), data.cloned())
        } else {
            (Some(shown(saved.get(field))), Some(shown(now.get(field))))
        };
        if was != is {
            let none = || "(unset)".to_string();
            out.push(Change { flag, was: was.unwrap_or_else(none), now: is.unwrap_or_else(none) });
        }
    }
    Ok(out)
}

/// A scalar f32 output.
fn scalar(exec: &Executor, name: &str) -> Result<f64, String> {
    let t = exec.output(name).map_err(|e| e.to_string())?;
    t.as_f32().and_then(|v| v.first()).map(|&v| v as f64).ok_or_else(|| format!("output `{name}` is not an f32 scalar"))
}

/// Parameters and AdamW moments from a checkpoint.
pub fn restore(exec: &mut Executor, ckpt: &Checkpoint, trainable: &[String]) -> Result<(), String> {
    let by_name: BTreeMap<&str, &Vec<f32>> = ckpt.tensors.iter().map(|(n, _, v)| (n.as_str(), v)).collect();
    let params: Vec<String> = exec.manifest().params.iter().map(|p| p.name.clone()).collect();
    for name in &params {
        let values = by_name.get(name.as_str()).ok_or_else(|| format!("the checkpoint has no parameter `{name}`"))?;
        exec.set_param(name, values).map_err(|e| e.to_string())?;
    }
    for name in trainable {
        for moment in ["adam_m", "adam_v"] {
            let key = format!("{moment}.{name}");
            if let Some(values) = by_name.get(key.as_str()) {
                exec.set_optimizer_buffer(&key, values).map_err(|e| e.to_string())?;
            } else {
                return Err(format!("the checkpoint has no optimizer state `{key}`"));
            }
        }
    }
    Ok(())
}

/// Mean loss and answer accuracy of `exec`'s model (dropout off) over `batches`.
pub fn evaluate(exec: &mut Executor, batches: &[Batch]) -> Result<EvalReport, String> {
    exec.set_scalar("train", 0).map_err(|e| e.to_string())?;
    let has_correct = exec.manifest().outputs.iter().any(|o| o.name == "correct");
    let (mut loss_sum, mut tokens, mut hits, mut answers, mut sequences) = (0.0, 0usize, 0usize, 0usize, 0usize);
    for b in batches {
        forward(exec, b)?;
        let n = b.predictions();
        loss_sum += scalar(exec, "loss")? * n as f64;
        tokens += n;
        sequences += b.batch;
        if has_correct {
            let c = exec.output("correct").map_err(|e| e.to_string())?;
            let c = c.as_f32().ok_or("output `correct` is not f32")?;
            if c.len() != b.answers.len() {
                return Err(format!(
                    "output `correct` has {} values, the batch scores {} predictions",
                    c.len(),
                    b.answers.len()
                ));
            }
            for (&ok, &scored) in c.iter().zip(&b.answers) {
                if scored {
                    answers += 1;
                    hits += (ok == 1.0) as usize;
                }
            }
        }
    }
    exec.set_scalar("train", 1).map_err(|e| e.to_string())?;
    Ok(EvalReport {
        loss: loss_sum / tokens.max(1) as f64,
        tokens,
        accuracy: (has_correct && answers > 0).then(|| hits as f64 / answers as f64),
        answers,
        sequences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let flags = <crate::flags::RunFlags as clap::FromArgMatches>::from_arg_matches(
            &<crate::flags::RunFlags as clap::Args>::augment_args(clap::Command::new("t")).get_matches_from(["t"]),
        )
        .unwrap();
        flags.config()
    }

    /// The settings that decide a run's result are compared, the data source too; the
    /// others (evaluation, checkpoints, threads) are not.
    #[test]
    fn changed_settings_are_the_ones_that_change_the_result() {
        let saved = config();
        let data = "copy".to_string();
        let meta = BTreeMap::from([
            ("config".to_string(), serde_json::to_string(&saved).unwrap()),
            ("data".to_string(), data.clone()),
        ]);
        let mut warnings = Vec::new();
        let mut warn = |w: &str| warnings.push(w.to_string());
        let now = Config { eval_every: 7, save_every: 3, keep_last: 9, threads: 64, ..saved.clone() };
        assert!(changed_settings(&meta, &now, Some(&data), &mut warn).unwrap().is_empty());
        let now = Config { lr: 0.5, weight_decay: 0.0, ..saved.clone() };
        let other = "mqar".to_string();
        let changed = changed_settings(&meta, &now, Some(&other), &mut warn).unwrap();
        let flags: Vec<&str> = changed.iter().map(|c| c.flag).collect();
        assert_eq!(flags, ["lr", "weight-decay", "data"]);
        assert_eq!((changed[2].was.as_str(), changed[2].now.as_str()), ("copy", "mqar"));
        // A checkpoint from before settings were recorded: not compared, and said so.
        assert!(changed_settings(&BTreeMap::new(), &now, None, &mut warn).unwrap().is_empty());
        assert!(warnings.iter().any(|w| w.contains("does not record")));
    }
}
