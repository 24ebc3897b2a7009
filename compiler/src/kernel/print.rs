//! Text form of kernels, for `tnc ir --after schedule` and snapshot tests.

use super::ir::*;
use std::fmt::Write;

fn scalar(s: Scalar) -> &'static str {
    match s {
        Scalar::F32 => "f32",
        Scalar::I32 => "i32",
        Scalar::I64 => "i64",
        Scalar::Bool => "bool",
    }
}

/// The element type's name in kernel text, the manifest and case files.
pub fn elem(e: Elem) -> &'static str {
    match e {
        Elem::F32 => "f32",
        Elem::BF16 => "bf16",
        Elem::F16 => "f16",
        Elem::I32 => "i32",
        Elem::U8 => "u8",
    }
}

pub fn expr(k: &Kernel, e: &Expr) -> String {
    match e {
        Expr::F32(x) => format!("{x:?}f"),
        Expr::I64(i) => format!("{i}"),
        Expr::Bool(b) => format!("{b}"),
        Expr::Var(v) => format!("{v}"),
        Expr::Thread => "thread".to_string(),
        Expr::Size(i) => {
            k.sizes.get(*i).or_else(|| k.scalars.get(*i - k.sizes.len())).cloned().unwrap_or_else(|| format!("size{i}"))
        }
        Expr::Load { buffer, index } => format!("{}[{}]", k.buffers[*buffer].name, expr(k, index)),
        Expr::LoadArray { array, index } => format!("{array}[{}]", expr(k, index)),
        Expr::Unary(op, a) => format!("{}({})", format!("{op:?}").to_lowercase(), expr(k, a)),
        Expr::Binary(op, a, b) => {
            let sym = match op {
                Binary::Add => "+",
                Binary::Sub => "-",
                Binary::Mul => "*",
                Binary::Div => "/",
                Binary::Rem => "%",
                Binary::Lt => "<",
                Binary::Le => "<=",
                Binary::Gt => ">",
                Binary::Ge => ">=",
                Binary::Eq => "==",
                Binary::Ne => "!=",
                Binary::And => "&&",
                Binary::Or => "||",
                Binary::Max => return format!("max({}, {})", expr(k, a), expr(k, b)),
                Binary::Min => return format!("min({}, {})", expr(k, a), expr(k, b)),
                Binary::Pow => return format!("pow({}, {})", expr(k, a), expr(k, b)),
            };
            format!("({} {sym} {})", expr(k, a), expr(k, b))
        }
        Expr::Select(c, a, b) => format!("({} ? {} : {})", expr(k, c), expr(k, a), expr(k, b)),
        Expr::MulAdd(a, b, c) => format!("fma({}, {}, {})", expr(k, a), expr(k, b), expr(k, c)),
        Expr::Cast(s, a) => format!("{}({})", scalar(*s), expr(k, a)),
        Expr::DropoutKeep { seed, salt, index, step, rate } => format!(
            "dropout_keep(seed={}, salt={salt:#x}, index={}, step={}, rate={rate})",
            expr(k, seed),
            expr(k, index),
            expr(k, step)
        ),
    }
}

fn stmts(k: &Kernel, body: &[Stmt], depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    for s in body {
        match s {
            Stmt::For { var, extent, kind, body } => {
                let kind = match kind {
                    LoopKind::Serial => "",
                    LoopKind::Parallel => " parallel",
                    LoopKind::Vector => " vector",
                };
                let _ = writeln!(out, "{pad}for{kind} {var} in 0..{} {{", expr(k, extent));
                stmts(k, body, depth + 1, out);
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::Let { var, value } => {
                let _ = writeln!(out, "{pad}let {var} = {}", expr(k, value));
            }
            Stmt::Mut { var, ty, init } => {
                let _ = writeln!(out, "{pad}var {var}: {} = {}", scalar(*ty), expr(k, init));
            }
            Stmt::Assign { var, value } => {
                let _ = writeln!(out, "{pad}{var} = {}", expr(k, value));
            }
            Stmt::Store { buffer, index, value } => {
                let _ = writeln!(out, "{pad}{}[{}] = {}", k.buffers[*buffer].name, expr(k, index), expr(k, value));
            }
            Stmt::Array { var, elem, len } => {
                let _ = writeln!(out, "{pad}array {var}: [{}; {len}]", scalar(*elem));
            }
            Stmt::StoreArray { array, index, value } => {
                let _ = writeln!(out, "{pad}{array}[{}] = {}", expr(k, index), expr(k, value));
            }
            Stmt::Shared { var, elem, len } => {
                let _ = writeln!(out, "{pad}shared {var}: [{}; {len}]", scalar(*elem));
            }
            Stmt::Barrier => {
                let _ = writeln!(out, "{pad}barrier");
            }
            Stmt::Mma { input, acc, a, b } => {
                let list = |vs: &[Var]| vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
                let input = format!("{input:?}").to_lowercase();
                let _ = writeln!(out, "{pad}mma.m16n8k16.{input} [{}] += [{}] · [{}]", list(acc), list(a), list(b));
            }
            Stmt::If { cond, then, otherwise } => {
                let _ = writeln!(out, "{pad}if {} {{", expr(k, cond));
                stmts(k, then, depth + 1, out);
                if !otherwise.is_empty() {
                    let _ = writeln!(out, "{pad}}} else {{");
                    stmts(k, otherwise, depth + 1, out);
                }
                let _ = writeln!(out, "{pad}}}");
            }
        }
    }
}

pub fn to_text(k: &Kernel) -> String {
    let mut s = String::new();
    let bufs: Vec<String> = k
        .buffers
        .iter()
        .map(|b| {
            let access = match b.access {
                Access::Read => "in",
                Access::Write => "out",
                Access::ReadWrite => "inout",
            };
            format!("{access} {}: {}", b.name, elem(b.elem))
        })
        .collect();
    let _ = writeln!(
        s,
        "kernel {}({}) sizes({}) {{",
        k.name,
        bufs.join(", "),
        k.sizes.iter().chain(&k.scalars).cloned().collect::<Vec<_>>().join(", ")
    );
    if let Some(g) = &k.gemm {
        gemm(k, g, &mut s);
        s.push_str("}\n");
        return s;
    }
    match k.threads {
        Some(t) => {
            let _ = writeln!(s, "  parallel block {} in 0..{}, threads 0..{t} {{", k.index, expr(k, &k.extent));
        }
        None => {
            let _ = writeln!(s, "  parallel {} in 0..{} {{", k.index, expr(k, &k.extent));
        }
    }
    stmts(k, &k.body, 2, &mut s);
    s.push_str("  }\n}\n");
    s
}

/// A library node: `library gemm` and its strided views, e.g.
/// `C[m, n] at c + m*rows + n*cols = A[m, k] · B[k, n]` with one line per batch axis.
fn gemm(k: &Kernel, g: &super::gemm::Gemm, out: &mut String) {
    let x = |e: &Expr| expr(k, e);
    let view = |v: &super::gemm::Matrix| format!("{} + row*{} + col*{}", x(&v.offset), x(&v.rows), x(&v.cols));
    let op = if g.accumulate { "+=" } else { "=" };
    let _ = writeln!(out, "  library gemm C {op} A·B, m={} n={} k={} {{", x(&g.m), x(&g.n), x(&g.k));
    for (i, b) in g.batch.iter().enumerate() {
        let _ =
            writeln!(out, "    batch {i} in 0..{}: A += {}, B += {}, C += {}", x(&b.extent), x(&b.a), x(&b.b), x(&b.c));
    }
    let names: Vec<&str> = k.buffers.iter().map(|b| b.name.as_str()).collect();
    let _ = writeln!(out, "    A = {}[{}]", names[0], view(&g.a));
    let _ = writeln!(out, "    B = {}[{}]", names[1], view(&g.b));
    let _ = writeln!(out, "    C = {}[{}]", names[2], view(&g.c));
    out.push_str("  }\n");
}
