//! Targets for `--target`: which CPU and features LLVM compiles for, and which CPU
//! features a bundle needs at run time (written to the manifest so the runtime can refuse
//! a bundle the host can't run).
//!
//! Names are validated here: LLVM only prints a warning for an unknown CPU name and then
//! emits baseline code, which would silently lose the target the user asked for.

#[cfg(feature = "llvm")]
use inkwell::targets::TargetMachine;

/// The `--target` names for CPUs.
pub const CPU_TARGETS: &[&str] = &["native", "x86-64-v3", "x86-64-v4"];

/// x86 features a bundle may require, as (LLVM feature name, run-time name). Run-time
/// names are those `std::is_x86_feature_detected!` accepts (see [`host_has_feature`]).
const FEATURES: &[(&str, &str)] = &[
    ("sse4.1", "sse4.1"),
    ("sse4.2", "sse4.2"),
    ("popcnt", "popcnt"),
    ("avx", "avx"),
    ("avx2", "avx2"),
    ("bmi", "bmi1"),
    ("bmi2", "bmi2"),
    ("f16c", "f16c"),
    ("fma", "fma"),
    ("lzcnt", "lzcnt"),
    ("movbe", "movbe"),
    ("avx512f", "avx512f"),
    ("avx512bw", "avx512bw"),
    ("avx512cd", "avx512cd"),
    ("avx512dq", "avx512dq"),
    ("avx512vl", "avx512vl"),
    ("avx512ifma", "avx512ifma"),
    ("avx512vbmi", "avx512vbmi"),
    ("avx512vbmi2", "avx512vbmi2"),
    ("avx512vnni", "avx512vnni"),
    ("avx512bitalg", "avx512bitalg"),
    ("avx512vpopcntdq", "avx512vpopcntdq"),
    ("avx512bf16", "avx512bf16"),
    ("avx512fp16", "avx512fp16"),
    ("gfni", "gfni"),
    ("vaes", "vaes"),
    ("vpclmulqdq", "vpclmulqdq"),
];

/// x86-64-v3 (Haswell and later): the psABI level's features beyond baseline SSE2.
const V3: &[&str] = &["sse4.1", "sse4.2", "popcnt", "avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe"];
/// x86-64-v4 adds AVX-512 F, BW, CD, DQ and VL.
const V4_EXTRA: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];

/// A CPU code-generation target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuTarget {
    /// The `--target` name it was parsed from (`native`, `x86-64-v3`, `x86-64-v4`).
    pub name: String,
    /// The LLVM target triple.
    pub triple: String,
    /// The LLVM CPU name (`x86-64-v4`, or the host's, e.g. `sapphirerapids`, for `native`).
    pub cpu: String,
    /// The LLVM feature string (`+avx2,+fma,...`), set as the `target-features` attribute.
    pub features: String,
    /// CPU features the generated code needs at run time, in `is_x86_feature_detected!`
    /// names (e.g. `avx2`, `fma`, `avx512f`), for the bundle manifest.
    pub required_features: Vec<String>,
}

fn llvm_features(names: &[&str]) -> String {
    names.iter().map(|n| format!("+{n}")).collect::<Vec<_>>().join(",")
}

/// The run-time names (`is_x86_feature_detected!`'s) of LLVM's feature names.
pub(crate) fn runtime_names(llvm_names: &[&str]) -> Vec<String> {
    FEATURES.iter().filter(|(l, _)| llvm_names.contains(l)).map(|(_, r)| r.to_string()).collect()
}

impl CpuTarget {
    /// Parse a `--target` name. Unknown names are an error listing the valid ones.
    pub fn parse(name: &str) -> Result<CpuTarget, String> {
        match name {
            "native" => CpuTarget::native(),
            "x86-64-v3" | "x86-64-v4" => {
                let mut feats: Vec<&str> = V3.to_vec();
                if name == "x86-64-v4" {
                    feats.extend_from_slice(V4_EXTRA);
                }
                Ok(CpuTarget {
                    name: name.to_string(),
                    triple: "x86_64-unknown-linux-gnu".to_string(),
                    cpu: name.to_string(),
                    features: llvm_features(&feats),
                    required_features: runtime_names(&feats),
                })
            }
            _ => Err(format!("unknown CPU target `{name}`; valid CPU targets are: {}", CPU_TARGETS.join(", "))),
        }
    }

    /// The host: its CPU name and features as LLVM detects them.
    #[cfg(feature = "llvm")]
    pub fn native() -> Result<CpuTarget, String> {
        let triple = TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned();
        if !triple.starts_with("x86_64") {
            return Err(format!("`native`: the host triple `{triple}` is not x86-64, the only CPU back end built"));
        }
        let cpu = TargetMachine::get_host_cpu_name().to_string();
        let features = TargetMachine::get_host_cpu_features().to_string();
        let enabled: Vec<&str> = features.split(',').filter_map(|f| f.strip_prefix('+')).collect();
        Ok(CpuTarget { name: "native".to_string(), triple, cpu, required_features: runtime_names(&enabled), features })
    }

    /// The host, in a build without LLVM: the features the standard library detects (the
    /// ones a bundle can require), in LLVM's names, and the generic x86-64 CPU.
    #[cfg(not(feature = "llvm"))]
    pub fn native() -> Result<CpuTarget, String> {
        if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
            return Err("`native`: the host is not x86-64 Linux, the only CPU target built".into());
        }
        let enabled: Vec<&str> =
            FEATURES.iter().filter(|(_, r)| host_has_feature(r) == Some(true)).map(|(l, _)| *l).collect();
        Ok(CpuTarget {
            name: "native".to_string(),
            triple: "x86_64-unknown-linux-gnu".to_string(),
            cpu: "x86-64".to_string(),
            required_features: runtime_names(&enabled),
            features: llvm_features(&enabled),
        })
    }

    /// Whether the code may use 512-bit vectors (AVX-512F): then functions get
    /// `prefer-vector-width=512`, without which LLVM keeps to 256-bit vectors.
    pub fn has_avx512(&self) -> bool {
        self.features.split(',').any(|f| f == "+avx512f")
    }

    /// Floats a register-blocked product may keep in accumulators: half the vector
    /// register file (`schedule/row_blocks.rs`).
    pub fn accumulator_floats(&self) -> usize {
        use crate::schedule::row_blocks::{AVX2_ACCUMULATOR_FLOATS, AVX512_ACCUMULATOR_FLOATS, SSE_ACCUMULATOR_FLOATS};
        if self.has_avx512() {
            AVX512_ACCUMULATOR_FLOATS
        } else if self.features.split(',').any(|f| f == "+avx") {
            AVX2_ACCUMULATOR_FLOATS
        } else {
            SSE_ACCUMULATOR_FLOATS
        }
    }

    /// Whether the host running this process can execute code for this target.
    pub fn host_supports(&self) -> bool {
        self.required_features.iter().all(|f| host_has_feature(f) == Some(true))
    }
}

/// Whether the host has a CPU feature named as in [`CpuTarget::required_features`];
/// `None` for a name this build does not know.
pub fn host_has_feature(name: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($n:tt),*) => {
                match name {
                    $($n => Some(std::is_x86_feature_detected!($n)),)*
                    _ => None,
                }
            };
        }
        detect!(
            "sse4.1",
            "sse4.2",
            "popcnt",
            "avx",
            "avx2",
            "bmi1",
            "bmi2",
            "f16c",
            "fma",
            "lzcnt",
            "movbe",
            "avx512f",
            "avx512bw",
            "avx512cd",
            "avx512dq",
            "avx512vl",
            "avx512ifma",
            "avx512vbmi",
            "avx512vbmi2",
            "avx512vnni",
            "avx512bitalg",
            "avx512vpopcntdq",
            "avx512bf16",
            "avx512fp16",
            "gfni",
            "vaes",
            "vpclmulqdq"
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        FEATURES.iter().any(|(_, r)| *r == name).then_some(false)
    }
}

/// The `--target` names for NVIDIA GPUs.
pub const GPU_TARGETS: &[&str] = &["sm80", "sm86", "sm89", "sm90", "sm90a"];

/// An NVIDIA GPU code-generation target: PTX for one compute capability.
///
/// Each target pins the oldest PTX ISA version that supports its architecture, so the PTX
/// loads on the oldest driver that knows the GPU (LLVM 19 would otherwise choose):
///
/// | target  | `.target` | `.version` | first CUDA |
/// |---------|-----------|------------|------------|
/// | `sm80`  | `sm_80`   | 7.0        | 11.0       |
/// | `sm86`  | `sm_86`   | 7.1        | 11.1       |
/// | `sm89`  | `sm_89`   | 7.8        | 11.8       |
/// | `sm90`  | `sm_90`   | 7.8        | 11.8       |
/// | `sm90a` | `sm_90a`  | 8.0        | 12.0       |
///
/// Newer architectures (`sm100`, `sm120`, ...) are not supported: LLVM 19's NVPTX back end
/// does not know them and, given an unknown name, only warns and emits PTX the assembler
/// rejects, so names are checked here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuTarget {
    /// The `--target` name it was parsed from (`sm80`, ..., `sm90a`).
    pub name: String,
    /// The LLVM target triple, `nvptx64-nvidia-cuda` (64-bit pointers).
    pub triple: String,
    /// The LLVM CPU name, which is the PTX `.target` (`sm_90a`).
    pub sm: String,
    /// The PTX ISA version × 10 (`80` for PTX 8.0).
    pub ptx_version: u32,
    /// The LLVM feature string pinning the PTX version, e.g. `+ptx80`.
    pub features: String,
    /// How the bundle computes dense products (`--gemm`; generated tiles unless asked).
    pub gemm: GpuGemm,
}

/// How a GPU bundle computes its dense products (the scheduler's library GEMM nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuGemm {
    /// Generated block kernels of shared-memory tiles, on tensor cores for 16-bit operands
    /// (`kernel/gemm_tiles.rs`): the bundle needs nothing but the driver.
    #[default]
    Tiles,
    /// cuBLAS calls where cuBLAS can express the product (each matrix has a unit stride),
    /// tiles elsewhere: the runtime loads libcublas when the bundle runs. For putting the
    /// tiles side by side with the vendor's library on a model's own shapes.
    Cublas,
}

impl GpuGemm {
    /// The `--gemm` value.
    pub fn name(self) -> &'static str {
        match self {
            GpuGemm::Tiles => "tiles",
            GpuGemm::Cublas => "cublas",
        }
    }
}

impl GpuTarget {
    /// Parse a `--target` name. Unknown names are an error listing the valid ones.
    pub fn parse(name: &str) -> Result<GpuTarget, String> {
        let (sm, ptx_version) = match name {
            "sm80" => ("sm_80", 70),
            "sm86" => ("sm_86", 71),
            "sm89" => ("sm_89", 78),
            "sm90" => ("sm_90", 78),
            "sm90a" => ("sm_90a", 80),
            _ => {
                let valid = GPU_TARGETS.join(", ");
                return Err(if newer_gpu_than_llvm(name) {
                    format!("{name} is not supported by LLVM 19's NVPTX back end; valid GPU targets are: {valid}")
                } else {
                    format!("unknown GPU target `{name}`; valid GPU targets are: {valid}")
                });
            }
        };
        Ok(GpuTarget {
            name: name.to_string(),
            triple: "nvptx64-nvidia-cuda".to_string(),
            sm: sm.to_string(),
            ptx_version,
            features: format!("+ptx{ptx_version}"),
            gemm: GpuGemm::Tiles,
        })
    }

    /// The compute capability × 10 (`90` for `sm_90` and `sm_90a`).
    pub fn compute_capability(&self) -> u32 {
        self.sm.trim_start_matches("sm_").trim_end_matches('a').parse().expect("a known target")
    }

    /// The most shared memory one block may use, in bytes (CUDA Programming Guide,
    /// "Technical Specifications per Compute Capability": 163 KB on 8.0, 99 KB on 8.6
    /// and 8.9, 227 KB on 9.0). Beyond 48 KB it is dynamic shared memory, opted into per
    /// function. An sm80 bundle whose kernels use more than 99 KB does not load on an 8.6
    /// or 8.9 GPU (the runtime says so, naming the target to compile for instead).
    pub fn max_shared_bytes(&self) -> usize {
        match self.compute_capability() {
            80 => 163 * 1024,
            86 | 89 => 99 * 1024,
            _ => 227 * 1024,
        }
    }
}

/// A parsed `--target`, the one place a target name is read: every layer below the
/// command line takes this, never the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu(CpuTarget),
    Gpu(GpuTarget),
}

impl Target {
    /// Parse a `--target` name: a CPU (`native`, `x86-64-v3`, `x86-64-v4`) or an NVIDIA
    /// GPU (`sm80` …). Unknown names are an error listing every valid one.
    pub fn parse(name: &str) -> Result<Target, String> {
        if CPU_TARGETS.contains(&name) {
            return CpuTarget::parse(name).map(Target::Cpu);
        }
        if GPU_TARGETS.contains(&name) || newer_gpu_than_llvm(name) {
            return GpuTarget::parse(name).map(Target::Gpu);
        }
        Err(format!(
            "unknown target `{name}`; valid CPU targets are: {}; GPU targets are: {}",
            CPU_TARGETS.join(", "),
            GPU_TARGETS.join(", ")
        ))
    }

    /// The `--target` name it was parsed from.
    pub fn name(&self) -> &str {
        match self {
            Target::Cpu(c) => &c.name,
            Target::Gpu(g) => &g.name,
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Target::Gpu(_))
    }
}

/// `sm100`, `sm_120a`, …: an NVIDIA architecture newer than LLVM 19's NVPTX back end
/// knows (its own error message says so).
fn newer_gpu_than_llvm(name: &str) -> bool {
    let digits = name.strip_prefix("sm").map(|d| d.trim_start_matches('_').trim_end_matches('a'));
    digits.and_then(|d| d.parse::<u32>().ok()).is_some_and(|cc| cc > 90)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        let v3 = CpuTarget::parse("x86-64-v3").unwrap();
        assert!(v3.required_features.contains(&"avx2".to_string()));
        assert!(v3.required_features.contains(&"fma".to_string()));
        assert!(!v3.has_avx512());
        let v4 = CpuTarget::parse("x86-64-v4").unwrap();
        for f in ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx2"] {
            assert!(v4.required_features.contains(&f.to_string()), "{f}");
        }
        assert!(v4.has_avx512());
        // Half the register file for accumulators: 16 zmm on v4, 8 ymm on v3.
        assert_eq!(v4.accumulator_floats(), 256);
        assert_eq!(v3.accumulator_floats(), 64);
        // Every run-time name is one `host_has_feature` knows.
        for (_, r) in FEATURES {
            assert!(host_has_feature(r).is_some(), "{r}");
        }
    }

    #[test]
    fn gpu_targets() {
        for (name, sm, ptx) in [
            ("sm80", "sm_80", 70),
            ("sm86", "sm_86", 71),
            ("sm89", "sm_89", 78),
            ("sm90", "sm_90", 78),
            ("sm90a", "sm_90a", 80),
        ] {
            let t = GpuTarget::parse(name).unwrap();
            assert_eq!((t.sm.as_str(), t.ptx_version, t.features.clone()), (sm, ptx, format!("+ptx{ptx}")));
            assert!(GPU_TARGETS.contains(&name));
        }
        assert_eq!(GpuTarget::parse("sm90a").unwrap().compute_capability(), 90);
        let e = GpuTarget::parse("sm100").unwrap_err();
        assert!(e.contains("sm100 is not supported by LLVM 19's NVPTX back end"), "{e}");
        assert!(e.contains("sm80, sm86, sm89, sm90, sm90a"), "{e}");
        for bad in ["sm_80", "sm75", "sm70", "native", "", "sm120a"] {
            let e = GpuTarget::parse(bad).unwrap_err();
            assert!(e.contains("sm80, sm86, sm89, sm90, sm90a"), "{e}");
        }
    }

    #[test]
    fn a_target_name_is_read_once_into_cpu_or_gpu() {
        assert!(matches!(Target::parse("x86-64-v3"), Ok(Target::Cpu(c)) if c.cpu == "x86-64-v3"));
        assert!(matches!(Target::parse("sm90a"), Ok(Target::Gpu(g)) if g.sm == "sm_90a"));
        assert_eq!(Target::parse("sm89").unwrap().name(), "sm89");
        let e = Target::parse("sm100").unwrap_err();
        assert!(e.contains("not supported by LLVM 19"), "{e}");
        for bad in ["pentium3", "sm75", "SM80", "", "x86-64-v5"] {
            let e = Target::parse(bad).unwrap_err();
            assert!(
                e.contains(&format!("`{bad}`")) && e.contains("native, x86-64-v3") && e.contains("sm80, sm86"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let e = CpuTarget::parse("x86-64-v5").unwrap_err();
        assert!(e.contains("x86-64-v5") && e.contains("native, x86-64-v3, x86-64-v4"), "{e}");
    }
}
