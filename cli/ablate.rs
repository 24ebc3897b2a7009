//! `tnc ablate MODEL.tn --variant NAME:k=v,… --variant-file OTHER.tn[:k=v,…] … --data …
//! --steps S --out DIR`: train the model and each variant with the same seed, data and
//! budget, then print a Markdown table (variant, parameters, final train loss, eval loss
//! or accuracy, tokens/s, memory) and plot every variant's training loss in one SVG.
//!
//! `--set` values apply to every variant (so each must declare them); a variant's own
//! `k=v` pairs come after them and win. Every variant is elaborated before any trains, so
//! a bad one fails the command at once; the table is rewritten as each row finishes; and
//! `--resume` continues each variant's run (finished ones are evaluated again, not
//! retrained).

use crate::fail;
use crate::train::{train_one, write_atomically, Summary, TrainFlags};
use crate::Failure;
use indicatif::ProgressBar;
use std::fmt::Write;
use std::path::PathBuf;
use tnc_grammar::Diagnostic;

#[derive(clap::Args, Debug)]
pub struct AblateArgs {
    /// The base model (.tn); it is trained too, as the first row.
    pub model: PathBuf,
    /// Override a hyper-parameter of every variant (`name=value`); repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub sets: Vec<String>,
    /// A variant of the base model: `NAME:k=v[,k=v]…`, e.g. `no_lrpe:lrpe=false` (with
    /// `models/transnormer_t1.tn`) or `block8:block=8`. Repeatable.
    #[arg(long = "variant", value_name = "NAME:K=V,…")]
    pub variants: Vec<String>,
    /// Another model file as a variant, optionally with its own overrides:
    /// `models/transnormer_t2.tn:block=16`. Named after the file. Repeatable.
    #[arg(long = "variant-file", value_name = "FILE[:K=V,…]")]
    pub variant_files: Vec<String>,
    /// Leave the base model out (compare the variants only).
    #[arg(long)]
    pub no_base: bool,
    #[command(flatten)]
    pub flags: TrainFlags,
    /// The output directory: one run directory per variant, `ablation.md` and `loss.svg`.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue an interrupted ablation in `--out`: each variant resumes its run (one
    /// already finished is evaluated, not retrained; one not started starts).
    #[arg(long)]
    pub resume: bool,
}

struct Variant {
    name: String,
    file: PathBuf,
    sets: Vec<String>,
}

fn pairs(spec: &str, what: &str) -> Result<Vec<String>, Failure> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|kv| {
            if kv.contains('=') {
                Ok(kv.trim().to_string())
            } else {
                Err(Failure::usage(Diagnostic::error(format!("{what}: `{kv}` is not `key=value`"))))
            }
        })
        .collect()
}

/// A variant's own `k=v` pairs after the shared `--set` values: each replaces the shared
/// value of its name (the front end refuses a name set twice).
fn override_sets(sets: &mut Vec<String>, own: Vec<String>, what: &str) -> Result<(), Failure> {
    let name = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k.trim()).to_string();
    let mut names: Vec<String> = own.iter().map(|kv| name(kv)).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Failure::usage(Diagnostic::error(format!("{what} sets `{}` twice", w[0]))));
    }
    for kv in own {
        sets.retain(|s| name(s) != name(&kv));
        sets.push(kv);
    }
    Ok(())
}

/// The files an ablation writes in `--out` next to the variants' run directories.
const OUTPUT_FILES: [&str; 2] = ["ablation.md", "loss.svg"];

fn variants(args: &AblateArgs) -> Result<Vec<Variant>, Failure> {
    let stem = |p: &std::path::Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = Vec::new();
    if !args.no_base {
        out.push(Variant { name: stem(&args.model), file: args.model.clone(), sets: args.sets.clone() });
    }
    for v in &args.variants {
        let Some((name, spec)) = v.split_once(':') else {
            return Err(Failure::usage(
                Diagnostic::error(format!("`--variant {v}` has no `NAME:`"))
                    .with_hint("write `--variant relu_phi:attn.phi=relu`"),
            ));
        };
        let mut sets = args.sets.clone();
        override_sets(&mut sets, pairs(spec, &format!("--variant {v}"))?, &format!("--variant {v}"))?;
        out.push(Variant { name: name.trim().to_string(), file: args.model.clone(), sets });
    }
    for v in &args.variant_files {
        let (file, spec) = match v.rsplit_once(':') {
            Some((f, s)) if s.contains('=') => (f, s),
            _ => (v.as_str(), ""),
        };
        let file = PathBuf::from(file);
        let mut sets = args.sets.clone();
        override_sets(&mut sets, pairs(spec, &format!("--variant-file {v}"))?, &format!("--variant-file {v}"))?;
        out.push(Variant { name: stem(&file), file, sets });
    }
    // Each variant's run is the directory `--out/NAME`: a name must be one plain path
    // component, or a run would land outside `--out` (`../x`) or on top of another.
    for v in &out {
        let plain = !v.name.is_empty()
            && v.name != "."
            && v.name != ".."
            && !v.name.contains(['/', '\\', '\0'])
            && !OUTPUT_FILES.contains(&v.name.as_str());
        if !plain {
            return Err(Failure::usage(
                Diagnostic::error(format!("`{}` cannot name a variant: its run would be `--out/{}`", v.name, v.name))
                    .with_hint("a variant's name is a plain directory name, e.g. `--variant no_lrpe:lrpe=false`"),
            ));
        }
    }
    let mut names: Vec<&str> = out.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Failure::usage(Diagnostic::error(format!("two variants are called `{}`", w[0]))));
    }
    if out.is_empty() {
        return Err(Failure::usage(Diagnostic::error("nothing to train: --no-base and no variants")));
    }
    Ok(out)
}

pub fn run(args: &AblateArgs) -> Result<(), Failure> {
    let variants = variants(args)?;
    // Every variant must elaborate (its file, its `--set` values) before any trains.
    for v in &variants {
        let model = crate::ModelArgs { file: v.file.clone(), sets: v.sets.clone(), model: None };
        if let Err(mut f) = crate::elaborate(&model) {
            f.diagnostic = f.diagnostic.with_note(format!("in variant `{}`; no variant was trained", v.name));
            return Err(f);
        }
    }
    std::fs::create_dir_all(&args.out).map_err(|e| fail(format!("cannot create {}: {e}", args.out.display())))?;
    let mut results: Vec<(&Variant, Summary)> = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        eprintln!(
            "[{}/{}] {} ({}{})",
            i + 1,
            variants.len(),
            v.name,
            v.file.display(),
            if v.sets.is_empty() { String::new() } else { format!(" --set {}", v.sets.join(" ")) }
        );
        let bar = if args.flags.quiet { ProgressBar::hidden() } else { ProgressBar::new(args.flags.run.steps) };
        let s = train_one(&v.file, &v.sets, &args.flags, &args.out.join(&v.name), args.resume, &bar)?;
        results.push((v, s));
        // The rows so far, so that an interrupted ablation keeps what it finished.
        write_atomically(&args.out.join("ablation.md"), table(&results, &args.flags).as_bytes())?;
    }
    let table = table(&results, &args.flags);
    print!("{table}");
    let series: Vec<tnc_train::Series> =
        results.iter().map(|(v, s)| tnc_train::Series { label: v.name.clone(), points: s.losses.clone() }).collect();
    let title = format!(
        "training loss on {} ({} steps, B {}, N {})",
        args.flags.run.data, args.flags.run.steps, args.flags.run.batch, args.flags.run.seq
    );
    tnc_train::loss_plot(&args.out.join("loss.svg"), &title, &series).map_err(fail)?;
    println!("\nwrote {}/ablation.md and {}/loss.svg", args.out.display(), args.out.display());
    Ok(())
}

fn table(results: &[(&Variant, Summary)], flags: &TrainFlags) -> String {
    let accuracy = results.iter().any(|(_, s)| s.eval.as_ref().is_some_and(|e| e.accuracy.is_some()));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{} steps of B {} × N {} on `{}`, seed {}, lr {}\n",
        flags.run.steps, flags.run.batch, flags.run.seq, flags.run.data, flags.run.seed, flags.run.lr
    );
    let _ = writeln!(
        t,
        "| variant | parameters | final train loss | eval loss |{} tokens/s | memory (MiB) |",
        if accuracy { " eval accuracy |" } else { "" }
    );
    let _ = writeln!(t, "|---|---:|---:|---:|{}---:|---:|", if accuracy { "---:|" } else { "" });
    for (v, s) in results {
        let eval_loss = s.eval.as_ref().map_or("–".into(), |e| format!("{:.4}", e.loss));
        let acc = if accuracy {
            format!(
                " {} |",
                s.eval.as_ref().and_then(|e| e.accuracy).map_or("–".into(), |a| format!("{:.1}%", 100.0 * a))
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {:.4} | {eval_loss} |{acc} {} | {:.1} |",
            v.name,
            s.parameters,
            s.final_loss,
            s.tokens_per_s.map_or("–".into(), |t| format!("{t:.0}")),
            s.memory_bytes as f64 / 1048576.0
        );
    }
    t
}
