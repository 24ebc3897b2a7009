//! The cache of training bundles: `tnc train MODEL.tn` compiles once per distinct
//! (source text of every file the model reads, `--set` values, model name, target,
//! precision, tnc version and build) and reuses the bundle afterwards. The build is the size and time
//! of the `tnc` executable, so a rebuilt compiler never reuses bundles of the old one.
//!
//! Location: `$TNC_CACHE_DIR`, else `$XDG_CACHE_HOME/tnc`, else `~/.cache/tnc`, each with
//! `bundles/<key>.tnb` under it. A bundle is compiled into a temporary directory and
//! renamed into place, so an interrupted compile never leaves a half-written entry; a
//! cached entry that no longer loads (altered, or from an older format) is rebuilt.

use crate::{elaborate, Failure, ModelArgs};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use tnc_compiler::ir::Graph;
use tnc_compiler::pipeline::Program;
use tnc_grammar::FileId;
use tnc_grammar::{Diagnostic, SourceMap};

/// The cache directory (`…/bundles`).
pub fn cache_dir() -> PathBuf {
    let base = if let Some(d) = std::env::var_os("TNC_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("tnc")
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h).join(".cache").join("tnc")
    } else {
        std::env::temp_dir().join("tnc-cache")
    };
    base.join("bundles")
}

/// The size and modification time of the running executable (empty if unknown).
fn build_id() -> String {
    let meta = std::env::current_exe().and_then(std::fs::metadata);
    match meta {
        Ok(m) => {
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
            format!("{}-{}.{}", m.len(), t.as_secs(), t.subsec_nanos())
        }
        Err(_) => String::new(),
    }
}

/// The target, precision, code generator and GPU products a bundle is compiled with.
pub type Choices<'a> =
    (&'a str, tnc_compiler::passes::Policy, tnc_compiler::backend::CodeGen, tnc_compiler::backend::GpuGemm);

/// A training bundle for `model` and `target`, from the cache or freshly compiled.
/// `status` hears what happens ("compiling …", "using cached …").
pub fn training_bundle(model: &ModelArgs, choices: Choices, status: &mut dyn FnMut(&str)) -> Result<PathBuf, Failure> {
    let (graph, sources) = elaborate(model)?;
    fits_in_host_memory(&graph, choices.0, tnc_runtime::host_memory::available_bytes())?;
    cached_bundle(model, (graph, sources), choices, Kind::Training, status)
}

/// What a cached bundle computes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Training,
    /// A generation program (the prefill, the decode step).
    Generation(Program),
}

/// A bundle of the generation program `program` for `model` (the prefill or the decode
/// step, `tnc generate`), cached as training bundles are.
pub fn generation_bundle(
    model: &ModelArgs,
    choices: Choices,
    program: Program,
    status: &mut dyn FnMut(&str),
) -> Result<PathBuf, Failure> {
    cached_bundle(model, elaborate(model)?, choices, Kind::Generation(program), status)
}

/// `model` as elaborated (`graph`, `sources`), compiled into the cache unless it is there.
fn cached_bundle(
    model: &ModelArgs,
    (graph, sources): (Graph, SourceMap),
    (target, precision, codegen, gemm): Choices,
    kind: Kind,
    status: &mut dyn FnMut(&str),
) -> Result<PathBuf, Failure> {
    let (suffix, kind_line, kind_name) = match kind {
        Kind::Training => (String::new(), "training".to_string(), "training"),
        Kind::Generation(p) => {
            let suffix = match p {
                Program::Prefill { context } => format!("-prefill{context}"),
                Program::DecodeStep { context } => format!("-step{context}"),
                Program::NextToken => "-next-token".into(),
                Program::Model => String::new(),
            };
            (suffix, p.describe(), "generation")
        }
    };
    let mut h = Sha256::new();
    h.update(format!("tnc {} {}\ntarget {target}\n{kind_line}\n", env!("CARGO_PKG_VERSION"), build_id()));
    h.update(format!("precision {}\n", precision.name()));
    h.update(format!("backend {}\n", codegen.name()));
    if gemm != tnc_compiler::backend::GpuGemm::Tiles {
        h.update(format!("gemm {}\n", gemm.name()));
    }
    h.update(format!("model {:?}\n", model.model));
    for s in &model.sets {
        h.update(format!("set {s}\n"));
    }
    for i in 0..sources.len() {
        let f = sources.file(FileId(i as u32));
        h.update(format!("file {} {}\n", f.name, f.text.len()));
        h.update(f.text.as_bytes());
    }
    let key: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let dir = cache_dir().join(format!("{}{suffix}-{key}.tnb", graph.name));
    if tnc_runtime::Bundle::load(&dir).is_ok() {
        status(&format!("using the cached bundle {}", dir.display()));
        return Ok(dir);
    }
    let parent = cache_dir();
    std::fs::create_dir_all(&parent).map_err(|e| crate::fail(format!("cannot create {}: {e}", parent.display())))?;
    let tmp = parent.join(format!(".{}-{key}.{}.tmp", graph.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut with = if codegen == tnc_compiler::backend::CodeGen::Llvm {
        String::new()
    } else {
        format!(" with {}", codegen.name())
    };
    if gemm == tnc_compiler::backend::GpuGemm::Cublas {
        with += " with cuBLAS products";
    }
    status(&format!(
        "compiling {} for {target}{with} ({kind_name} bundle, {} products)",
        model.file.display(),
        precision.name()
    ));
    let started = std::time::Instant::now();
    let opts = tnc_compiler::driver::Options {
        train: kind == Kind::Training,
        program: match kind {
            Kind::Generation(p) => p,
            Kind::Training => Program::Model,
        },
        precision,
        codegen,
        gemm,
        ..Default::default()
    };
    tnc_compiler::driver::compile(graph, target, &tmp, opts, Vec::new()).map_err(crate::fail)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .map_err(|e| crate::fail(format!("cannot move the bundle into {}: {e}", dir.display())))?;
    status(&format!("compiled in {:.1} s into {}", started.elapsed().as_secs_f64(), dir.display()));
    Ok(dir)
}

/// Refuses, before compiling, a model whose training state cannot fit in this machine's
/// memory (`available`, when known): compiling a model with billions of vocabulary rows
/// takes minutes, and its run would fail its first allocation. A CPU run holds the whole
/// state; a GPU run holds the parameters on the host too (initialization, checkpoints).
/// The B- and N-dependent activations are checked by the runtime once the bundle loads.
pub(crate) fn fits_in_host_memory(graph: &Graph, target: &str, available: Option<u64>) -> Result<(), Failure> {
    let Some(available) = available else { return Ok(()) };
    let state = crate::check::training_state_bytes(graph);
    let (need, what) = if tnc_compiler::driver::is_gpu(target) {
        (graph.trainable_parameter_count() * 4, "its parameters (a GPU run keeps them on the host too)")
    } else {
        (state, "its training state (parameters, gradients, gradient sums and AdamW moments in f32)")
    };
    if need <= u128::from(available) {
        return Ok(());
    }
    let human = tnc_runtime::host_memory::human;
    let diagnostic = Diagnostic::error(format!(
        "training {} needs {} for {what}; this machine has {} available",
        graph.name,
        human(need),
        human(available.into())
    ))
    .with_hint(format!(
        "make the model smaller with --set (it has {} trainable parameters); `tnc check` shows where they are",
        graph.trainable_parameter_count()
    ));
    Err(Failure { diagnostic, sources: SourceMap::new(), status: 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Graph {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tnl.tn");
        let sets = ["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"].map(String::from).to_vec();
        elaborate(&ModelArgs { file, sets, model: None }).ok().expect("the tiny model elaborates").0
    }

    #[test]
    fn a_model_is_refused_when_its_training_state_exceeds_the_available_memory() {
        let g = tiny();
        let state = crate::check::training_state_bytes(&g);
        let params = g.trainable_parameter_count();
        assert!(state >= params * 20 && params > 0, "{state} {params}");
        let state = u64::try_from(state).unwrap();
        assert!(fits_in_host_memory(&g, "native", Some(state)).is_ok());
        let err = fits_in_host_memory(&g, "native", Some(state - 1)).err().expect("one byte short is refused");
        assert_eq!(err.status, 1);
        assert!(err.diagnostic.message.contains("training state"), "{}", err.diagnostic.message);
        // A GPU run needs only the parameters on the host.
        let on_host = u64::try_from(params * 4).unwrap();
        assert!(fits_in_host_memory(&g, "sm80", Some(on_host)).is_ok());
        assert!(fits_in_host_memory(&g, "sm80", Some(on_host - 1)).is_err());
        // Unknown memory refuses nothing.
        assert!(fits_in_host_memory(&g, "native", None).is_ok());
    }
}
