//! The lease epochs of the log partitions whose writes this service applied.
//!
//! An indexing worker applies a partition's entries under the partition's lease, and says so
//! with a [`Fence`]. A worker that stalls past its lease (a long pause, a stopped process) may
//! resume after a successor took the partition and applied later entries, a Forget among them;
//! its late apply would bring the forgotten memories back. So each partition's applies run one
//! at a time here, and one under an older epoch than the newest applied is refused with ABORTED:
//! the stalled worker abandons its step, and its successor has the entries.
//!
//! The map holds at most one entry per log and partition (partitions are bounded by
//! `MAX_LOG_PARTITIONS`). Epochs are kept in memory: a restarted retrieval learns the newest
//! epoch from the first apply it gets, and the write log's fenced `finish` still refuses a
//! stale worker's acknowledgement.

use std::collections::HashMap;
use std::sync::Arc;

use engram_domain::api::{Fence, LogKind};
use engram_domain::{Error, Result};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// The newest epoch applied for one log partition; its lock is the partition's turn.
type Newest = Arc<Mutex<u64>>;

#[derive(Default)]
pub struct Fences {
    partitions: parking_lot::Mutex<HashMap<(LogKind, u32), Newest>>,
}

impl Fences {
    /// Wait for the partition's turn and admit an apply under `fence`, or refuse it if a newer
    /// holder of the lease has applied already. Hold the guard until the apply is done.
    pub async fn admit(&self, fence: Fence) -> Result<OwnedMutexGuard<u64>> {
        let slot = Arc::clone(
            self.partitions
                .lock()
                .entry((fence.log, fence.partition))
                .or_default(),
        );
        let mut newest = slot.lock_owned().await;
        if fence.epoch < *newest {
            return Err(Error::Aborted(format!(
                "the lease of {} log partition {} has moved on (epoch {} after {}): a newer worker applies its entries",
                fence.log.as_str(),
                fence.partition,
                *newest,
                fence.epoch,
            )));
        }
        *newest = fence.epoch;
        Ok(newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(partition: u32, epoch: u64) -> Fence {
        Fence {
            log: LogKind::Write,
            partition,
            epoch,
        }
    }

    #[tokio::test]
    async fn an_older_epoch_is_refused_once_a_newer_one_applied() {
        let fences = Fences::default();
        drop(fences.admit(fence(3, 1)).await.unwrap());
        drop(fences.admit(fence(3, 2)).await.unwrap());
        let refused = fences.admit(fence(3, 1)).await.unwrap_err();
        assert!(matches!(refused, Error::Aborted(_)), "{refused}");
        // The same epoch again, and other partitions, are not affected.
        drop(fences.admit(fence(3, 2)).await.unwrap());
        drop(fences.admit(fence(4, 1)).await.unwrap());
        let extraction = Fence {
            log: LogKind::Extraction,
            ..fence(3, 1)
        };
        drop(fences.admit(extraction).await.unwrap());
    }

    #[tokio::test]
    async fn applies_of_one_partition_run_one_at_a_time() {
        let fences = Arc::new(Fences::default());
        let held = fences.admit(fence(0, 1)).await.unwrap();
        let waiting = {
            let fences = Arc::clone(&fences);
            tokio::spawn(async move { fences.admit(fence(0, 2)).await.map(|g| *g) })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        assert_eq!(waiting.await.unwrap().unwrap(), 2);
    }
}
