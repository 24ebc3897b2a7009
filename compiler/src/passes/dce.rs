//! The `dce` pass: remove every node no output depends on. Parameters and inputs stay
//! (the side tables point at them, and an unused parameter is still part of the model).

use super::Pass;
use crate::ir::rewrite::remove_dead;
use crate::ir::Graph;
use tnc_grammar::Diagnostic;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, mut g: Graph) -> Result<Graph, Diagnostic> {
        remove_dead(&mut g);
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::verify::verify;
    use crate::ir::{DType, Dim, Init, Op, ParamInfo, TensorType, UnaryOp};

    #[test]
    fn removes_unused_values_but_keeps_params_and_inputs() {
        let ty = TensorType::new(DType::F32, vec![Dim::constant(3)]);
        let mut g = Graph::new("t");
        let x = g.add_input("x", ty.clone(), None);
        let w = g.add_param(ParamInfo {
            name: "w".into(),
            ty: ty.clone(),
            init: Init::Zeros,
            trainable: true,
            attrs: Vec::new(),
            seed: None,
            span: None,
            node: x,
        });
        let dead1 = g.add(Op::Unary(UnaryOp::Exp), &[w], None).unwrap();
        let dead2 = g.add(Op::Unary(UnaryOp::Log), &[dead1], None).unwrap();
        let live = g.add(Op::Unary(UnaryOp::Neg), &[x], None).unwrap();
        g.add_output("y", live);
        let g = Dce.run(g).unwrap();
        verify(&g).unwrap();
        assert_eq!(g.len(), 3);
        assert!(g.dag.node_weight(dead1).is_none() && g.dag.node_weight(dead2).is_none());
        assert_eq!(g.params[0].node, w);
    }
}
