//! The host's CPU features by name, as a bundle's manifest records them (`cpu_features`):
//! the runtime refuses a bundle whose features the host lacks, and the compiler writes
//! only the features a host can report.

/// Whether the host has CPU feature `name` (Rust's or LLVM's spelling, an optional
/// leading `+`); `None` when the name is unknown to this runtime.
pub fn host_has_feature(name: &str) -> Option<bool> {
    let name = name.strip_prefix('+').unwrap_or(name);
    detect(name)
}

#[cfg(target_arch = "x86_64")]
fn detect(name: &str) -> Option<bool> {
    macro_rules! x86 {
        ($($lit:tt $(| $alias:literal)*),* $(,)?) => {
            match name {
                $($lit $(| $alias)* => Some(std::is_x86_feature_detected!($lit)),)*
                // Always present on x86-64, or LLVM tuning flags with no instruction-set effect.
                "64bit" | "cmov" | "cx8" | "fxsr" | "mmx" | "x87" | "evex512" => Some(true),
                _ => None,
            }
        };
    }
    x86!(
        "sse",
        "sse2",
        "sse3",
        "ssse3",
        "sse4.1",
        "sse4.2",
        "sse4a",
        "popcnt",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi1" | "bmi",
        "bmi2",
        "lzcnt",
        "movbe",
        "xsave",
        "xsaveopt",
        "xsavec",
        "xsaves",
        "cmpxchg16b" | "cx16",
        "pclmulqdq",
        "aes",
        "sha",
        "adx",
        "rdrand",
        "rdseed",
        "avx512f",
        "avx512cd",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512vnni",
        "avx512bf16",
        "avx512ifma",
        "avx512vbmi",
        "avx512vbmi2",
        "avx512bitalg",
        "avx512vpopcntdq",
        "gfni",
        "vaes",
        "vpclmulqdq",
        "avxvnni",
        "tbm",
        "rtm",
    )
}

#[cfg(target_arch = "aarch64")]
fn detect(name: &str) -> Option<bool> {
    macro_rules! arm {
        ($($lit:tt),* $(,)?) => {
            match name {
                $($lit => Some(std::arch::is_aarch64_feature_detected!($lit)),)*
                "v8a" | "fp-armv8" => Some(true),
                _ => None,
            }
        };
    }
    arm!("neon", "fp", "fp16", "dotprod", "sve", "sve2", "i8mm", "bf16", "lse", "crc", "aes", "sha2", "sha3", "rdm")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect(_name: &str) -> Option<bool> {
    None
}
