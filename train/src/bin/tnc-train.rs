//! `tnc-train`: trains a compiled training bundle with the runtime alone (no compiler,
//! no LLVM), so it runs on a machine that has only a GPU driver — the GPU check's
//! trainer. `tnc train` is the full command (it compiles .tn models, shows a progress
//! bar and plots); this one prints one line per step instead.
//!
//! ```text
//! tnc-train BUNDLE --device cuda|cpu --data copy --steps 200 --out RUN [--no-graphs] …
//! ```
//!
//! Every step's loss, learning rate, gradient norm and tokens per second go to standard
//! output (and `RUN/metrics.jsonl`), then the final evaluation and the memory the
//! executor allocated (all of it: the executor allocates every buffer up front, so this
//! is also its peak). Exit status 0 on success, 1 on any error, 2 on bad usage.

use clap::{Parser, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use tnc_runtime::{Bundle, Executor};
use tnc_train::flags::RunFlags;
use tnc_train::Trainer;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda,
}

/// Train a compiled tnc training bundle (runtime only).
#[derive(Parser, Debug)]
#[command(name = "tnc-train", version, about = "Train a compiled tnc training bundle (runtime only)")]
struct Args {
    /// The training bundle (`tnc compile --train`).
    bundle: PathBuf,
    /// Where to train.
    #[arg(long, value_enum)]
    device: Device,
    #[command(flatten)]
    run: RunFlags,
    /// The run directory: metrics and checkpoints go here.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in `--out` from its latest valid checkpoint.
    #[arg(long)]
    resume: bool,
    /// Launch every kernel on its own instead of replaying CUDA graphs.
    #[arg(long)]
    no_graphs: bool,
    /// Write no checkpoint (timing runs of large models).
    #[arg(long)]
    no_checkpoints: bool,
}

fn main() -> ExitCode {
    tnc_runtime::pipes::die_on_closed_pipe();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match train(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Trains; the exit status is 130 when a signal stopped the run (see `interrupt.rs`).
fn train(a: &Args) -> Result<ExitCode, String> {
    let data = a.run.data_source(&mut |w| eprintln!("warning: {w}"))?;
    let cfg = a.run.config();
    let bundle = Bundle::load(&a.bundle).map_err(|e| format!("{}: {e}", a.bundle.display()))?;
    let exec = match a.device {
        Device::Cpu => Executor::cpu(&bundle, cfg.threads),
        #[cfg(feature = "cuda")]
        Device::Cuda => tnc_runtime::CudaDevice::new(&bundle, !a.no_graphs && tnc_runtime::cuda::graphs_from_env())
            .and_then(|d| Executor::on(&bundle, Box::new(d))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => return Err("this tnc-train was built without the `cuda` feature".into()),
    }
    .map_err(|e| format!("{}: {e}", a.bundle.display()))?;
    println!("tnc-train: {} on {}", bundle.manifest.model, exec.describe_device());
    let meta = BTreeMap::from([
        ("data".to_string(), data.to_string()),
        ("bundle".to_string(), a.bundle.display().to_string()),
    ]);
    let mut trainer = Trainer::new(exec, data.clone(), cfg, &a.out, a.resume, &a.run.allow_changed, meta, &mut |w| {
        eprintln!("warning: {w}")
    })?;
    tnc_train::interrupt::install();
    while !trainer.done() {
        let r = trainer.step()?;
        println!(
            "step {} loss {:.6} lr {:.3e} grad_norm {:.4} tokens/s {:.0}",
            r.step, r.loss, r.lr, r.grad_norm, r.tokens_per_s
        );
        if trainer.eval_due() {
            let e = trainer.evaluate()?;
            let accuracy = e.accuracy.map(|a| format!(", accuracy {a:.4}")).unwrap_or_default();
            println!("eval at step {}: loss {:.6}{accuracy}", r.step, e.loss);
        }
        if trainer.save_due() && !a.no_checkpoints {
            trainer.save()?;
        }
        if tnc_train::interrupt::requested() {
            if a.no_checkpoints {
                eprintln!("tnc-train: interrupted after step {} (--no-checkpoints: nothing written)", r.step);
            } else {
                let path = trainer.save()?;
                eprintln!(
                    "tnc-train: interrupted after step {}: checkpoint {} written; continue with --resume",
                    r.step,
                    path.display()
                );
            }
            return Ok(ExitCode::from(tnc_train::interrupt::EXIT_STATUS));
        }
    }
    let bytes = trainer.executor().allocated_bytes();
    println!("allocated {bytes} bytes ({:.1} MiB)", bytes as f64 / 1048576.0);
    Ok(ExitCode::SUCCESS)
}
