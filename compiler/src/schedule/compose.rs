//! Building small regions of primitive ops (the contractions of full-sequence attention's
//! stages, `special.rs`), which the generic element lowering turns into kernels.

use crate::ir::infer::infer;
use crate::ir::region::RegionNode;
use crate::ir::{EinsumSpec, Op, Region, RegionValue, TensorType};

pub struct Composer {
    args: Vec<TensorType>,
    nodes: Vec<RegionNode>,
}

impl Composer {
    pub fn new(args: Vec<TensorType>) -> Composer {
        Composer { args, nodes: Vec::new() }
    }

    pub fn ty(&self, v: RegionValue) -> &TensorType {
        match v {
            RegionValue::Arg(i) => &self.args[i as usize],
            RegionValue::Node(i) => &self.nodes[i as usize].ty,
        }
    }

    pub fn add(&mut self, op: Op, operands: &[RegionValue]) -> Result<RegionValue, String> {
        let tys: Vec<&TensorType> = operands.iter().map(|&v| self.ty(v)).collect();
        let ty = infer(&op, &tys)?;
        self.nodes.push(RegionNode { op, operands: operands.to_vec(), ty });
        Ok(RegionValue::Node(self.nodes.len() as u32 - 1))
    }

    /// `einsum(spec)` with letters given as strings.
    pub fn einsum(&mut self, a: (&str, RegionValue), b: (&str, RegionValue), out: &str) -> Result<RegionValue, String> {
        let spec = EinsumSpec {
            inputs: vec![a.0.bytes().collect(), b.0.bytes().collect()],
            output: out.bytes().collect(),
            pinned: false,
        };
        self.add(Op::Einsum(spec), &[a.1, b.1])
    }

    pub fn finish(self, result: RegionValue) -> Region {
        Region { args: self.args, nodes: self.nodes, result }
    }
}

/// Letters for `n` batch axes followed by the given extra letters.
pub fn letters(n: usize, extra: &str) -> String {
    let batch: String = (0..n).map(|i| (b'a' + i as u8) as char).collect();
    format!("{batch}{extra}")
}
