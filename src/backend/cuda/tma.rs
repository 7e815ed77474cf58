//! Tensor maps for the Tensor Memory Accelerator (Hopper): the descriptor a kernel's bulk tensor
//! copies read (`tma_load_3d` of common.cuh), made on the host by the driver's
//! cuTensorMapEncodeTiled and passed to the kernel by value.

use cudarc::driver::sys::{self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle};
use cudarc::driver::DeviceRepr;

/// `TensorMap` of common.cuh: 128 opaque bytes, 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TensorMap(sys::CUtensorMap);

// SAFETY: 128 plain bytes, the layout of the kernels' `TensorMap` parameter.
unsafe impl DeviceRepr for TensorMap {}

impl TensorMap {
    /// A map no copy reads (the kernels' f32-storage paths stage with cp.async instead).
    pub fn unused() -> Self {
        // SAFETY: CUtensorMap is plain bytes; zeros are a value the kernel never decodes.
        TensorMap(unsafe { std::mem::zeroed() })
    }

    /// The map of a bf16 tensor at device address `ptr` with `dims` (elements: contiguous
    /// first, then rows, then planes) and `strides` (bytes from one row, and one plane, to the
    /// next), copied in boxes of `box_` elements, 128-byte swizzled (a box row of 64 bf16 is
    /// the swizzle's span), zeros outside the tensor.
    pub fn bf16_3d(ptr: u64, dims: [u64; 3], strides: [u64; 2], box_: [u32; 3]) -> Result<Self, String> {
        let mut map = TensorMap::unused();
        let ones = [1u32; 3];
        // SAFETY: the arrays have the lengths rank 3 reads (dims 3, strides 2, box 3, element
        // strides 3); the address is the caller's live buffer, which the map only describes.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map.0,
                CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                3,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                box_.as_ptr(),
                ones.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
            .map_err(|e| format!("cuTensorMapEncodeTiled of {dims:?} bf16 (strides {strides:?} bytes, box {box_:?}): {e:?}"))?;
        }
        Ok(map)
    }
}
