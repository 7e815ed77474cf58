//! MPI collectives (feature `mpi`, OpenMPI through rsmpi) behind the [`Communicator`] trait, for
//! CPU ranks started by `mpirun`. MPI's default error handler aborts the whole job on a failed
//! collective, so one failing rank stops every rank instead of leaving peers waiting.

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::Communicator as _;
use mpi::traits::*;
use mpi::Count;

use super::comm::{check_counts, find_group, Communicator};
use crate::{Error, Result};

/// The initialised MPI environment; finalises MPI when dropped, so keep it alive for the run.
pub struct MpiRuntime {
    universe: Universe,
}

impl MpiRuntime {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        mpi::initialize()
            .map(|universe| MpiRuntime { universe })
            .ok_or_else(|| Error::Invalid("MPI is already initialised in this process".into()))
    }

    /// All ranks of the job.
    pub fn world(&self) -> MpiComm {
        MpiComm { comm: self.universe.world() }
    }

    /// Ends every rank of the job with `code` (a rank that hit an error calls this).
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

pub struct MpiComm {
    comm: SimpleCommunicator,
}

// SAFETY: MPI runs at the default (funneled) thread level; a communicator is only ever used by
// the thread that owns it, and moving it between threads moves only an opaque handle.
unsafe impl Send for MpiComm {}

fn counts_i32(counts: &[usize]) -> Result<(Vec<Count>, Vec<Count>)> {
    let mut displs = Vec::with_capacity(counts.len());
    let mut at: usize = 0;
    for &c in counts {
        displs.push(Count::try_from(at).map_err(|_| Error::Invalid(format!("all_to_all_v: offset {at} exceeds MPI's 32-bit counts")))?);
        at += c;
    }
    let counts = counts
        .iter()
        .map(|&c| Count::try_from(c).map_err(|_| Error::Invalid(format!("all_to_all_v: count {c} exceeds MPI's 32-bit counts"))))
        .collect::<Result<Vec<_>>>()?;
    Ok((counts, displs))
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.comm.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; send.len() * self.size()];
        self.comm.all_gather_into(send, &mut out[..]);
        Ok(out)
    }

    fn reduce_scatter_sum(&self, send: &[f32]) -> Result<Vec<f32>> {
        let size = self.size();
        if !send.len().is_multiple_of(size) {
            return Err(Error::config("reduce_scatter_sum send length", send.len(), format!("a multiple of the communicator size {size}")));
        }
        let mut out = vec![0f32; send.len() / size];
        self.comm.reduce_scatter_block_into(send, &mut out[..], SystemOperation::sum());
        Ok(out)
    }

    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        check_counts(send.len(), send_counts, self.size())?;
        let recv_counts = self.all_to_all_counts(send_counts)?;
        let (sc, sd) = counts_i32(send_counts)?;
        let (rc, rd) = counts_i32(&recv_counts)?;
        let mut recv = vec![0f32; recv_counts.iter().sum()];
        {
            let send_part = Partition::new(send, &sc[..], &sd[..]);
            let mut recv_part = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
            self.comm.all_to_all_varcount_into(&send_part, &mut recv_part);
        }
        Ok((recv, recv_counts))
    }

    fn all_to_all_counts(&self, send: &[usize]) -> Result<Vec<usize>> {
        let size = self.size();
        if !send.len().is_multiple_of(size) {
            return Err(Error::config("all_to_all_counts length", send.len(), format!("a multiple of the communicator size {size}")));
        }
        let send: Vec<u64> = send.iter().map(|&c| c as u64).collect();
        let mut recv = vec![0u64; send.len()];
        self.comm.all_to_all_into(&send[..], &mut recv[..]);
        Ok(recv.into_iter().map(|c| c as usize).collect())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::config("broadcast root", root, format!("a rank below {}", self.size())));
        }
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Box<dyn Communicator>> {
        let (group, position) = find_group(groups, self.size(), self.rank())?;
        let comm = self
            .comm
            .split_by_color_with_key(Color::with_value(group as i32), position as i32)
            .ok_or_else(|| Error::Invalid("MPI_Comm_split returned no communicator".into()))?;
        Ok(Box::new(MpiComm { comm }))
    }
}
