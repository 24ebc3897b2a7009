//! Host tensors passed into and out of executors: a row-major shape and typed data.

use crate::manifest::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// Bools and bytes.
    U8(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// An f32 tensor; panics when `data.len()` is not the product of `shape`.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match shape {shape:?}");
        Tensor { shape, data: TensorData::F32(data) }
    }

    /// An i32 tensor; panics when `data.len()` is not the product of `shape`.
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match shape {shape:?}");
        Tensor { shape, data: TensorData::I32(data) }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I32(_) => DType::I32,
            TensorData::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values when this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            TensorData::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The raw bytes in native byte order.
    pub fn bytes(&self) -> Vec<u8> {
        match &self.data {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
            TensorData::U8(v) => v.clone(),
        }
    }

    /// A tensor of `dtype` from native-order bytes (`bytes.len()` must fit the shape); 16-bit
    /// floats become f32 tensors (exactly).
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Tensor {
        let halves = || bytes.chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]]));
        let data = match dtype {
            DType::F32 => {
                TensorData::F32(bytes.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect())
            }
            DType::BF16 => TensorData::F32(halves().map(|b| half::bf16::from_bits(b).to_f32()).collect()),
            DType::F16 => TensorData::F32(halves().map(|b| half::f16::from_bits(b).to_f32()).collect()),
            DType::I32 => {
                TensorData::I32(bytes.chunks_exact(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap())).collect())
            }
            DType::U8 => TensorData::U8(bytes.to_vec()),
        };
        Tensor { shape, data }
    }
}
