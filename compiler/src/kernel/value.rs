//! The values the reference executor computes with: host buffers, a variable's value,
//! and the dense per-variable slots it keeps them in.

use super::ir::*;

/// A host buffer of one element type; 16-bit floats are kept as their bit patterns.
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    BF16(Vec<u16>),
    F16(Vec<u16>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

impl Buffer {
    pub fn zeros(elem: Elem, len: usize) -> Buffer {
        match elem {
            Elem::F32 => Buffer::F32(vec![0.0; len]),
            Elem::BF16 => Buffer::BF16(vec![0; len]),
            Elem::F16 => Buffer::F16(vec![0; len]),
            Elem::I32 => Buffer::I32(vec![0; len]),
            Elem::U8 => Buffer::U8(vec![0; len]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::BF16(v) | Buffer::F16(v) => v.len(),
            Buffer::I32(v) => v.len(),
            Buffer::U8(v) => v.len(),
        }
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            Buffer::F32(_) | Buffer::I32(_) => 4,
            Buffer::BF16(_) | Buffer::F16(_) => 2,
            Buffer::U8(_) => 1,
        }
    }

    /// The first element, for code that runs a kernel on these buffers natively.
    pub fn as_mut_ptr(&mut self) -> *mut std::ffi::c_void {
        match self {
            Buffer::F32(v) => v.as_mut_ptr().cast(),
            Buffer::BF16(v) | Buffer::F16(v) => v.as_mut_ptr().cast(),
            Buffer::I32(v) => v.as_mut_ptr().cast(),
            Buffer::U8(v) => v.as_mut_ptr().cast(),
        }
    }

    /// A 16-bit float buffer's values as f32 (exact), for comparisons.
    pub fn widened(&self) -> Option<Vec<f32>> {
        match self {
            Buffer::F32(v) => Some(v.clone()),
            Buffer::BF16(v) => Some(v.iter().map(|&b| super::math::bf16_value(b)).collect()),
            Buffer::F16(v) => Some(v.iter().map(|&b| super::math::f16_value(b)).collect()),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Values by variable, in a vector indexed by the variable's number (kernels number their
/// variables densely from 0), which is several times faster than hashing.
#[derive(Clone, Debug)]
pub(super) struct Slots<T>(Vec<Option<T>>);

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots(Vec::new())
    }
}

impl<T> Slots<T> {
    pub(super) fn get(&self, v: Var) -> Option<&T> {
        self.0.get(v.0 as usize)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, v: Var) -> Option<&mut T> {
        self.0.get_mut(v.0 as usize)?.as_mut()
    }

    pub(super) fn contains(&self, v: Var) -> bool {
        self.get(v).is_some()
    }

    pub(super) fn insert(&mut self, v: Var, value: T) {
        let i = v.0 as usize;
        if i >= self.0.len() {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(value);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Val {
    F(f32),
    I(i64),
    B(bool),
}

impl Val {
    pub(super) fn f(self) -> Result<f32, String> {
        match self {
            Val::F(x) => Ok(x),
            v => Err(format!("expected an f32, got {v:?}")),
        }
    }
    pub(super) fn i(self) -> Result<i64, String> {
        match self {
            Val::I(x) => Ok(x),
            v => Err(format!("expected an integer, got {v:?}")),
        }
    }
    pub(super) fn b(self) -> Result<bool, String> {
        match self {
            Val::B(x) => Ok(x),
            v => Err(format!("expected a bool, got {v:?}")),
        }
    }
}
