//! Helpers shared by the integration tests: seeded random matrices and
//! nalgebra <-> candle conversion.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Entries uniform in [-1, 1).
pub fn random_matrix(rng: &mut StdRng, rows: usize, cols: usize) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0))
}

/// Row-major candle tensor of the given float dtype on the CPU.
pub fn to_tensor(m: &DMatrix<f64>, dtype: DType) -> Tensor {
    // nalgebra is column-major: the transpose's storage is m's row-major order.
    let data: Vec<f64> = m.transpose().as_slice().to_vec();
    Tensor::from_vec(data, (m.nrows(), m.ncols()), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor from matrix")
}

pub fn from_tensor(t: &Tensor) -> DMatrix<f64> {
    let (rows, cols) = t.dims2().expect("2-D tensor");
    let data: Vec<f64> = t
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor to host");
    DMatrix::from_row_slice(rows, cols, &data)
}

pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
