//! Waiting for a logged write to be indexed: a SYNC write, Update or Forget in ingestion (which
//! reads its own log), read-your-writes at the gateway (which asks `Ingestion.Status`). One
//! poll loop, and one way a failed write becomes the caller's error
//! ([`engram_domain::api::WriteFailure::error`]).

use std::time::Duration;

use engram_domain::api::{WriteState, WriteToken};
use engram_domain::{Error, Result};

/// Poll `status` until the write behind `token` is indexed or has failed, and say which;
/// DEADLINE_EXCEEDED if it is still pending after `within`. A failed look (Redis or a peer
/// slow or restarting) is tried again until then.
pub async fn settled<F, Fut>(token: WriteToken, within: Duration, status: F) -> Result<WriteState>
where
    F: Fn(WriteToken) -> Fut,
    Fut: Future<Output = Result<WriteState>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(1);
    loop {
        match status(token).await {
            Ok(WriteState::Pending) => {}
            Ok(state) => return Ok(state),
            Err(_) if tokio::time::Instant::now() + pause <= deadline => {}
            Err(e) => return Err(e),
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Err(Error::DeadlineExceeded(format!(
                "the write {} was not indexed within {within:?}; it stays in the write log and is indexed once indexing recovers (Ingestion.Status tells when)",
                token.encode()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Like [`settled`], but a failed write is the error its failure maps to.
pub async fn indexed<F, Fut>(token: WriteToken, within: Duration, status: F) -> Result<()>
where
    F: Fn(WriteToken) -> Fut,
    Fut: Future<Output = Result<WriteState>>,
{
    if token == WriteToken::Indexed {
        return Ok(());
    }
    match settled(token, within, status).await? {
        WriteState::Failed(failure) => Err(failure.error(token)),
        WriteState::Pending | WriteState::Indexed => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engram_domain::api::{EntryId, FailureKind, WriteFailure};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn logged() -> WriteToken {
        WriteToken::Logged {
            partition: 0,
            entry: EntryId { ms: 1, seq: 0 },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_while_pending_and_through_failed_looks() {
        let looks = AtomicU32::new(0);
        let state = settled(logged(), Duration::from_secs(1), |_| {
            let n = looks.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Ok(WriteState::Pending),
                    1 => Err(Error::unavailable("redis restarting")),
                    _ => Ok(WriteState::Indexed),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(state, WriteState::Indexed);
        assert_eq!(looks.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_and_maps_a_failure_once() {
        let pending = settled(logged(), Duration::from_millis(50), |_| async {
            Ok(WriteState::Pending)
        })
        .await
        .unwrap_err();
        assert_eq!(pending.code(), engram_domain::error::Code::DeadlineExceeded);
        let failure = WriteFailure {
            kind: FailureKind::NotFound,
            message: "memory x not found".into(),
        };
        let failed = indexed(logged(), Duration::from_secs(1), |_| {
            let failure = failure.clone();
            async move { Ok(WriteState::Failed(failure)) }
        })
        .await
        .unwrap_err();
        assert_eq!(failed, failure.error(logged()));
        // Nothing to wait for: no look at all.
        indexed(WriteToken::Indexed, Duration::ZERO, |_| async {
            Err::<WriteState, _>(Error::internal("not called"))
        })
        .await
        .unwrap();
    }
}
