//! Collective communication behind one trait, so the dispatcher and the gradient reduction are
//! written once and run over a single process, simulated ranks (threads) or MPI, on host
//! memory. On GPUs the gradient sum can stay on the devices instead (NCCL, opened over these
//! communicators: `Backend::device_group`).
//!
//! Conventions every implementation keeps: buffers are `f32` slices and counts are in elements
//! (not bytes); ranks are numbered `0..size()` within the communicator; every rank of a
//! communicator calls the same collectives in the same order. A collective that one rank finds
//! invalid fails on every rank (with the reason), so a bad argument never leaves peers waiting.
//!
//! [`LocalGroup`] runs N ranks as threads over shared memory. Its reductions add the
//! contributions in rank order, so every rank gets bit-identical results and tests are exact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use crate::{Error, Result};

/// Collectives over a fixed set of ranks. All methods are collective: every rank must call them.
pub trait Communicator: Send {
    /// This rank's index in `0..size()`.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `buf` ← Σ over ranks of `buf`. Every rank passes the same length.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Concatenation of every rank's `send` in rank order. Every rank passes the same length.
    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>>;
    /// `send` (size()·m) holds one chunk of m per rank; rank r gets Σ over ranks of chunk r.
    fn reduce_scatter_sum(&self, send: &[f32]) -> Result<Vec<f32>>;
    /// Sends `send[offset_d..offset_d + send_counts[d]]` to rank d (offsets are prefix sums of
    /// `send_counts`, so `send` is destination-major). Returns the received elements, source-major,
    /// and how many came from each source.
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)>;
    /// Exact exchange of metadata: `send` (size()·m) holds m counts per destination, source-major
    /// on return. Used to agree on split sizes before an [`Communicator::all_to_all_v`].
    fn all_to_all_counts(&self, send: &[usize]) -> Result<Vec<usize>>;
    /// `buf` ← `root`'s `buf`. Every rank passes the same length and root.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// A communicator over the group of `groups` that holds this rank (as `MPI_Comm_split`).
    /// `groups` names ranks of this communicator, must partition them, and must be the same list
    /// on every rank; the new rank is the position in the group. Typical input: the EP or EDP
    /// groups of [`super::ranks::ParallelLayout`].
    fn split(&self, groups: &[Vec<usize>]) -> Result<Box<dyn Communicator>>;
}

/// Checks that `groups` partitions `0..size` and returns the group holding `rank` and the
/// position of `rank` in it.
pub(crate) fn find_group(groups: &[Vec<usize>], size: usize, rank: usize) -> Result<(usize, usize)> {
    let mut seen = vec![false; size];
    for g in groups {
        if g.is_empty() {
            return Err(Error::Invalid("split: a group is empty".into()));
        }
        for &r in g {
            if r >= size || seen[r] {
                return Err(Error::Invalid(format!(
                    "split: rank {r} is out of range or in two groups (communicator size {size})"
                )));
            }
            seen[r] = true;
        }
    }
    if let Some(r) = seen.iter().position(|&s| !s) {
        return Err(Error::Invalid(format!("split: rank {r} is in no group; groups must cover all {size} ranks")));
    }
    groups
        .iter()
        .enumerate()
        .find_map(|(gi, g)| g.iter().position(|&r| r == rank).map(|p| (gi, p)))
        .ok_or_else(|| Error::Invalid(format!("split: rank {rank} is in no group")))
}

/// Checks that `send_counts` has one count per rank and sums to `send.len()`.
pub(crate) fn check_counts(send_len: usize, send_counts: &[usize], size: usize) -> Result<()> {
    if send_counts.len() != size {
        return Err(Error::config("send_counts.len()", send_counts.len(), format!("one count per rank ({size})")));
    }
    let total: usize = send_counts.iter().sum();
    if total != send_len {
        return Err(Error::config("send_counts", format!("sum {total}"), format!("the send length {send_len}")));
    }
    Ok(())
}

fn check_chunked(what: &str, len: usize, size: usize) -> Result<()> {
    if !len.is_multiple_of(size) {
        return Err(Error::config(what, len, format!("a multiple of the communicator size {size}")));
    }
    Ok(())
}

/// The communicator of a lone process: every collective is a copy.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        Ok(send.to_vec())
    }
    fn reduce_scatter_sum(&self, send: &[f32]) -> Result<Vec<f32>> {
        Ok(send.to_vec())
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        check_counts(send.len(), send_counts, 1)?;
        Ok((send.to_vec(), send_counts.to_vec()))
    }
    fn all_to_all_counts(&self, send: &[usize]) -> Result<Vec<usize>> {
        Ok(send.to_vec())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::config("broadcast root", root, "0 (a single process)"));
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, groups: &[Vec<usize>]) -> Result<Box<dyn Communicator>> {
        find_group(groups, 1, 0)?;
        Ok(Box::new(SingleProcess))
    }
}

/// A reusable barrier that gives up (with an error) when any simulated rank has panicked, so a
/// failing test reports its panic instead of hanging the peers.
struct Rendezvous {
    n: usize,
    /// (ranks arrived in this generation, generation).
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    /// Set once by any panicking rank of the whole simulated world.
    aborted: Arc<AtomicBool>,
}

impl Rendezvous {
    fn wait(&self) -> Result<()> {
        let dead = || Error::Invalid("simulated rank panicked; abandoning the collective".into());
        let mut st = self.state.lock().map_err(|_| dead())?;
        if self.aborted.load(Ordering::SeqCst) {
            return Err(dead());
        }
        st.0 += 1;
        if st.0 == self.n {
            *st = (0, st.1 + 1);
            self.cv.notify_all();
            return Ok(());
        }
        let generation = st.1;
        while st.1 == generation {
            // Poll the abort flag: a panicking rank of another sub-group cannot notify this one.
            st = self.cv.wait_timeout(st, Duration::from_millis(20)).map_err(|_| dead())?.0;
            if self.aborted.load(Ordering::SeqCst) {
                return Err(dead());
            }
        }
        Ok(())
    }
}

/// What one rank posts for a collective: its payload, or the reason its own arguments failed.
#[derive(Default)]
struct Post {
    data: Vec<f32>,
    counts: Vec<usize>,
    err: Option<String>,
}

/// State shared by the ranks of one simulated communicator.
struct Shared {
    posts: RwLock<Vec<Post>>,
    rendezvous: Rendezvous,
    /// Sub-communicators made by the latest `split`, handed from rank 0 to the others.
    children: Mutex<Vec<Arc<Shared>>>,
}

impl Shared {
    fn new(n: usize, aborted: Arc<AtomicBool>) -> Arc<Shared> {
        Arc::new(Shared {
            posts: RwLock::new((0..n).map(|_| Post::default()).collect()),
            rendezvous: Rendezvous { n, state: Mutex::new((0, 0)), cv: Condvar::new(), aborted },
            children: Mutex::new(Vec::new()),
        })
    }
}

/// One of N simulated ranks running as threads of this process (for tests of multi-rank logic
/// without MPI). Create all handles with [`LocalGroup::new`] and move one into each thread, or
/// use [`LocalGroup::run`].
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

fn poisoned() -> Error {
    Error::Invalid("simulated communicator state poisoned by a panicking rank".into())
}

impl LocalGroup {
    /// Handles for ranks `0..n` of a new simulated world.
    pub fn new(n: usize) -> Result<Vec<LocalGroup>> {
        if n == 0 {
            return Err(Error::config("ranks", 0, "at least 1 simulated rank"));
        }
        let shared = Shared::new(n, Arc::new(AtomicBool::new(false)));
        Ok((0..n).map(|rank| LocalGroup { rank, size: n, shared: shared.clone() }).collect())
    }

    /// Runs `f` on `n` simulated ranks, one thread each, and returns the results in rank order.
    /// If one rank panics, the others' collectives fail instead of waiting, and the panic is
    /// re-raised here.
    pub fn run<T: Send>(n: usize, f: impl Fn(LocalGroup) -> T + Sync) -> Result<Vec<T>> {
        let handles = LocalGroup::new(n)?;
        let aborted = handles[0].shared.rendezvous.aborted.clone();
        std::thread::scope(|s| {
            let threads: Vec<_> = handles
                .into_iter()
                .map(|comm| {
                    let (f, aborted) = (&f, aborted.clone());
                    s.spawn(move || {
                        /// Marks the world aborted if this rank unwinds.
                        struct OnPanic(Arc<AtomicBool>);
                        impl Drop for OnPanic {
                            fn drop(&mut self) {
                                if std::thread::panicking() {
                                    self.0.store(true, Ordering::SeqCst);
                                }
                            }
                        }
                        let _guard = OnPanic(aborted);
                        f(comm)
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
            Ok(results.into_iter().map(|r| r.unwrap_or_else(|p| std::panic::resume_unwind(p))).collect())
        })
    }

    /// One collective: post `mine` (or the local error), wait for every rank, let `read` compute
    /// this rank's result from all posts, and wait again so no post is overwritten while a peer
    /// still reads it.
    fn collective<T>(&self, op: &str, mine: Result<Post>, read: impl FnOnce(&[Post]) -> Result<T>) -> Result<T> {
        let (post, own_err) = match mine {
            Ok(p) => (p, None),
            Err(e) => (Post { err: Some(e.to_string()), ..Post::default() }, Some(e)),
        };
        self.shared.posts.write().map_err(|_| poisoned())?[self.rank] = post;
        self.shared.rendezvous.wait()?;
        let out = match own_err {
            Some(e) => Err(e),
            None => {
                let posts = self.shared.posts.read().map_err(|_| poisoned())?;
                match posts.iter().enumerate().find_map(|(r, p)| p.err.as_ref().map(|e| (r, e))) {
                    Some((r, e)) => Err(Error::Invalid(format!("{op}: rank {r} failed: {e}"))),
                    None => read(&posts),
                }
            }
        };
        self.shared.rendezvous.wait()?;
        out
    }

    /// Checks that every rank posted `data` of the same length.
    fn same_len(op: &str, posts: &[Post]) -> Result<usize> {
        let n = posts[0].data.len();
        match posts.iter().position(|p| p.data.len() != n) {
            Some(r) => Err(Error::Invalid(format!(
                "{op}: rank 0 passed {n} elements but rank {r} passed {}",
                posts[r].data.len()
            ))),
            None => Ok(n),
        }
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let sum = self.collective("all_reduce_sum", Ok(Post { data: buf.to_vec(), ..Post::default() }), |posts| {
            Self::same_len("all_reduce_sum", posts)?;
            let mut acc = posts[0].data.clone();
            for p in &posts[1..] {
                acc.iter_mut().zip(&p.data).for_each(|(a, x)| *a += x);
            }
            Ok(acc)
        })?;
        buf.copy_from_slice(&sum);
        Ok(())
    }

    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        self.collective("all_gather", Ok(Post { data: send.to_vec(), ..Post::default() }), |posts| {
            Self::same_len("all_gather", posts)?;
            Ok(posts.iter().flat_map(|p| p.data.iter().copied()).collect())
        })
    }

    fn reduce_scatter_sum(&self, send: &[f32]) -> Result<Vec<f32>> {
        let mine = check_chunked("reduce_scatter_sum send length", send.len(), self.size)
            .map(|_| Post { data: send.to_vec(), ..Post::default() });
        self.collective("reduce_scatter_sum", mine, |posts| {
            let m = Self::same_len("reduce_scatter_sum", posts)? / self.size;
            let chunk = self.rank * m..(self.rank + 1) * m;
            let mut acc = posts[0].data[chunk.clone()].to_vec();
            for p in &posts[1..] {
                acc.iter_mut().zip(&p.data[chunk.clone()]).for_each(|(a, x)| *a += x);
            }
            Ok(acc)
        })
    }

    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        let mine = check_counts(send.len(), send_counts, self.size)
            .map(|_| Post { data: send.to_vec(), counts: send_counts.to_vec(), ..Post::default() });
        self.collective("all_to_all_v", mine, |posts| {
            let mut recv = Vec::new();
            let mut recv_counts = Vec::with_capacity(self.size);
            for p in posts {
                let start: usize = p.counts[..self.rank].iter().sum();
                let n = p.counts[self.rank];
                recv.extend_from_slice(&p.data[start..start + n]);
                recv_counts.push(n);
            }
            Ok((recv, recv_counts))
        })
    }

    fn all_to_all_counts(&self, send: &[usize]) -> Result<Vec<usize>> {
        let mine = check_chunked("all_to_all_counts send length", send.len(), self.size)
            .map(|_| Post { counts: send.to_vec(), ..Post::default() });
        self.collective("all_to_all_counts", mine, |posts| {
            let m = send.len() / self.size;
            if let Some(r) = posts.iter().position(|p| p.counts.len() != send.len()) {
                return Err(Error::Invalid(format!(
                    "all_to_all_counts: rank {} passed {} counts but rank {r} passed {}",
                    self.rank,
                    send.len(),
                    posts[r].counts.len()
                )));
            }
            Ok(posts.iter().flat_map(|p| p.counts[self.rank * m..(self.rank + 1) * m].iter().copied()).collect())
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let mine = if root < self.size {
            // Only the root's data matters; the others post their root and length for checking.
            let data = if self.rank == root { buf.to_vec() } else { Vec::new() };
            Ok(Post { data, counts: vec![root, buf.len()], ..Post::default() })
        } else {
            Err(Error::config("broadcast root", root, format!("a rank below {}", self.size)))
        };
        let data = self.collective("broadcast", mine, |posts| {
            if let Some(r) = posts.iter().position(|p| p.counts != posts[self.rank].counts) {
                return Err(Error::Invalid(format!(
                    "broadcast: rank {} passed (root, length) {:?} but rank {r} passed {:?}",
                    self.rank, posts[self.rank].counts, posts[r].counts
                )));
            }
            Ok(posts[root].data.clone())
        })?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.collective("barrier", Ok(Post::default()), |_| Ok(()))
    }

    fn split(&self, groups: &[Vec<usize>]) -> Result<Box<dyn Communicator>> {
        // Ranks post the flattened list so that a rank with a different list fails everywhere.
        let flat: Vec<usize> = groups.iter().flat_map(|g| std::iter::once(g.len()).chain(g.iter().copied())).collect();
        let mine = find_group(groups, self.size, self.rank).and_then(|found| {
            if self.rank == 0 {
                let aborted = self.shared.rendezvous.aborted.clone();
                *self.shared.children.lock().map_err(|_| poisoned())? =
                    groups.iter().map(|g| Shared::new(g.len(), aborted.clone())).collect();
            }
            Ok((found, Post { counts: flat, ..Post::default() }))
        });
        let (found, mine) = match mine {
            Ok((found, post)) => (Some(found), Ok(post)),
            Err(e) => (None, Err(e)),
        };
        self.collective("split", mine, |posts| {
            if let Some(r) = posts.iter().position(|p| p.counts != posts[0].counts) {
                return Err(Error::Invalid(format!("split: rank {r} passed a different group list than rank 0")));
            }
            let (group, position) = found.expect("a rank without errors found its group");
            let shared = self.shared.children.lock().map_err(|_| poisoned())?[group].clone();
            Ok(Box::new(LocalGroup { rank: position, size: groups[group].len(), shared }) as Box<dyn Communicator>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::ranks::{MoeGroup, ParallelConfig, ParallelLayout};

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        // Rounding makes the order visible: ((1e8 + 1) - 1e8) + 1 = 1 in f32, not 2.
        let vals = [1e8f32, 1.0, -1e8, 1.0];
        let out = LocalGroup::run(4, |c| {
            let mut buf = vec![vals[c.rank()], c.rank() as f32];
            c.all_reduce_sum(&mut buf).map(|_| buf)
        })
        .unwrap();
        let in_order = ((vals[0] + vals[1]) + vals[2]) + vals[3];
        for r in out {
            assert_eq!(r.unwrap(), vec![in_order, 6.0]);
        }
    }

    #[test]
    fn gather_scatter_broadcast_and_barrier() {
        let out = LocalGroup::run(4, |c| -> Result<_> {
            let r = c.rank() as f32;
            let gathered = c.all_gather(&[r, 10.0 + r])?;
            // Chunk j of rank r is [r + j, 2]: rank j receives Σ_r (r + j) = 6 + 4j and 8.
            let send: Vec<f32> = (0..4).flat_map(|j| [r + j as f32, 2.0]).collect();
            let scattered = c.reduce_scatter_sum(&send)?;
            let mut b = vec![r; 3];
            c.broadcast(&mut b, 2)?;
            c.barrier()?;
            Ok((gathered, scattered, b))
        })
        .unwrap();
        for (j, res) in out.into_iter().enumerate() {
            let (g, s, b) = res.unwrap();
            assert_eq!(g, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0]);
            assert_eq!(s, vec![6.0 + 4.0 * j as f32, 8.0]);
            assert_eq!(b, vec![2.0; 3]);
        }
    }

    #[test]
    fn all_to_all_v_with_uneven_and_empty_counts() {
        // Rank r sends d + 1 copies of the value 10·r + d to rank d, except nothing to itself.
        let out = LocalGroup::run(4, |c| {
            let r = c.rank();
            let counts: Vec<usize> = (0..4).map(|d| if d == r { 0 } else { d + 1 }).collect();
            let send: Vec<f32> = (0..4).flat_map(|d| vec![(10 * r + d) as f32; counts[d]]).collect();
            let meta = c.all_to_all_counts(&(0..8).map(|i| 100 * r + i).collect::<Vec<_>>());
            (c.all_to_all_v(&send, &counts), meta)
        })
        .unwrap();
        for (d, (res, meta)) in out.into_iter().enumerate() {
            let (recv, counts) = res.unwrap();
            let want_counts: Vec<usize> = (0..4).map(|s| if s == d { 0 } else { d + 1 }).collect();
            let want: Vec<f32> = (0..4).flat_map(|s| vec![(10 * s + d) as f32; want_counts[s]]).collect();
            assert_eq!((recv, counts), (want, want_counts));
            // Two counts per destination: rank d receives entries 2d, 2d+1 of every source.
            let want_meta: Vec<usize> = (0..4).flat_map(|s| [100 * s + 2 * d, 100 * s + 2 * d + 1]).collect();
            assert_eq!(meta.unwrap(), want_meta);
        }
    }

    #[test]
    fn split_into_ep_and_dp_groups_of_a_layout() {
        // World 4, tp 2, ep 2 (fold onto tp), etp 1: ep groups [0,1],[2,3]; edp groups [0,2],[1,3].
        let layout = ParallelLayout::new(&ParallelConfig {
            world: 4,
            tp: 2,
            cp: 1,
            pp: 1,
            ep: 2,
            etp: 1,
            order: "tp-cp-ep-dp-pp".into(),
        })
        .unwrap();
        let ep = layout.moe_groups(MoeGroup::Ep).to_vec();
        let dp = layout.moe_groups(MoeGroup::Dp).to_vec();
        assert_eq!(ep, vec![vec![0, 1], vec![2, 3]]);
        let out = LocalGroup::run(4, |c| -> Result<_> {
            let ep_comm = c.split(&ep)?;
            let dp_comm = c.split(&dp)?;
            let mut a = vec![c.rank() as f32];
            ep_comm.all_reduce_sum(&mut a)?;
            let mut b = vec![c.rank() as f32];
            dp_comm.all_reduce_sum(&mut b)?;
            Ok((ep_comm.rank(), ep_comm.size(), a[0], dp_comm.rank(), b[0]))
        })
        .unwrap();
        let got: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got, vec![(0, 2, 1.0, 0, 2.0), (1, 2, 1.0, 0, 4.0), (0, 2, 5.0, 1, 2.0), (1, 2, 5.0, 1, 4.0)]);
    }

    #[test]
    fn bad_arguments_fail_on_every_rank_without_hanging() {
        // Rank 1 passes a different length: every rank gets an error naming both.
        let out = LocalGroup::run(4, |c| c.all_reduce_sum(&mut vec![0.0; if c.rank() == 1 { 3 } else { 2 }])).unwrap();
        for r in out {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("rank 1 passed 3"), "{e}");
        }
        // Rank 2's counts do not sum to its send length: its own error, and the peers name rank 2.
        let out = LocalGroup::run(4, |c| c.all_to_all_v(&[1.0; 4], &[1, 1, 1, if c.rank() == 2 { 2 } else { 1 }])).unwrap();
        for (r, res) in out.into_iter().enumerate() {
            let e = res.unwrap_err().to_string();
            assert!(if r == 2 { e.contains("send_counts") } else { e.contains("rank 2 failed") }, "{e}");
        }
        // Groups that do not partition the ranks, and lists that differ between ranks.
        let out = LocalGroup::run(4, |c| c.split(&[vec![0, 1], vec![1, 2, 3]]).map(|_| ())).unwrap();
        assert!(out.iter().all(|r| r.as_ref().unwrap_err().to_string().contains("in two groups")));
        let out = LocalGroup::run(4, |c| {
            let groups = if c.rank() == 3 { vec![vec![0, 1, 2, 3]] } else { vec![vec![0, 1], vec![2, 3]] };
            c.split(&groups).map(|_| ())
        })
        .unwrap();
        assert!(out.iter().all(|r| r.as_ref().unwrap_err().to_string().contains("different group list")));
        assert!(SingleProcess.broadcast(&mut [1.0], 1).is_err());
        assert!(LocalGroup::new(0).is_err());
    }

    #[test]
    fn a_panicking_rank_releases_its_peers() {
        let caught = std::panic::catch_unwind(|| {
            LocalGroup::run(4, |c| {
                let sub = c.split(&[vec![0, 1], vec![2, 3]]).unwrap();
                if c.rank() == 3 {
                    panic!("rank 3 fails on purpose");
                }
                // Ranks 0..2 wait in collectives that rank 3 never joins; they must give up.
                assert!(c.barrier().is_err());
                assert!(sub.barrier().is_err() || c.rank() < 2);
            })
        });
        assert!(caught.is_err(), "the panic of rank 3 is re-raised");
    }
}
