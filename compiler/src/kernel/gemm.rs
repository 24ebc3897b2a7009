//! GEMM library nodes: the one opaque call kernel IR allows. A dense f32 matrix product
//! on strided views of three buffers is better done by a tuned library (the `gemm`
//! crate on CPUs reaches ~90% of FMA peak; generated loop nests reach a few percent),
//! so the scheduler hands the dense projections and their gradients to one, and the
//! manifest marks those kernels `library`.
//!
//! A library kernel has the usual buffer slots — 0 is A, 1 is B, 2 is C — and an empty
//! body. Its parallel range is `batch × m`: iteration `i` is row `i mod m` of product
//! `i / m`, so a launch of `begin..end` computes those rows of C, and threads (or GPU
//! blocks) split it like any other kernel's range:
//!
//! ```text
//! for every batch index (b₀, b₁, …) and row r in the range:
//!     C[c₀ + Σ bᵢ·cᵢ + r·c.rows + j·c.cols] = Σₖ A[a₀ + Σ bᵢ·aᵢ + r·a.rows + k·a.cols]
//!                                            · B[b₀ + Σ bᵢ·bᵢ' + k·b.rows + j·b.cols]
//! ```
//!
//! Every extent, stride and offset is an index expression over the size arguments.

use super::ir::Expr;
use serde::{Deserialize, Serialize};

/// Where a matrix's element (row, col) lives in its buffer: `offset + row·rows + col·cols`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    pub offset: Expr,
    pub rows: Expr,
    pub cols: Expr,
}

/// A loop around the product, with the stride it adds in each matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchAxis {
    pub extent: Expr,
    pub a: Expr,
    pub b: Expr,
    pub c: Expr,
}

/// `C[m×n] = A[m×k] · B[k×n]` (or `C += A·B` with `accumulate`) for every index of
/// `batch` (outermost first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemm {
    pub accumulate: bool,
    pub batch: Vec<BatchAxis>,
    pub m: Expr,
    pub n: Expr,
    pub k: Expr,
    pub a: Matrix,
    pub b: Matrix,
    pub c: Matrix,
}
