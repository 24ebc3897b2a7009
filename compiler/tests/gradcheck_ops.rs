//! Finite-difference gradient checks (f64, central differences, relative L2 < 1e-6) of
//! every primitive op's gradient rule, on shapes with size-1 axes, odd sizes and
//! symbolic dims. The loss is `sum(op(x) * w)` for fixed random weights `w`.

mod common;

use common::*;
use tnc_compiler::interp::EvalOptions;
use tnc_compiler::ir::{BinaryOp, DType, Dim, EinsumSpec, F64Bits, Op, ReduceOp, UnaryOp};

fn op1(op: Op) -> Box<Build<'static>> {
    Box::new(move |g, ids| g.add(op.clone(), &[ids[0]], None))
}

fn opn(op: Op) -> Box<Build<'static>> {
    Box::new(move |g, ids| g.add(op.clone(), ids, None))
}

#[test]
fn unary_ops() {
    use UnaryOp::*;
    let shape = [3, 1, 5];
    for u in [Neg, Exp, Sin, Cos, Tanh, Sigmoid, Silu] {
        let tag = format!("{u:?}");
        gradcheck(&tag, vec![x("x", normal(&tag, &shape))], &*op1(Op::Unary(u)));
    }
    for u in [Log, Sqrt, Rsqrt] {
        let tag = format!("{u:?}");
        let v = uniform(&tag, &shape, 0.3, 2.5);
        gradcheck(&tag, vec![x("x", v)], &*op1(Op::Unary(u)));
    }
    // Kinked or singular at 0: spaced values keep every input ≥ 0.05 away from it.
    for u in [Abs, Relu, Elu, Recip] {
        let tag = format!("{u:?}");
        gradcheck(&tag, vec![x("x", spaced(&tag, &[2, 7]))], &*op1(Op::Unary(u)));
    }
}

#[test]
fn arithmetic_binary_ops() {
    use BinaryOp::*;
    let shape = [2, 3];
    for op in [Add, Sub, Mul] {
        let t = format!("{op:?}");
        let args = vec![x("a", normal(&format!("{t}a"), &shape)), x("b", normal(&format!("{t}b"), &shape))];
        gradcheck(&t, args, &*opn(Op::Binary(op)));
    }
    let args = vec![x("a", normal("div a", &shape)), x("b", uniform("div b", &shape, 0.5, 2.0))];
    gradcheck("Div", args, &*opn(Op::Binary(Div)));
    let args = vec![x("a", uniform("pow a", &shape, 0.3, 2.0)), x("b", normal("pow b", &shape))];
    gradcheck("Pow", args, &*opn(Op::Binary(Pow)));
    // Max/min with |a - b| ≥ 0.1 everywhere, either one larger.
    let a = normal("maxmin a", &[3, 5]);
    let gap = spaced("maxmin gap", &[3, 5]);
    let mut b = a.clone();
    for (bi, gi) in b.data.iter_mut().zip(&gap.data) {
        *bi += gi.signum() * (0.1 + gi.abs());
    }
    for op in [Max, Min] {
        let args = vec![x("a", a.clone()), x("b", b.clone())];
        gradcheck(&format!("{op:?}"), args, &*opn(Op::Binary(op)));
    }
    // The same value as both operands: gradients from both positions accumulate.
    gradcheck("x*x", vec![x("x", normal("xx", &[4]))], &|g, ids| g.add(Op::Binary(Mul), &[ids[0], ids[0]], None));
}

#[test]
fn select_and_cast() {
    let cond = ints("cond", &[2, 5], 2);
    let args = vec![fixed("c", DType::Bool, cond), x("a", normal("sel a", &[2, 5])), x("b", normal("sel b", &[2, 5]))];
    gradcheck("select", args, &*opn(Op::Select));
    gradcheck("cast f32->f32", vec![x("x", normal("cast", &[3]))], &*op1(Op::Cast { to: DType::F32 }));
    // An i32 value cast to f32 scales x; nothing flows into the integers.
    let args = vec![x("x", normal("cast x", &[4])), fixed("i", DType::I32, ints("cast i", &[4], 5))];
    gradcheck("x * cast(i)", args, &|g, ids| {
        let c = g.add(Op::Cast { to: DType::F32 }, &[ids[1]], None)?;
        g.add(Op::Binary(BinaryOp::Mul), &[ids[0], c], None)
    });
}

#[test]
fn reductions() {
    for (i, axes) in [vec![0], vec![1], vec![0, 2], vec![0, 1, 2]].into_iter().enumerate() {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            let tag = format!("reduce {op:?} {axes:?}");
            let v = spaced(&format!("red{i}"), &[3, 1, 4]);
            let red = Op::Reduce { op, axes: axes.clone() };
            gradcheck(&tag, vec![x("x", v)], &*op1(red));
        }
    }
    // Symbolic sizes.
    let v = spaced("red sym", &[2, 5]);
    let red = Op::Reduce { op: ReduceOp::Max, axes: vec![1] };
    gradcheck("reduce sym", vec![xs("x", sym(&["B", "N"]), v)], &*op1(red));
}

fn einsum(ins: &[&str], out: &str) -> Op {
    Op::Einsum(EinsumSpec {
        inputs: ins.iter().map(|s| s.as_bytes().to_vec()).collect(),
        output: out.as_bytes().to_vec(),
        pinned: false,
    })
}

#[test]
fn einsums() {
    type Case<'a> = (&'a [&'a str], &'a str, Vec<&'a [usize]>);
    let cases: Vec<Case> = vec![
        (&["ij", "jk"], "ik", vec![&[3, 4], &[4, 5]]),
        // Batch letters, and a batch of size 1.
        (&["bij", "bjk"], "bik", vec![&[2, 3, 4], &[2, 4, 1]]),
        (&["bhnd", "bhne"], "bhde", vec![&[1, 2, 3, 2], &[1, 2, 3, 3]]),
        // Letters summed inside one operand only (s in a, t in b).
        (&["ijs", "jk"], "ik", vec![&[2, 3, 3], &[3, 2]]),
        (&["ij", "kt"], "ki", vec![&[2, 3], &[4, 5]]),
        // Outer product and an output order different from the inputs'.
        (&["i", "j"], "ji", vec![&[3], &[4]]),
        // One operand: permute with a sum, a full sum, and a no-op.
        (&["ijk"], "ki", vec![&[2, 3, 4]]),
        (&["ij"], "", vec![&[3, 5]]),
        (&["ij"], "ij", vec![&[1, 5]]),
    ];
    for (k, (ins, out, shapes)) in cases.into_iter().enumerate() {
        let tag = format!("einsum {}->{out}", ins.join(","));
        let names = ["a", "b"];
        let args = shapes.iter().enumerate().map(|(i, s)| x(names[i], normal(&format!("e{k}{i}"), s))).collect();
        gradcheck(&tag, args, &*opn(einsum(ins, out)));
    }
    // The same value as both operands.
    gradcheck("einsum ij,ij->i (x, x)", vec![x("x", normal("exx", &[3, 2]))], &|g, ids| {
        g.add(einsum(&["ij", "ij"], "i"), &[ids[0], ids[0]], None)
    });
}

#[test]
fn scans() {
    for (shape, axis) in [([2usize, 5usize], 1usize), ([4, 3], 0), ([3, 1], 1)] {
        for reverse in [false, true] {
            let tag = format!("scan {shape:?} axis {axis} reverse {reverse}");
            let v = normal(&tag, &shape);
            gradcheck(&tag, vec![x("x", v)], &*op1(Op::Scan { axis, reverse }));
            // Decayed, differentiating values and decays.
            let tag = format!("decayed {tag}");
            let args = vec![x("x", normal(&tag, &shape)), x("d", uniform(&format!("{tag} d"), &shape, 0.2, 1.2))];
            gradcheck(&tag, args, &*opn(Op::Scan { axis, reverse }));
        }
    }
    // A symbolic sequence length.
    let args = vec![
        xs("x", sym(&["B", "N"]), normal("scan sym", &[2, 6])),
        xs("d", sym(&["B", "N"]), uniform("scan sym d", &[2, 6], 0.5, 1.0)),
    ];
    gradcheck("decayed scan, symbolic", args, &*opn(Op::Scan { axis: 1, reverse: false }));
}

#[test]
fn shape_ops() {
    let v = normal("reshape", &[2, 3, 4]);
    gradcheck("reshape", vec![x("x", v)], &*op1(Op::Reshape { shape: dims(&[6, 1, 4]) }));
    let bc = Op::Broadcast { shape: dims(&[3, 4, 5]) };
    gradcheck("broadcast", vec![x("x", normal("bc", &[3, 1, 5]))], &*op1(bc));
    let bc = Op::Broadcast { shape: dims(&[2, 3]) };
    gradcheck("broadcast 1x1", vec![x("x", normal("bc11", &[1, 1]))], &*op1(bc));
    let bc = Op::Broadcast { shape: sym(&["B", "N"]) };
    let args =
        vec![xs("x", sym(&["B", "1"]), normal("bcs", &[3, 1])), xs("y", sym(&["B", "N"]), normal("bcs y", &[3, 4]))];
    // `y` only binds N; the op adds it so the loss depends on both.
    gradcheck("broadcast symbolic", args, &|g, ids| {
        let b = g.add(bc.clone(), &[ids[0]], None)?;
        g.add(Op::Binary(BinaryOp::Add), &[b, ids[1]], None)
    });
    let perm = Op::Permute { perm: vec![2, 0, 1] };
    gradcheck("permute", vec![x("x", normal("perm", &[2, 3, 4]))], &*op1(perm));
    let sl = Op::Slice { axis: 1, start: Dim::constant(2), end: Dim::constant(5) };
    gradcheck("slice", vec![x("x", normal("slice", &[2, 7]))], &*op1(sl));
    let pad = Op::Pad { axis: 0, before: Dim::constant(1), after: Dim::constant(2) };
    gradcheck("pad", vec![x("x", normal("pad", &[2, 3]))], &*op1(pad));
    // Symbolic slice `1 .. N-1` and pad.
    let n = Dim::sym("N");
    let sl = Op::Slice { axis: 1, start: Dim::constant(1), end: n.checked_sub(&Dim::constant(1)).unwrap() };
    let v = normal("slice sym", &[2, 5]);
    gradcheck("slice symbolic", vec![xs("x", sym(&["B", "N"]), v)], &*op1(sl));
    let args = vec![x("a", normal("cat a", &[2, 3])), x("b", normal("cat b", &[2, 1]))];
    gradcheck("concat", args, &|g, ids| g.add(Op::Concat { axis: 1 }, &[ids[0], ids[1], ids[0]], None));
}

#[test]
fn gather_scatters_with_repeats() {
    // Index 2 appears several times: its rows' cotangents must add up.
    let idx = tnc_compiler::interp::Tensor::new(vec![2, 3], vec![2., 0., 2., 4., 2., 1.]).unwrap();
    let args = vec![x("table", normal("table", &[5, 3])), fixed("idx", DType::I32, idx)];
    gradcheck("gather", args, &*opn(Op::Gather));
    // A rank-1 table (rows are scalars) and a scalar index.
    let args = vec![x("table", normal("table1", &[4])), fixed("idx", DType::I32, ints("idx1", &[], 4))];
    gradcheck("gather rank-1", args, &*opn(Op::Gather));
}

#[test]
fn dropout_uses_the_same_mask() {
    let op = Op::Dropout { rate: F64Bits::new(0.3), salt: 17 };
    let train = EvalOptions { dropout: Some((42, 7)), ..EvalOptions::default() };
    gradcheck_with("dropout train", vec![x("x", normal("drop", &[3, 7]))], &train, &*op1(op.clone()));
    gradcheck("dropout eval", vec![x("x", normal("drop", &[3, 7]))], &*op1(op));
}

#[test]
fn composite_with_constants_iota_and_sizes() {
    // mean over a symbolic N (SizeOf), a position ramp (Iota) and a constant: gradients
    // flow only into x, through the f32 arithmetic.
    gradcheck("x * iota / N + 2", vec![xs("x", sym(&["N"]), normal("ramp", &[5]))], &|g, ids| {
        let n = Dim::sym("N");
        let iota = g.add(Op::Iota { len: n.clone(), dtype: DType::F32 }, &[], None)?;
        let size = g.add(Op::SizeOf { size: n.clone(), dtype: DType::F32 }, &[], None)?;
        let size = g.add(Op::Reshape { shape: vec![Dim::constant(1)] }, &[size], None)?;
        let size = g.add(Op::Broadcast { shape: vec![n.clone()] }, &[size], None)?;
        let two = g.add(Op::Constant { value: F64Bits::new(2.0), dtype: DType::F32 }, &[], None)?;
        let two = g.add(Op::Reshape { shape: vec![Dim::constant(1)] }, &[two], None)?;
        let two = g.add(Op::Broadcast { shape: vec![n] }, &[two], None)?;
        let t = g.add(Op::Binary(BinaryOp::Mul), &[ids[0], iota], None)?;
        let t = g.add(Op::Binary(BinaryOp::Div), &[t, size], None)?;
        let t = g.add(Op::Unary(UnaryOp::Silu), &[t], None)?;
        g.add(Op::Binary(BinaryOp::Add), &[t, two], None)
    });
}
