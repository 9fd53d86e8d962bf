//! Kernel families and the choice of fast paths for this CPU.
//!
//! Each family has a scalar reference that defines its result; fast paths for x86_64 (AVX2+FMA)
//! and aarch64 (NEON) are tested against it and chosen once per session.

pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod linear;
pub mod movement;
pub mod norm;
pub mod pool;
pub mod qgemm;

/// The kernels a session uses, chosen once.
///
/// ```
/// use edgetune_runtime::kernels::Kernels;
/// let fast = Kernels::best();
/// let reference = Kernels::reference();
/// println!("gemm: {} (reference: {})", fast.gemm.name, reference.gemm.name);
/// ```
#[derive(Clone, Copy)]
pub struct Kernels {
    /// f32 matrix-multiply micro-kernel.
    pub gemm: gemm::GemmKernel,
    /// The same for f16 weight panels.
    pub gemm_f16: gemm::GemmF16Kernel,
    /// Threads large kernels may use (with the `std` feature; 1 otherwise).
    pub threads: usize,
    /// Block-quantized weights × f32 activations.
    pub qgemm_f32: qgemm::QGemmF32Fn,
    /// Block-quantized weights × int8 activations.
    pub qgemm_q8: qgemm::QGemmQ8Fn,
    /// N:M sparse weights × f32 activations.
    pub sparse_gemm: qgemm::SparseGemmFn,
    /// Int8 quantization of activation rows for `qgemm_q8` (every version writes the bytes of
    /// [`qgemm::quantize_q8`]).
    pub quantize_q8: fn(&[f32], &mut [u8]),
    /// Name of the compressed-weight kernels above (shown in benchmarks, checked in tests).
    pub qgemm_name: &'static str,
}

impl Kernels {
    const REFERENCE: Kernels = Kernels {
        gemm: gemm::generic::KERNEL,
        gemm_f16: gemm::generic::KERNEL_F16,
        threads: 1,
        qgemm_f32: qgemm::generic::qgemm_f32,
        qgemm_q8: qgemm::generic::qgemm_q8,
        sparse_gemm: qgemm::generic::sparse_gemm,
        quantize_q8: qgemm::quantize_q8,
        qgemm_name: "generic",
    };

    /// The scalar reference kernels: bit-identical on every target.
    pub fn reference() -> Kernels {
        Kernels::REFERENCE
    }

    /// The same kernels with a thread budget (used with the `std` feature).
    pub fn with_threads(self, threads: usize) -> Kernels {
        Kernels {
            threads: threads.max(1),
            ..self
        }
    }

    /// The fastest kernels this CPU supports, on one thread (runtime detection with `std`,
    /// compile-time target features without).
    pub fn best() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            if x86_64_has_avx2_fma() {
                let gemm = Kernels {
                    gemm: gemm::x86_64::KERNEL,
                    gemm_f16: gemm::x86_64::KERNEL_F16,
                    ..Kernels::REFERENCE
                };
                if !x86_64_has_f16c() {
                    return gemm;
                }
                return Kernels {
                    qgemm_f32: qgemm::x86_64::qgemm_f32,
                    qgemm_q8: qgemm::x86_64::qgemm_q8_best(),
                    sparse_gemm: qgemm::x86_64::sparse_gemm,
                    quantize_q8: qgemm::x86_64::quantize_q8,
                    qgemm_name: qgemm::x86_64::name(),
                    ..gemm
                };
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // NEON is part of the aarch64 baseline.
            return Kernels {
                gemm: gemm::aarch64::KERNEL,
                gemm_f16: gemm::aarch64::KERNEL_F16,
                qgemm_f32: qgemm::aarch64::qgemm_f32,
                qgemm_q8: qgemm::aarch64::qgemm_q8_best(),
                sparse_gemm: qgemm::aarch64::sparse_gemm,
                quantize_q8: qgemm::aarch64::quantize_q8,
                qgemm_name: qgemm::aarch64::name(),
                ..Kernels::REFERENCE
            };
        }
        #[allow(unreachable_code)]
        Kernels::reference()
    }
}

impl core::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kernels")
            .field("gemm", &self.gemm.name)
            .field("qgemm", &self.qgemm_name)
            .field("threads", &self.threads)
            .finish()
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_64_has_avx2_fma() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(all(target_feature = "avx2", target_feature = "fma"))
    }
}

/// True when the CPU has AVX-VNNI (`vpdpbusd` on VEX-encoded 256-bit registers).
#[cfg(target_arch = "x86_64")]
fn x86_64_has_avx_vnni() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(target_feature = "avxvnni")
    }
}

/// True when the CPU has AVX512F, BW, VL, VNNI and VBMI (Ice Lake, Zen 4 and later).
#[cfg(target_arch = "x86_64")]
fn x86_64_has_avx512_vnni() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(all(
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512vl",
            target_feature = "avx512vnni",
            target_feature = "avx512vbmi"
        ))
    }
}

/// True when the CPU converts f16 with F16C (every AVX2 CPU in practice; checked anyway).
#[cfg(target_arch = "x86_64")]
fn x86_64_has_f16c() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(target_feature = "f16c")
    }
}
