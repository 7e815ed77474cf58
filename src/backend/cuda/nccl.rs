//! Collectives over GPUs on NCCL: gradients summed in place, and the token dispatcher's
//! expert-parallel rows exchanged, instead of downloaded, moved by MPI in host memory and
//! uploaded again (two PCIe crossings each: for H100-ref's 3.8 GB of f32 gradients alone
//! ~140 ms a step at 55 GB/s, derived). Exchanges queue on the compute stream (the experts wait
//! for their rows); sums on a stream of their own, so that a layer's gradients are summed
//! while the backward of the layers before it runs.
//!
//! NCCL takes one GPU a rank and must load on every rank, so [`open`] first gathers, over the
//! host communicator, whether each rank loads libnccl and which GPU it holds (its UUID, unique
//! across nodes); where any rank cannot, every rank keeps the host path and says why. Rank 0's
//! unique id travels by the same communicator.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};

use super::{offset, CudaBackend, DevView, DevViewMut, Storage};
use crate::backend::{DeviceGroup, GroupOnDevice, PeerChunk};
use crate::parallel::comm::Communicator;
use crate::{Error, Result};

/// A NCCL communicator over a group's GPUs: the token dispatcher's exchanges of
/// expert-parallel rows on the backend's compute stream, the gradients' sums on `reductions`.
pub struct Nccl {
    comm: sys::ncclComm_t,
    compute: Arc<CudaStream>,
    reductions: Arc<CudaStream>,
    ranks: usize,
    /// " 2.27.3", or empty where the library names no release.
    version: String,
}

/// What to do when NCCL fails.
const HOST_PATH: &str = "set parallel.nccl = false to move gradients and expert-parallel rows through host memory";

/// What NCCL said about a failure: its last error text where it has one, else the code.
fn nccl_error(what: &str, e: result::NcclError) -> Error {
    // SAFETY: ncclGetLastError (null comm: the last error of any) returns null or a
    // NUL-terminated string NCCL owns, read here at once.
    let text = unsafe {
        let last = sys::ncclGetLastError(std::ptr::null_mut());
        if last.is_null() { String::new() } else { std::ffi::CStr::from_ptr(last).to_string_lossy().into_owned() }
    };
    let text = if text.is_empty() { format!("{:?}", e.0) } else { text };
    Error::Invalid(format!("NCCL {what}: {text}; {HOST_PATH}"))
}

/// Opens NCCL over `group` (more than one rank) where every rank can, else says why not.
pub fn open(be: &CudaBackend, group: &dyn Communicator) -> Result<GroupOnDevice<CudaBackend>> {
    // What this rank can: 0 no libnccl, 1 no UUID for its GPU, 2 both; then the UUID. Every
    // rank joins the gather whatever it found, so all decide alike and none waits alone.
    // SAFETY: only tries to dlopen the library by its candidate names.
    let loads = unsafe { sys::is_culib_present() };
    let uuid = be.stream.context().uuid().ok().map(|u| u.bytes);
    let can = if !loads { 0.0 } else if uuid.is_none() { 1.0 } else { 2.0 };
    let mine: Vec<f32> = std::iter::once(can).chain(uuid.unwrap_or_default().iter().map(|&b| b as u8 as f32)).collect();
    let all = group.all_gather(&mine)?;
    let ranks: Vec<&[f32]> = all.chunks(mine.len()).collect();
    if let Some(r) = ranks.iter().position(|k| k[0] < 2.0) {
        let why = if ranks[r][0] == 0.0 { "libnccl.so does not load" } else { "the driver names no UUID for the GPU" };
        return Ok(GroupOnDevice::Host(format!("{why} on rank {r}")));
    }
    for (r, a) in ranks.iter().enumerate() {
        if let Some(s) = ranks[r + 1..].iter().position(|b| b[1..] == a[1..]) {
            return Ok(GroupOnDevice::Host(format!("ranks {r} and {} share a GPU; NCCL takes one GPU a rank", r + 1 + s)));
        }
    }
    // Rank 0's unique id, behind a flag saying whether it could make one.
    let mut id = vec![0f32; 129];
    if group.rank() == 0 {
        if let Ok(made) = result::get_uniqueid() {
            id[0] = 1.0;
            for (slot, &c) in id[1..].iter_mut().zip(made.internal.iter()) {
                *slot = c as u8 as f32;
            }
        }
    }
    group.broadcast(&mut id, 0)?;
    if id[0] == 0.0 {
        return Err(Error::Invalid(format!("NCCL: rank 0 could not make a unique id; {HOST_PATH}")));
    }
    let mut internal = [0 as std::ffi::c_char; 128];
    for (c, &v) in internal.iter_mut().zip(&id[1..]) {
        *c = v as u8 as std::ffi::c_char;
    }
    let mut comm = std::ptr::null_mut();
    // SAFETY: `comm` is written by the call; every rank of `group` makes it with the same id.
    unsafe { result::comm_init_rank(&mut comm, group.size() as i32, sys::ncclUniqueId { internal }, group.rank() as i32) }.map_err(|e| nccl_error("init", e))?;
    // NCCL's code is major·10000 + minor·100 + patch; 0 (the emulator's): no release.
    let version = match result::get_nccl_version().unwrap_or(0) {
        0 => String::new(),
        v => format!(" {}.{}.{}", v / 10000, v / 100 % 100, v % 100),
    };
    let reductions = be.stream.context().new_stream().map_err(|e| Error::Invalid(format!("CUDA stream for NCCL's sums: {e:?}")))?;
    Ok(GroupOnDevice::Opened(Box::new(Nccl { comm, compute: be.stream.clone(), reductions, ranks: group.size(), version })))
}

/// NCCL's type of a storage's elements.
fn nccl_type(storage: Storage) -> sys::ncclDataType_t {
    match storage {
        Storage::F32 => sys::ncclDataType_t::ncclFloat32,
        Storage::Bf16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

impl Nccl {
    fn compute_stream(&self) -> sys::cudaStream_t {
        self.compute.cu_stream() as sys::cudaStream_t
    }
}

impl DeviceGroup<CudaBackend> for Nccl {
    fn exchange(&self, src: DevView<'_>, sends: &[PeerChunk], dst: DevViewMut<'_>, recvs: &[PeerChunk]) -> Result<()> {
        assert_eq!(src.storage, dst.storage, "an exchange keeps the element type");
        let ty = nccl_type(src.storage);
        let calls = || -> std::result::Result<(), result::NcclError> {
            // Empty chunks are left out on both sides alike (each side knows every length).
            for (peer, r) in sends.iter().filter(|(_, r)| !r.is_empty()) {
                assert!(r.end <= src.len, "send {r:?} past a view of {}", src.len);
                let at = offset(src.ptr, r.start, src.storage) as *const std::ffi::c_void;
                // SAFETY: a live device range of the view; queued in stream order.
                unsafe { result::send(at, r.len(), ty, *peer as i32, self.comm, self.compute_stream()) }?;
            }
            for (peer, r) in recvs.iter().filter(|(_, r)| !r.is_empty()) {
                assert!(r.end <= dst.len, "receive {r:?} past a view of {}", dst.len);
                let at = offset(dst.ptr, r.start, dst.storage) as *mut std::ffi::c_void;
                // SAFETY: as above; the ranges of `recvs` are disjoint parts of a writable view.
                unsafe { result::recv(at, r.len(), ty, *peer as i32, self.comm, self.compute_stream()) }?;
            }
            Ok(())
        };
        // One group: every send and receive progresses together (no rank waits on a peer's order).
        result::group_start().map_err(|e| nccl_error("group start", e))?;
        let queued = calls();
        result::group_end().map_err(|e| nccl_error("exchange", e))?;
        queued.map_err(|e| nccl_error("send/receive", e))
    }

    fn all_reduce_sum(&self, buf: DevViewMut<'_>) -> Result<()> {
        assert_eq!(buf.storage, Storage::F32, "NCCL sums f32 gradients");
        let written = self.compute.record_event(None).map_err(|e| Error::Invalid(format!("CUDA event before a NCCL sum: {e:?}")))?;
        self.reductions.wait(&written).map_err(|e| Error::Invalid(format!("CUDA wait before a NCCL sum: {e:?}")))?;
        let ptr = buf.ptr as *mut std::ffi::c_void;
        // SAFETY: `buf` is a live device range of `len` f32 elements (the gradients, which live
        // as long as the model), summed in place after everything the compute stream had queued
        // (which wrote it); the caller neither writes nor reads it before `join`.
        unsafe { result::all_reduce(ptr, ptr, buf.len, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, self.comm, self.reductions.cu_stream() as sys::cudaStream_t) }
            .map(|_| ())
            .map_err(|e| nccl_error("all-reduce", e))
    }

    fn join(&self) -> Result<()> {
        let summed = self.reductions.record_event(None).map_err(|e| Error::Invalid(format!("CUDA event after NCCL's sums: {e:?}")))?;
        self.compute.wait(&summed).map_err(|e| Error::Invalid(format!("CUDA wait for NCCL's sums: {e:?}")))
    }

    fn describe(&self) -> String {
        format!("by NCCL{} over {} GPUs", self.version, self.ranks)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator is ours and used by nothing after this, once its queued
        // sums have run.
        let _ = self.reductions.synchronize();
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
