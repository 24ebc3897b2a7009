//! Element types and tensor types of IR values.

use super::dim::{shape_to_string, Dim};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// Real numbers. Kernels compute in f32; the reference interpreter in f32 or f64.
    F32,
    /// Real numbers stored in 16 bits: bfloat16 (f32's range, 8 significant bits) and
    /// IEEE half (5-bit exponent, 11 significant bits). A value of these types is an f32
    /// rounded to them (to nearest, ties to even) after every op that produces it; kernels
    /// store it in 2 bytes and compute with it in f32. The precision pass
    /// (`passes/precision.rs`) introduces them.
    BF16,
    F16,
    I32,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "bf16" => Some(DType::BF16),
            "f16" => Some(DType::F16),
            "i32" => Some(DType::I32),
            "bool" => Some(DType::Bool),
            _ => None,
        }
    }

    pub fn is_numeric(self) -> bool {
        self.is_float() || self == DType::I32
    }

    /// f32, bf16 or f16.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Bytes per element in memory (bools take one).
    pub fn bytes(self) -> i64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::Bool => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> TensorType {
        TensorType { dtype, shape }
    }

    pub fn scalar(dtype: DType) -> TensorType {
        TensorType { dtype, shape: Vec::new() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn with_dtype(&self, dtype: DType) -> TensorType {
        TensorType { dtype, shape: self.shape.clone() }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype.name(), shape_to_string(&self.shape))
    }
}
