//! Small CPU building blocks for the fused kernels: a SIMD dispatch, an
//! `exp` that vectorises, and a counter-based random stream.
//!
//! Why: the workspace builds for baseline x86-64 (SSE2), so the kernels'
//! elementwise loops ran 4 lanes wide at best and called libm's scalar
//! `expf` once per element (plus its slow underflow path for the masked
//! scores: `nlora bench --profile` showed the attention softmax, SwiGLU and
//! the dropout RNG at ~15 % of a training step). [`simd_fn!`] compiles a
//! kernel for AVX2 + FMA too and picks that when the CPU has them, and
//! [`exp_f32`] is branch-free, so such loops become 8-lane vector code.

/// Defines `fn NAME<T: BOUND>(args) -> R { body }` whose body is compiled
/// twice, as is and with AVX2 + FMA enabled, the second run when the CPU
/// supports them (checked once). The body sits in an `inline(always)`
/// function, so everything it calls that is `inline(always)` too (e.g.
/// [`exp_f32`]) is compiled with those features and the loops vectorise 8
/// lanes wide. (A closure handed to a target-feature function is not
/// reliably inlined into it: big bodies stayed baseline code.)
#[macro_export]
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<$t: $bound>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                    imp::<$t>($($arg),*)
                }
                if $crate::kernels::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked).
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            imp::<$t>($($arg),*)
        }
    };
}

/// Whether this CPU runs AVX2 + FMA code (checked once).
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// `a @ b` over the leading (batch) dims, for batches of small products
/// such as attention's per-head `q k^T` and `p v`: each product runs
/// single-threaded and the batch is split across the rayon pool. candle's
/// batched matmul runs one multi-threaded GEMM per item, which at 384 x 64
/// x 128 spends half its time in thread hand-offs (measured: 1.93 vs
/// 1.06 ms for 24 such products on 2 cores). Batch dims that cannot be
/// walked with one stride are copied contiguous first. Falls back to
/// `a.matmul(b)` off the CPU, for other dtypes, and when a gradient is
/// tracked (this is not a differentiable op: use it inside kernels and
/// backward passes).
pub fn batched_matmul(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Storage, Tensor};
    let (ad, bd) = (a.dims(), b.dims());
    let rank = ad.len();
    let fits = rank >= 3
        && bd.len() == rank
        && ad[..rank - 2] == bd[..rank - 2]
        && ad[rank - 1] == bd[rank - 2]
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.device().is_cpu()
        && b.device().is_cpu()
        && !a.track_op()
        && !b.track_op();
    if !fits {
        return a.matmul(b);
    }
    // batch dims that do not collapse to one stride: a contiguous copy does
    let (a, b) = (
        &if batch_stride(a).is_some() {
            a.clone()
        } else {
            a.contiguous()?
        },
        &if batch_stride(b).is_some() {
            b.clone()
        } else {
            b.contiguous()?
        },
    );
    let (Some(sa), Some(sb)) = (batch_stride(a), batch_stride(b)) else {
        return a.matmul(b);
    };
    let (m, k, n) = (ad[rank - 2], ad[rank - 1], bd[rank - 1]);
    let items: usize = ad[..rank - 2].iter().product();
    let (a_st, a_l) = a.storage_and_layout();
    let (b_st, b_l) = b.storage_and_layout();
    let (Storage::Cpu(a_cpu), Storage::Cpu(b_cpu)) = (&*a_st, &*b_st) else {
        return a.matmul(b);
    };
    let (a_s, b_s) = (a_l.stride(), b_l.stride());
    let a_view = MatView {
        start: a_l.start_offset(),
        batch: sa,
        rs: a_s[rank - 2],
        cs: a_s[rank - 1],
    };
    let b_view = MatView {
        start: b_l.start_offset(),
        batch: sb,
        rs: b_s[rank - 2],
        cs: b_s[rank - 1],
    };
    let mut dims = ad.to_vec();
    dims[rank - 1] = n;
    let (device, mkn) = (a.device().clone(), (m, k, n));
    match a.dtype() {
        DType::F32 => {
            let c = batched_gemm::<f32>(a_cpu, a_view, b_cpu, b_view, items, mkn)?;
            Tensor::from_vec(c, dims, &device)
        }
        _ => {
            let c = batched_gemm::<f64>(a_cpu, a_view, b_cpu, b_view, items, mkn)?;
            Tensor::from_vec(c, dims, &device)
        }
    }
}

/// Where matrix `i` of a batch starts and how its rows and columns stride.
#[derive(Clone, Copy)]
struct MatView {
    start: usize,
    batch: usize,
    rs: usize,
    cs: usize,
}

/// The one stride that walks all leading dims of a tensor (None when
/// they do not collapse, e.g. a transposed batch).
fn batch_stride(t: &candle_core::Tensor) -> Option<usize> {
    let (dims, stride) = (t.dims(), t.stride());
    let rank = dims.len();
    if rank < 3 {
        return None;
    }
    for i in 0..rank - 3 {
        if dims[i + 1] > 1 && stride[i] != stride[i + 1] * dims[i + 1] {
            return None;
        }
    }
    Some(stride[rank - 3])
}

fn batched_gemm<T: num_like::Float>(
    a: &candle_core::CpuStorage,
    av: MatView,
    b: &candle_core::CpuStorage,
    bv: MatView,
    items: usize,
    (m, k, n): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    use rayon::prelude::*;
    let (a, b) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
    let mut c = vec![T::ZERO; items * m * n];
    if m * n == 0 {
        return Ok(c);
    }
    // bounds of the last element each view reads, checked once up front
    let last = |v: MatView, rows: usize, cols: usize| {
        v.start + (items - 1) * v.batch + (rows - 1) * v.rs + (cols - 1) * v.cs
    };
    assert!(k == 0 || (last(av, m, k) < a.len() && last(bv, k, n) < b.len()));
    c.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
        // SAFETY: every element read lies inside `a` / `b` (the largest
        // offsets are checked above), `c` is this item's own m x n block.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr().add(av.start + i * av.batch),
                av.cs as isize,
                av.rs as isize,
                b.as_ptr().add(bv.start + i * bv.batch),
                bv.cs as isize,
                bv.rs as isize,
                T::ZERO,
                T::ONE,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    Ok(c)
}

mod num_like {
    /// The element types [`super::batched_matmul`] runs on.
    pub trait Float: Copy + Send + Sync + 'static + candle_core::WithDType {
        const ZERO: Self;
        const ONE: Self;
    }
    impl Float for f32 {
        const ZERO: Self = 0.0;
        const ONE: Self = 1.0;
    }
    impl Float for f64 {
        const ZERO: Self = 0.0;
        const ONE: Self = 1.0;
    }
}

/// `e^x` for f32 without branches or calls (Cephes' `expf`: range reduction
/// by ln 2 in two parts, a degree-6 polynomial, the exponent set through the
/// bits), within 2 ulp of `f32::exp` on [-87, 88]. Below -87 it returns 0
/// (the true value is under 1.7e-38), above 88.72 infinity, between 88 and
/// 88.72 e^88 (only SiLU's `exp(-g)` gets there, where either is ~1e38 in a
/// denominator); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // Round to nearest by adding 1.5 x 2^23: the sum's low mantissa bits
    // then hold n itself, read through the bits (a float-to-int `as` cast
    // does not vectorise). No libm call without SSE4.1, no `mul_add` (a
    // libm call without FMA).
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4b40_0000;
    let xc = x.clamp(LO, HI);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_52;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 127]: 2^n is a normal float with exponent field n + 127
    let pow2n = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND_BITS - 127) << 23);
    let v = y * pow2n;
    if x < LO {
        0.0
    } else if x > 88.722_84 {
        f32::INFINITY
    } else {
        v
    }
}

/// A uniform 32-bit value for position `i` of the stream `key`: two rounds
/// of a 32-bit integer hash (Wellons' lowbias32), so any position can be
/// drawn on its own, in any order, in vector lanes. For dropout masks, not
/// for cryptography.
#[inline(always)]
pub fn hash_u32(key: u64, i: u32) -> u32 {
    #[inline(always)]
    fn lowbias32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    }
    lowbias32(lowbias32(i ^ key as u32).wrapping_add((key >> 32) as u32))
}

/// Spreads a seed over 64 bits (SplitMix64's finaliser), so nearby seeds
/// give unrelated streams for [`hash_u32`].
pub fn stream_key(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = (0u32, 0f32);
        let mut x = -87.0f32;
        while x <= 88.0 {
            let u = ulps(exp_f32(x), x.exp());
            if u > worst.0 {
                worst = (u, x);
            }
            x += 0.000_37;
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        // the same inside the vectorised path
        trait Float: Copy + Into<f32> {}
        impl Float for f32 {}
        crate::simd_fn! {
            fn exp_all<T: Float>(xs: &[T]) -> Vec<f32> {
                xs.iter().map(|&x| exp_f32(x.into())).collect()
            }
        }
        let xs: Vec<f32> = (0..4096).map(|i| -80.0 + i as f32 * 0.04).collect();
        let ys = exp_all(&xs);
        for (&x, &y) in xs.iter().zip(&ys) {
            assert!(ulps(y, x.exp()) <= 2, "x = {x}: {y} vs {}", x.exp());
        }
    }

    #[test]
    fn batched_matmul_matches_candle_on_plain_and_transposed_views() {
        use candle_core::{Device, Tensor};
        let d = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 3, 4, 6), &d).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (2, 3, 6, 4), &d).unwrap();
        let a64 = a.to_dtype(candle_core::DType::F64).unwrap();
        let b64 = b.to_dtype(candle_core::DType::F64).unwrap();
        let max_diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (x, y) in [
            (a.clone(), b.clone()),
            (a.clone(), bt.t().unwrap()),            // k^T as a view
            (b.t().unwrap(), a.t().unwrap()),        // both transposed
            (a.narrow(2, 1, 3).unwrap(), b.clone()), // offset rows
            (a64.clone(), b64.clone()),
        ] {
            let (got, want) = (batched_matmul(&x, &y).unwrap(), x.matmul(&y).unwrap());
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-5);
        }
        // a batch that does not collapse to one stride (candle's matmul
        // refuses it) is copied contiguous first
        let odd = a.transpose(0, 1).unwrap(); // (3, 2, 5, 4) with swapped batch strides
        let b2 = b.transpose(0, 1).unwrap().contiguous().unwrap();
        let got = batched_matmul(&odd, &b2).unwrap();
        let want = odd.contiguous().unwrap().matmul(&b2).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1e30), 0.0);
        assert_eq!(exp_f32(-87.5), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        let near = exp_f32(88.5);
        assert!(near.is_finite() && near >= 88f32.exp() * 0.999);
    }

    #[test]
    fn hash_stream_is_uniform_and_seed_dependent() {
        // keep-rate of a p = 0.1 dropout threshold over 1M positions, and
        // the same positions under a neighbouring seed mostly disagree
        let threshold = (0.1 * 4_294_967_296.0) as u32;
        let (k1, k2) = (stream_key(7), stream_key(8));
        let n = 1u32 << 20;
        let kept = (0..n).filter(|&i| hash_u32(k1, i) >= threshold).count();
        let rate = kept as f64 / n as f64;
        // binomial sd at n = 2^20 is 0.0003: 0.002 is > 6 sd
        assert!((rate - 0.9).abs() < 0.002, "keep rate {rate}");
        let both = (0..n)
            .filter(|&i| (hash_u32(k1, i) < threshold) && (hash_u32(k2, i) < threshold))
            .count();
        // independent streams drop the same position with probability 0.01
        let joint = both as f64 / n as f64;
        assert!((joint - 0.01).abs() < 0.001, "joint drop rate {joint}");
        // neighbouring positions are not correlated either
        let pairs = (0..n - 1)
            .filter(|&i| (hash_u32(k1, i) < threshold) && (hash_u32(k1, i + 1) < threshold))
            .count();
        let adj = pairs as f64 / (n - 1) as f64;
        assert!((adj - 0.01).abs() < 0.001, "adjacent drop rate {adj}");
    }
}
