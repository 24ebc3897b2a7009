//! The bundle format: `manifest.json` and the checksums that tie a bundle together.
//!
//! A bundle is a directory holding
//!
//! - `manifest.json`: a [`Manifest`] serialized with serde_json;
//! - `manifest.sha256`: the SHA-256 of `manifest.json`'s bytes in `sha256sum` form
//!   (`<64 hex digits>  manifest.json`), so `sha256sum -c manifest.sha256` checks it too;
//! - every other file, listed in [`Manifest::files`] with its SHA-256: `kernels.so`
//!   ([`CPU_KERNELS_FILE`]) for CPU targets, `kernels.ptx` ([`CUDA_KERNELS_FILE`]) for
//!   CUDA targets with, beside it, `kernel-ir.json` ([`KERNEL_IR_FILE`]: the kernel IR the
//!   PTX was written from, which the emulated GPU device runs), and safetensors files
//!   holding baked parameter values ([`InitSpec::Baked`]).
//!
//! Sizes that depend on the run-time symbols (`B`, `N`) are [`Poly`]s: polynomials with
//! integer coefficients over atoms that are a symbol or `ceil(poly / k)`, the same algebra
//! as the compiler's `Dim`. In JSON a constant is a plain integer and any other polynomial
//! is a list of terms, each `{"coeff": c, "atoms": [atom, …]}` where an atom is a symbol
//! name (`"N"`) or `{"ceil": poly, "div": k}`:
//!
//! ```json
//! [{"coeff": 4, "atoms": ["B", "N"]}, {"coeff": 64, "atoms": [{"ceil": "N", "div": 64}]}]
//! ```
//!
//! is `4*B*N + 64*ceil(N/64)`.
//!
//! Kernels all have the C calling convention
//! `void name(void **buffers, const int64_t *sizes, int64_t begin, int64_t end)`: an
//! entry-point [`Step`] names a kernel and the plan buffers bound to its buffer slots;
//! `sizes` holds the values of [`Manifest::sizes`] followed by [`Manifest::scalars`], in
//! that order; `begin..end` is a sub-range of the kernel's [`KernelEntry::extent`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

/// The version of the format this runtime writes. It reads every version from
/// [`OLDEST_READ_VERSION`] to this one; a bundle with another version is rejected (never
/// guessed at). Version 2 added launch runs ([`crate::launch_runs`]); a version-1
/// manifest is a version-2 manifest without them.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this runtime reads.
pub const OLDEST_READ_VERSION: u32 = 1;
/// The manifest's file name inside a bundle.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The file holding the manifest's own SHA-256 (`sha256sum` format).
pub const MANIFEST_CHECKSUM_FILE: &str = "manifest.sha256";
/// The shared library of a CPU bundle.
pub const CPU_KERNELS_FILE: &str = "kernels.so";
/// The PTX module of a CUDA bundle.
pub const CUDA_KERNELS_FILE: &str = "kernels.ptx";
/// A CUDA bundle's kernels in the compiler's kernel IR (serde_json), one per manifest
/// kernel in order: what the emulated GPU device (`tnc_compiler::kernel::emulated_gpu`)
/// runs. The runtime itself never reads it.
pub const KERNEL_IR_FILE: &str = "kernel-ir.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Must equal [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Version of the `tnc` that wrote the bundle (informational).
    pub tnc_version: String,
    /// The model's name.
    pub model: String,
    pub target: Target,
    /// Run-time size symbols in the order kernels receive them (e.g. `["B", "N"]`).
    pub sizes: Vec<String>,
    /// Run-time scalar arguments appended to the sizes (e.g. `["seed", "step"]`).
    pub scalars: Vec<String>,
    pub kernels: Vec<KernelEntry>,
    /// The memory plan: one entry per buffer; steps refer to buffers by index here.
    pub buffers: Vec<BufferEntry>,
    pub params: Vec<ParamEntry>,
    pub inputs: Vec<IoEntry>,
    pub outputs: Vec<IoEntry>,
    /// Entry points by name: `forward`, `backward`, `step` (optimizer), and `decode`
    /// (reserved, may be empty). Each is a list of kernel launches run in order; in JSON,
    /// repeated blocks of launches are written as runs ([`crate::launch_runs`]).
    #[serde(with = "crate::launch_runs")]
    pub entry_points: BTreeMap<String, Vec<Step>>,
    /// SHA-256 (lowercase hex) of every other file of the bundle, by file name relative
    /// to the bundle directory. The manifest's own checksum is in `manifest.sha256`.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// What the bundle computes, independent of the target: the SHA-256 of the model's
    /// graph as elaborated, the precision and whether it trains. Bundles of one model for
    /// different targets share it, so a checkpoint written on one device resumes on
    /// another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The compiler's target name, e.g. `x86-64-v4`, `native`, `sm80`.
    pub name: String,
    pub kind: TargetKind,
    /// Architecture of the kernels (`std::env::consts::ARCH` spelling: `x86_64`,
    /// `aarch64`); checked against the host when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// CPU features the host code needs (`avx2`, `avx512f`, `fma`, …; a leading `+` as in
    /// LLVM feature strings is ignored). The runtime refuses a host that lacks one.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Cpu,
    Cuda,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Cpu => "cpu",
            TargetKind::Cuda => "cuda",
        })
    }
}

/// Element type of buffers and tensors (bools are stored as one byte, `u8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    /// bfloat16 and IEEE half: 16-bit floats (buffers inside a bundle; tensors in and out
    /// are f32, and parameter files may store them widened on reading).
    BF16,
    F16,
    I32,
    U8,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U8 => "u8",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One buffer slot of a kernel's `buffers` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBuffer {
    pub elem: DType,
    pub access: Access,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelEntry {
    /// The kernel IR's name (for messages and reports).
    pub name: String,
    /// The exported symbol in `kernels.so` / the PTX entry name.
    pub symbol: String,
    /// The kernel's buffer slots, in the order of its `buffers` argument.
    pub buffers: Vec<KernelBuffer>,
    /// Iterations of the kernel's parallel loop; a launch runs a sub-range of `0..extent`.
    pub extent: Poly,
    /// Names of the launch arguments the kernel reads after the sizes and scalars; every
    /// launch of it supplies one value each ([`Step::args`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// A library node (dense GEMM) rather than generated code: the CPU executor calls a
    /// GEMM library, the CUDA executor cuBLAS, instead of a symbol of the kernels file.
    #[serde(default)]
    pub library: bool,
    /// The product a library node computes (present exactly when `library`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm: Option<GemmEntry>,
    /// Launch shape on GPUs; absent for CPU bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuLaunch>,
}

/// A library GEMM node: `C = A · B` on strided views of the kernel's buffer slots 0 (A),
/// 1 (B) and 2 (C), for every index of `batch`; see the `gemm` module for the semantics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmEntry {
    pub batch: Vec<BatchEntry>,
    /// `C += A·B` (C is read) instead of `C = A·B`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accumulate: bool,
    pub m: Poly,
    pub n: Poly,
    pub k: Poly,
    pub a: MatrixEntry,
    pub b: MatrixEntry,
    pub c: MatrixEntry,
}

/// Element (row, col) of a GEMM matrix is at `offset + row·rows + col·cols`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixEntry {
    pub offset: Poly,
    pub rows: Poly,
    pub cols: Poly,
}

/// A loop around a GEMM and the stride it adds in A, B and C.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEntry {
    pub extent: Poly,
    pub a: Poly,
    pub b: Poly,
    pub c: Poly,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuLaunch {
    pub block: [u32; 3],
    pub grid: [Poly; 3],
    pub shared_bytes: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferRole {
    /// Intermediate values (may be saved from forward for backward).
    Activation,
    /// A parameter's (or non-trainable buffer's) values; see [`ParamEntry::buffer`].
    Param,
    /// The gradient of the parameter named by [`BufferEntry::name`].
    Grad,
    /// A model input, filled by the runtime; see [`IoEntry::buffer`].
    Input,
    /// A model output, read by the runtime; see [`IoEntry::buffer`].
    Output,
    /// Scratch memory whose contents do not outlive one step.
    Workspace,
    /// Optimizer state of a training bundle (`tnc compile --train`), of constant size and
    /// kept across steps like parameters: AdamW's moments `adam_m.<param>` and
    /// `adam_v.<param>`, the gradient sums `grad_sum.<param>` of accumulation, the squared
    /// gradient norms `grad_sqnorm.<param>` and the hyper-parameters [`OPTIMIZER_HYPER`]
    /// (see [`Hyper`]).
    Optimizer,
}

/// The name of the optimizer buffer holding the f32 hyper-parameters of `step`, indexed
/// by [`Hyper`]. The runtime writes it before `grad_norm` and `step`; kernels write
/// [`Hyper::ClipFactor`] and [`Hyper::GradNorm`].
pub const OPTIMIZER_HYPER: &str = "hyper";

/// Slots of the [`OPTIMIZER_HYPER`] buffer. Training bundles run, per optimizer step:
/// `accumulate` after every `backward` (adds the gradients into `grad_sum.*`), then
/// `grad_norm` (writes `grad_sqnorm.*`, the global norm and the clipping factor), then
/// `step` (AdamW on every trainable parameter, then zeroes `grad_sum.*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Hyper {
    LearningRate = 0,
    Beta1 = 1,
    Beta2 = 2,
    Eps = 3,
    WeightDecay = 4,
    /// `1 − β1^t` for step `t` (counted from 1).
    BiasCorrection1 = 5,
    /// `1 − β2^t`.
    BiasCorrection2 = 6,
    /// Multiplies the gradient sums: `1 / K` for `K` accumulated backward passes.
    GradScale = 7,
    /// Largest global gradient norm; 0 disables clipping.
    ClipNorm = 8,
    /// Written by `grad_norm`: `min(1, clip / norm)`, or 1 without clipping.
    ClipFactor = 9,
    /// Written by `grad_norm`: the global norm of the scaled gradient.
    GradNorm = 10,
}

impl Hyper {
    /// Number of slots.
    pub const LEN: usize = 11;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferEntry {
    /// Size in bytes, a polynomial in the size symbols.
    pub bytes: Poly,
    pub role: BufferRole,
    /// The parameter, input or output it holds (for grads: the parameter's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: DType,
    /// `false` for non-trainable buffers (never updated, no gradient).
    pub trainable: bool,
    #[serde(default)]
    pub attrs: Vec<String>,
    pub init: InitSpec,
    /// A fixed seed for this tensor, used instead of the run's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Index into [`Manifest::buffers`].
    pub buffer: usize,
}

/// How a parameter gets its initial values (see [`crate::init`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum InitSpec {
    Zeros,
    Ones,
    Constant(f64),
    /// `mean + std * normal()`.
    Normal {
        mean: f64,
        std: f64,
    },
    /// `lo + (hi - lo) * uniform()`.
    Uniform {
        lo: f64,
        hi: f64,
    },
    /// Glorot-uniform: for `[…, fan_in, fan_out]` the bound is
    /// `gain * sqrt(6 / (fan_in + fan_out))`, both fans times the product of leading axes.
    Xavier {
        gain: f64,
    },
    /// Values computed at compile time, stored as tensor `tensor` of the safetensors file
    /// `file` of the bundle (e.g. LRPE's angles).
    Baked {
        file: String,
        tensor: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Poly>,
    /// Index into [`Manifest::buffers`].
    pub buffer: usize,
    /// The entry point that takes (inputs) or produces (outputs) it; `forward` when absent.
    #[serde(default = "default_entry", skip_serializing_if = "is_forward")]
    pub entry: String,
    /// An integer input that indexes tables: every value must lie in `0..b` for each `b`
    /// (evaluated at the run's sizes), checked before a run (`index_bounds.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounds: Vec<Poly>,
}

fn default_entry() -> String {
    "forward".into()
}

fn is_forward(s: &String) -> bool {
    s == "forward"
}

/// One kernel launch: `buffers[i]` is the plan buffer bound to the kernel's slot `i`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub kernel: usize,
    pub buffers: Vec<usize>,
    /// Launch arguments: appended to the sizes and scalars for this launch only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<i64>,
}

// ---------------------------------------------------------------------------------------
// Polynomials

/// A polynomial in run-time size symbols; see the module documentation for its JSON form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Poly {
    pub terms: Vec<Term>,
}

/// `coeff * atoms[0] * atoms[1] * …` (the empty product is 1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Term {
    pub coeff: i64,
    #[serde(default)]
    pub atoms: Vec<Atom>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Atom {
    /// A run-time symbol such as `B` or `N`.
    Sym(String),
    /// `ceil(ceil / div)` with `div > 0`.
    CeilDiv { ceil: Poly, div: i64 },
}

/// Why a [`Poly`] could not be evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolyError {
    UnknownSymbol(String),
    Overflow(String),
    BadDivisor(i64),
}

impl fmt::Display for PolyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolyError::UnknownSymbol(s) => write!(f, "size symbol `{s}` has no value"),
            PolyError::Overflow(p) => write!(f, "overflow evaluating `{p}`"),
            PolyError::BadDivisor(k) => write!(f, "ceil division by {k} (must be positive)"),
        }
    }
}

impl std::error::Error for PolyError {}

impl Poly {
    pub fn constant(c: i64) -> Poly {
        Poly { terms: if c == 0 { vec![] } else { vec![Term { coeff: c, atoms: vec![] }] } }
    }

    pub fn sym(name: impl Into<String>) -> Poly {
        Poly { terms: vec![Term { coeff: 1, atoms: vec![Atom::Sym(name.into())] }] }
    }

    /// `coeff * atoms…` as a one-term polynomial.
    pub fn term(coeff: i64, atoms: Vec<Atom>) -> Poly {
        Poly { terms: vec![Term { coeff, atoms }] }
    }

    /// `ceil(p / k)` as a one-term polynomial.
    pub fn ceil_div(p: Poly, k: i64) -> Poly {
        Poly::term(1, vec![Atom::CeilDiv { ceil: p, div: k }])
    }

    /// The sum of two polynomials (terms are concatenated, not normalized).
    pub fn plus(mut self, other: Poly) -> Poly {
        self.terms.extend(other.terms);
        self
    }

    /// The value when it depends on no symbol.
    pub fn as_const(&self) -> Option<i64> {
        if self.terms.iter().all(|t| t.atoms.is_empty()) {
            self.terms.iter().try_fold(0i64, |a, t| a.checked_add(t.coeff))
        } else {
            None
        }
    }

    /// The symbol's name when this is exactly `1 * sym`.
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.as_slice() {
            [Term { coeff: 1, atoms }] => match atoms.as_slice() {
                [Atom::Sym(s)] => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value for the given symbol values, with checked arithmetic.
    pub fn eval(&self, env: &HashMap<&str, i64>) -> Result<i64, PolyError> {
        let overflow = || PolyError::Overflow(self.to_string());
        let mut sum: i64 = 0;
        for t in &self.terms {
            let mut v = t.coeff;
            for a in &t.atoms {
                let x = match a {
                    Atom::Sym(s) => *env.get(s.as_str()).ok_or_else(|| PolyError::UnknownSymbol(s.clone()))?,
                    Atom::CeilDiv { ceil, div } => {
                        if *div <= 0 {
                            return Err(PolyError::BadDivisor(*div));
                        }
                        let p = ceil.eval(env)?;
                        // ceil(p / k) = -floor(-p / k) for k > 0.
                        p.checked_neg().ok_or_else(overflow)?.div_euclid(*div).checked_neg().ok_or_else(overflow)?
                    }
                };
                v = v.checked_mul(x).ok_or_else(overflow)?;
            }
            sum = sum.checked_add(v).ok_or_else(overflow)?;
        }
        Ok(sum)
    }
}

impl From<i64> for Poly {
    fn from(c: i64) -> Poly {
        Poly::constant(c)
    }
}

impl fmt::Display for Poly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        for (i, t) in self.terms.iter().enumerate() {
            let mag = t.coeff.unsigned_abs();
            f.write_str(match (i, t.coeff < 0) {
                (0, false) => "",
                (0, true) => "-",
                (_, false) => " + ",
                (_, true) => " - ",
            })?;
            let mut first = true;
            if mag != 1 || t.atoms.is_empty() {
                write!(f, "{mag}")?;
                first = false;
            }
            for a in &t.atoms {
                if !first {
                    f.write_str("*")?;
                }
                first = false;
                match a {
                    Atom::Sym(s) => f.write_str(s)?,
                    Atom::CeilDiv { ceil, div } => write!(f, "ceil(({ceil})/{div})")?,
                }
            }
        }
        Ok(())
    }
}

/// The JSON form: an integer for constants, a string for a lone symbol, else a list of
/// terms.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PolyRepr {
    Const(i64),
    Sym(String),
    Terms(Vec<Term>),
}

impl Serialize for Poly {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let Some(c) = self.as_const() {
            PolyRepr::Const(c).serialize(s)
        } else if let Some(name) = self.as_sym() {
            name.serialize(s)
        } else {
            self.terms.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Poly {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Poly, D::Error> {
        Ok(match PolyRepr::deserialize(d)? {
            PolyRepr::Const(c) => Poly::constant(c),
            PolyRepr::Sym(name) => Poly::sym(name),
            PolyRepr::Terms(terms) => Poly { terms },
        })
    }
}

// ---------------------------------------------------------------------------------------
// Checksums and writing

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Manifest {
    /// Bytes of every buffer the executor allocates (parameters, gradients, optimizer
    /// state, activations, workspaces) at the sizes `env`, before allocating any.
    pub fn bytes_at(&self, env: &HashMap<&str, i64>) -> Result<u128, String> {
        let mut total: u128 = 0;
        for (i, b) in self.buffers.iter().enumerate() {
            let v = b.bytes.eval(env).map_err(|e| format!("size of buffer {i}: {e}"))?;
            total += u128::try_from(v).map_err(|_| format!("buffer {i} would have {v} bytes"))?;
        }
        Ok(total)
    }

    /// Structural checks that need no files: indices in range, steps matching their
    /// kernels' slot counts, names unique. Returns the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        let nb = self.buffers.len();
        let mut seen = std::collections::HashSet::new();
        for p in &self.params {
            if !seen.insert(p.name.as_str()) {
                return Err(format!("parameter `{}` is listed twice", p.name));
            }
            if p.buffer >= nb {
                return Err(format!("parameter `{}` names buffer {} of {nb}", p.name, p.buffer));
            }
            if p.shape.iter().any(|&d| d < 0) {
                return Err(format!("parameter `{}` has a negative size in {:?}", p.name, p.shape));
            }
        }
        for (what, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            let mut seen = std::collections::HashSet::new();
            for io in list.iter() {
                if !seen.insert(io.name.as_str()) {
                    return Err(format!("{what} `{}` is listed twice", io.name));
                }
                if io.buffer >= nb {
                    return Err(format!("{what} `{}` names buffer {} of {nb}", io.name, io.buffer));
                }
            }
        }
        for k in &self.kernels {
            if k.library != k.gemm.is_some() {
                return Err(format!("kernel `{}`: a library node must have a `gemm` entry, and only it", k.name));
            }
            if let Some(g) = &k.gemm {
                let c = if g.accumulate { Access::ReadWrite } else { Access::Write };
                let slots: Vec<_> = k.buffers.iter().map(|b| (b.elem, b.access)).collect();
                let ok = [DType::F32, DType::BF16, DType::F16]
                    .iter()
                    .any(|&t| slots == [(t, Access::Read), (t, Access::Read), (DType::F32, c)]);
                if !ok {
                    return Err(format!(
                        "library kernel `{}` must take buffers (in T, in T, {c:?} f32) with T f32, bf16 or f16",
                        k.name
                    ));
                }
            }
        }
        for (name, steps) in &self.entry_points {
            for (i, s) in steps.iter().enumerate() {
                let k = self.kernels.get(s.kernel).ok_or_else(|| {
                    format!("entry `{name}` step {i} names kernel {} of {}", s.kernel, self.kernels.len())
                })?;
                if s.buffers.len() != k.buffers.len() {
                    return Err(format!(
                        "entry `{name}` step {i} binds {} buffers to kernel `{}`, which takes {}",
                        s.buffers.len(),
                        k.name,
                        k.buffers.len()
                    ));
                }
                if s.args.len() != k.args.len() {
                    return Err(format!(
                        "entry `{name}` step {i} passes {} launch arguments to kernel `{}`, which reads {}",
                        s.args.len(),
                        k.name,
                        k.args.len()
                    ));
                }
                if k.library && (s.buffers[2] == s.buffers[0] || s.buffers[2] == s.buffers[1]) {
                    return Err(format!(
                        "entry `{name}` step {i} binds library kernel `{}`'s output to one of its inputs",
                        k.name
                    ));
                }
                if let Some(&b) = s.buffers.iter().find(|&&b| b >= nb) {
                    return Err(format!("entry `{name}` step {i} names buffer {b} of {nb}"));
                }
            }
        }
        for f in self.files.keys() {
            let p = Path::new(f);
            if f == MANIFEST_FILE
                || f == MANIFEST_CHECKSUM_FILE
                || p.is_absolute()
                || p.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(format!("file entry `{f}` is not a plain relative path inside the bundle"));
            }
        }
        Ok(())
    }

    /// Writes a bundle into `dir` (created if needed): the given files, then the manifest
    /// with `files` set to their checksums, then `manifest.sha256`.
    pub fn write_bundle(&self, dir: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        // Files of a bundle this one replaces (another target's `kernels.so` or
        // `kernels.ptx`): removed once the new manifest is written. Only names the old
        // manifest lists, so nothing else in the directory is touched.
        let stale = previous_files(dir);
        let mut m = self.clone();
        m.files.clear();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes)?;
            m.files.insert(name.to_string(), sha256_hex(bytes));
        }
        let json = serde_json::to_vec_pretty(&m).map_err(std::io::Error::other)?;
        write_manifest_bytes(dir, &json)?;
        for name in stale.iter().filter(|n| !m.files.contains_key(*n)) {
            let _ = std::fs::remove_file(dir.join(name));
        }
        Ok(())
    }
}

/// Writes `manifest.json` with exactly these bytes and its `manifest.sha256`.
/// The file names the manifest in `dir` lists, if there is one (plain names only: a
/// corrupt manifest cannot point outside the directory).
fn previous_files(dir: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(dir.join(MANIFEST_FILE)) else { return Vec::new() };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return Vec::new() };
    let Some(files) = value.get("files").and_then(|f| f.as_object()) else { return Vec::new() };
    let plain = |n: &&String| {
        let p = Path::new(n.as_str());
        p.components().count() == 1 && p.file_name().is_some_and(|f| f == n.as_str()) && n.as_str() != MANIFEST_FILE
    };
    files.keys().filter(plain).cloned().collect()
}

pub fn write_manifest_bytes(dir: &Path, json: &[u8]) -> std::io::Result<()> {
    std::fs::write(dir.join(MANIFEST_FILE), json)?;
    std::fs::write(dir.join(MANIFEST_CHECKSUM_FILE), format!("{}  {MANIFEST_FILE}\n", sha256_hex(json)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(b: i64, n: i64) -> HashMap<&'static str, i64> {
        HashMap::from([("B", b), ("N", n)])
    }

    #[test]
    fn poly_json_and_eval() {
        let p = Poly::term(4, vec![Atom::Sym("B".into()), Atom::Sym("N".into())])
            .plus(Poly::term(64, vec![Atom::CeilDiv { ceil: Poly::sym("N"), div: 64 }]))
            .plus(Poly::constant(-3));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"[{"coeff":4,"atoms":["B","N"]},{"coeff":64,"atoms":[{"ceil":"N","div":64}]},{"coeff":-3,"atoms":[]}]"#
        );
        let back: Poly = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.eval(&env(2, 65)).unwrap(), 4 * 2 * 65 + 128 - 3);
        assert_eq!(p.eval(&env(2, 64)).unwrap(), 4 * 2 * 64 + 64 - 3);
        assert_eq!(p.to_string(), "4*B*N + 64*ceil((N)/64) - 3");
        assert_eq!(Poly::ceil_div(Poly::sym("N"), 4).eval(&env(1, -5)).unwrap(), -1);
        assert_eq!(serde_json::to_string(&Poly::constant(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<Poly>("7").unwrap(), Poly::constant(7));
        assert_eq!(serde_json::to_string(&Poly::sym("N")).unwrap(), r#""N""#);
        assert_eq!(serde_json::from_str::<Poly>(r#""N""#).unwrap(), Poly::sym("N"));
        assert_eq!(Poly::constant(0).eval(&HashMap::new()).unwrap(), 0);
    }

    #[test]
    fn poly_errors() {
        let p = Poly::term(1, vec![Atom::Sym("B".into()), Atom::Sym("N".into())]);
        assert_eq!(p.eval(&HashMap::from([("B", 3)])), Err(PolyError::UnknownSymbol("N".into())));
        assert!(matches!(p.eval(&env(i64::MAX, 2)), Err(PolyError::Overflow(_))));
        let p = Poly::term(i64::MAX, vec![]).plus(Poly::constant(1));
        assert!(matches!(p.eval(&HashMap::new()), Err(PolyError::Overflow(_))));
        assert_eq!(Poly::ceil_div(Poly::sym("N"), 0).eval(&env(1, 1)), Err(PolyError::BadDivisor(0)));
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
