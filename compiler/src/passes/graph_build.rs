//! Small node builders shared by the passes that derive new programs from a forward
//! (`decode_step`, `prefill`): a scalar, a broadcast, and a product over shared batch axes.

use crate::ir::{DType, Dim, EinsumSpec, F64Bits, Graph, NodeId, Op};

/// The constant `value` as a scalar of `dtype`.
pub fn scalar(g: &mut Graph, value: f64, dtype: DType) -> Result<NodeId, String> {
    g.add(Op::Constant { value: F64Bits::new(value), dtype }, &[], None)
}

/// `x` (size-1 axes, or fewer axes: size-1 axes are put in front) broadcast to `shape`.
pub fn splat(g: &mut Graph, x: NodeId, shape: &[Dim]) -> Result<NodeId, String> {
    let t = g.ty(x).clone();
    let x = if t.rank() < shape.len() {
        let ones = vec![Dim::constant(1); shape.len() - t.rank()];
        g.add(Op::Reshape { shape: [ones, t.shape.clone()].concat() }, &[x], None)?
    } else {
        x
    };
    if g.ty(x).shape == shape {
        return Ok(x);
    }
    g.add(Op::Broadcast { shape: shape.to_vec() }, &[x], None)
}

/// An einsum over `batch` shared leading axes (letters `a`, `b`, …) and the trailing
/// letters given (which must come from `w` … `z`): `batched(2, b"xy", b"xz", b"yz")` is
/// `abxy,abxz->abyz`.
pub fn batched(batch: usize, x: &[u8], y: &[u8], out: &[u8]) -> EinsumSpec {
    debug_assert!(batch <= 20 && [x, y, out].iter().all(|l| l.iter().all(|c| (b'w'..=b'z').contains(c))));
    let lead: Vec<u8> = (0..batch as u8).map(|i| b'a' + i).collect();
    EinsumSpec {
        inputs: vec![[lead.as_slice(), x].concat(), [lead.as_slice(), y].concat()],
        output: [lead.as_slice(), out].concat(),
        pinned: true,
    }
}
