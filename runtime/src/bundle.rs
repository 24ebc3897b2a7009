//! Loading and verifying a bundle directory (see [`crate::manifest`] for the format).

use crate::manifest::{
    sha256_hex, Manifest, TargetKind, CPU_KERNELS_FILE, FORMAT_VERSION, MANIFEST_CHECKSUM_FILE, MANIFEST_FILE,
    OLDEST_READ_VERSION,
};
use std::fmt;
use std::path::{Path, PathBuf};
pub use tnc_bundle::cpu_features::host_has_feature;

/// A verified bundle: its manifest parsed, every file's checksum checked, and the host's
/// CPU features checked against the target's.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Why a bundle could not be loaded.
#[derive(Debug)]
pub enum BundleError {
    /// A file could not be read.
    Io { path: PathBuf, error: std::io::Error },
    /// The directory has no `manifest.json`: it is not a bundle (or not yet a whole one).
    NotABundle { dir: PathBuf },
    /// `manifest.json` is not a valid manifest.
    Parse { path: PathBuf, message: String },
    /// The manifest's format version is not the one this runtime reads.
    FormatVersion { found: u64, expected: u32 },
    /// A file's contents do not match its recorded SHA-256 (truncated, altered or replaced).
    Checksum { file: String, expected: String, actual: String },
    /// A file the bundle needs has no checksum entry (so it cannot be trusted).
    Unlisted { file: String },
    /// The manifest is well-formed JSON but inconsistent (an index out of range, …).
    Invalid(String),
    /// The bundle targets another kind of device than the executor runs on.
    TargetKind { expected: TargetKind, found: TargetKind, target: String },
    /// The bundle's kernels are for another architecture.
    Arch { bundle: String, host: String },
    /// The host lacks CPU features the bundle was compiled for.
    CpuFeatures { target: String, missing: Vec<String> },
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BundleError::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            BundleError::NotABundle { dir } => write!(
                f,
                "{} is not a bundle: it has no {MANIFEST_FILE} (a bundle is the directory `tnc compile MODEL.tn --target T -o DIR` writes)",
                dir.display()
            ),
            BundleError::Parse { path, message } => write!(f, "{} is not a valid manifest: {message}", path.display()),
            BundleError::FormatVersion { found, expected } => write!(
                f,
                "bundle format version {found} is not supported (this runtime reads versions {OLDEST_READ_VERSION} to {expected}); \
                 recompile the model with a matching tnc"
            ),
            BundleError::Checksum { file, expected, actual } => write!(
                f,
                "bundle file `{file}` is corrupt: its SHA-256 is {actual}, the bundle records {expected} \
                 (truncated or altered?)"
            ),
            BundleError::Unlisted { file } => write!(f, "bundle file `{file}` has no checksum in the manifest"),
            BundleError::Invalid(m) => write!(f, "invalid manifest: {m}"),
            BundleError::TargetKind { expected, found, target } => write!(
                f,
                "bundle was compiled for a {found} target (`{target}`); the {expected} executor cannot run it"
            ),
            BundleError::Arch { bundle, host } => {
                write!(f, "bundle was compiled for {bundle}, but this host is {host}")
            }
            BundleError::CpuFeatures { target, missing } => write!(
                f,
                "this CPU lacks features the bundle (target `{target}`) needs: {}; recompile for this host \
                 (e.g. `--target native`)",
                missing.join(", ")
            ),
        }
    }
}

impl std::error::Error for BundleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BundleError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, BundleError> {
    std::fs::read(path).map_err(|error| BundleError::Io { path: path.to_path_buf(), error })
}

impl Bundle {
    /// Loads and verifies the bundle in `dir`: `manifest.json` against `manifest.sha256`,
    /// its format version, its structure, every listed file's checksum, and the host's CPU
    /// features. Does not check the target kind (see [`Bundle::check_kind`]).
    pub fn load(dir: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let mpath = dir.join(MANIFEST_FILE);
        if dir.is_dir() && !mpath.exists() {
            return Err(BundleError::NotABundle { dir });
        }
        let bytes = read(&mpath)?;
        let sums = read(&dir.join(MANIFEST_CHECKSUM_FILE))?;
        let expected = String::from_utf8_lossy(&sums).split_whitespace().next().unwrap_or("").to_ascii_lowercase();
        let actual = sha256_hex(&bytes);
        if expected != actual {
            return Err(BundleError::Checksum { file: MANIFEST_FILE.into(), expected, actual });
        }
        // The version first, so a future format fails as such rather than as a parse error.
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| BundleError::Parse { path: mpath.clone(), message: e.to_string() })?;
        match value.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if (OLDEST_READ_VERSION as u64..=FORMAT_VERSION as u64).contains(&v) => {}
            Some(v) => return Err(BundleError::FormatVersion { found: v, expected: FORMAT_VERSION }),
            None => {
                return Err(BundleError::Parse {
                    path: mpath,
                    message: "missing or non-integer `format_version`".into(),
                })
            }
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| BundleError::Parse { path: mpath.clone(), message: e.to_string() })?;
        manifest.validate().map_err(BundleError::Invalid)?;
        let kernels_file = match manifest.target.kind {
            TargetKind::Cpu => CPU_KERNELS_FILE,
            TargetKind::Cuda => crate::manifest::CUDA_KERNELS_FILE,
        };
        let has_kernels = manifest.kernels.iter().any(|k| !k.library);
        if has_kernels && !manifest.files.contains_key(kernels_file) {
            return Err(BundleError::Unlisted { file: kernels_file.into() });
        }
        for p in &manifest.params {
            if let crate::manifest::InitSpec::Baked { file, .. } = &p.init {
                if !manifest.files.contains_key(file) {
                    return Err(BundleError::Unlisted { file: file.clone() });
                }
            }
        }
        for (file, expected) in &manifest.files {
            let actual = sha256_hex(&read(&dir.join(file))?);
            if !expected.eq_ignore_ascii_case(&actual) {
                return Err(BundleError::Checksum { file: file.clone(), expected: expected.clone(), actual });
            }
        }
        let bundle = Bundle { dir, manifest };
        bundle.check_host_cpu()?;
        Ok(bundle)
    }

    /// [`Bundle::load`] and [`Bundle::check_kind`]`(Cpu)`.
    pub fn load_cpu(dir: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let b = Bundle::load(dir)?;
        b.check_kind(TargetKind::Cpu)?;
        Ok(b)
    }

    /// An error unless the bundle targets `kind`.
    pub fn check_kind(&self, kind: TargetKind) -> Result<(), BundleError> {
        let t = &self.manifest.target;
        if t.kind != kind {
            return Err(BundleError::TargetKind { expected: kind, found: t.kind, target: t.name.clone() });
        }
        Ok(())
    }

    /// An error unless this host has the bundle's architecture (when recorded) and every
    /// CPU feature it lists.
    pub fn check_host_cpu(&self) -> Result<(), BundleError> {
        let t = &self.manifest.target;
        if let Some(arch) = &t.arch {
            if t.kind == TargetKind::Cpu && arch != std::env::consts::ARCH {
                return Err(BundleError::Arch { bundle: arch.clone(), host: std::env::consts::ARCH.into() });
            }
        }
        let missing: Vec<String> = t
            .cpu_features
            .iter()
            .filter_map(|f| match host_has_feature(f) {
                Some(true) => None,
                Some(false) => Some(f.clone()),
                None => Some(format!("{f} (unknown to this runtime)")),
            })
            .collect();
        if !missing.is_empty() {
            return Err(BundleError::CpuFeatures { target: t.name.clone(), missing });
        }
        Ok(())
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}
