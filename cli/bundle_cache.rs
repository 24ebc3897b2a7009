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
use tnc_grammar::FileId;

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

/// A training bundle for `model` and `target`, from the cache or freshly compiled.
/// `status` hears what happens ("compiling …", "using cached …").
pub fn training_bundle(
    model: &ModelArgs,
    (target, precision): (&str, tnc_compiler::passes::Policy),
    status: &mut dyn FnMut(&str),
) -> Result<PathBuf, Failure> {
    let (graph, sources) = elaborate(model)?;
    let mut h = Sha256::new();
    h.update(format!("tnc {} {}\ntarget {target}\ntrain\n", env!("CARGO_PKG_VERSION"), build_id()));
    h.update(format!("precision {}\n", precision.name()));
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
    let dir = cache_dir().join(format!("{}-{key}.tnb", graph.name));
    if tnc_runtime::Bundle::load(&dir).is_ok() {
        status(&format!("using the cached bundle {}", dir.display()));
        return Ok(dir);
    }
    let parent = cache_dir();
    std::fs::create_dir_all(&parent).map_err(|e| crate::fail(format!("cannot create {}: {e}", parent.display())))?;
    let tmp = parent.join(format!(".{}-{key}.{}.tmp", graph.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    status(&format!(
        "compiling {} for {target} (training bundle, {} products)",
        model.file.display(),
        precision.name()
    ));
    let started = std::time::Instant::now();
    let opts = tnc_compiler::driver::Options { train: true, precision, ..Default::default() };
    tnc_compiler::driver::compile(graph, target, &tmp, opts, Vec::new()).map_err(crate::compile::compile_failure)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .map_err(|e| crate::fail(format!("cannot move the bundle into {}: {e}", dir.display())))?;
    status(&format!("compiled in {:.1} s into {}", started.elapsed().as_secs_f64(), dir.display()));
    Ok(dir)
}
