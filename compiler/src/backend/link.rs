//! Linking CPU objects into the bundle's `kernels.so`, for every CPU back end.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `objects` linked into one shared object, its bytes (in a scratch directory, removed).
pub fn shared_object(objects: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let scratch = scratch_dir()?;
    let linked = (|| {
        let mut paths = Vec::new();
        for (i, object) in objects.iter().enumerate() {
            let path = scratch.join(format!("kernels{i}.o"));
            std::fs::write(&path, object).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            paths.push(path);
        }
        let so = scratch.join("kernels.so");
        link_shared(&paths, &so)?;
        std::fs::read(&so).map_err(|e| format!("cannot read {}: {e}", so.display()))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    linked
}

/// A fresh directory for the objects being linked.
fn scratch_dir() -> Result<PathBuf, String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("tnc-link-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    Ok(d)
}

/// Link objects into a shared object with the system C compiler driver (`$CC`, default
/// `cc`): `cc -shared -o out objects... -lm`. Generated code calls libm (expf, logf,
/// tanhf, ...), hence `-lm`. The driver is only used to link.
pub fn link_shared(objects: &[PathBuf], out: &Path) -> Result<(), String> {
    let cc = std::env::var("CC").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "cc".to_string());
    let output =
        Command::new(&cc).arg("-shared").arg("-o").arg(out).args(objects).arg("-lm").output().map_err(|e| {
            match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "linking {}: the C compiler driver `{cc}` was not found; it is needed to link kernel objects \
                 into a shared object (install gcc, e.g. with scripts/setup.sh, or set CC)",
                    out.display()
                ),
                _ => format!("linking {}: cannot run `{cc}`: {e}", out.display()),
            }
        })?;
    if !output.status.success() {
        return Err(format!(
            "linking {}: `{cc} -shared` failed ({}): {}",
            out.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}
