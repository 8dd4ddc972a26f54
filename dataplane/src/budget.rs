//! The bound on request bodies held in memory at once, all requests of a process
//! together.
//!
//! A value is held whole at every hop (the router, then the leader) until its write is
//! answered. Without a bound, N concurrent uploads of the largest value hold N times it,
//! and enough of them end in an out-of-memory kill: a failover, or a router gone.
//!
//! Bytes count as they arrive, so a client that declares a large body and sends nothing
//! holds nothing. The first [`UNCOUNTED`] bytes of each body never count: small writes
//! never wait, whatever large ones hold. A body that declares its length takes room for
//! all of it at once when its first counted byte arrives, so bodies do not each hold
//! part and wait for each other; one that then comes too slowly is cut off
//! ([`crate::api::BODY_MIN_RATE`]), so a client cannot hold the room by sending a byte
//! now and then.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of each body that do not count against the budget.
pub const UNCOUNTED: usize = 64 << 10;

/// How long a body waits for room before its request is refused.
const WAIT: Duration = Duration::from_secs(5);

/// Bytes of request bodies a process holds at once, unless one body may be larger.
const BYTES: usize = 64 << 20;

/// The room left for request bodies.
#[derive(Clone)]
pub struct BodyBudget {
    room: Arc<Semaphore>,
    bytes: usize,
    wait: Duration,
}

/// Room a body holds until it is dropped, with the request's answer.
#[derive(Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

/// No room came free in time.
#[derive(Debug, thiserror::Error)]
#[error("request bodies already hold all {budget} bytes this process keeps for them; retry")]
pub struct Full {
    /// The budget, all of it held.
    pub budget: usize,
}

impl BodyBudget {
    /// A budget of `bytes`, waited on for at most `wait`.
    pub fn new(bytes: usize, wait: Duration) -> Self {
        BodyBudget {
            room: Arc::new(Semaphore::new(bytes)),
            bytes,
            wait,
        }
    }

    /// The budget for bodies up to `max_body`: 64 MiB, or one such body if larger.
    pub fn for_bodies_up_to(max_body: usize) -> Self {
        Self::new(BYTES.max(max_body), WAIT)
    }

    /// Takes room for `bytes` more into `held`, waiting for it if need be.
    pub async fn take(&self, bytes: usize, held: &mut Held) -> Result<(), Full> {
        // More than the whole budget would wait for ever.
        let n = u32::try_from(bytes.min(self.bytes)).unwrap_or(u32::MAX);
        if n == 0 {
            return Ok(());
        }
        let permit = match self.room.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => tokio::time::timeout(self.wait, self.room.clone().acquire_many_owned(n))
                .await
                .map_err(|_| Full { budget: self.bytes })?
                .expect("the semaphore is never closed"),
        };
        match &mut held.0 {
            Some(p) => p.merge(permit),
            none => *none = Some(permit),
        }
        Ok(())
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.bytes - self.room.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_held_until_dropped_and_waited_for() {
        let budget = BodyBudget::new(100, Duration::from_secs(30));
        let mut a = Held::default();
        budget.take(60, &mut a).await.unwrap();
        budget.take(30, &mut a).await.unwrap();
        assert_eq!(budget.held(), 90);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move {
                let mut b = Held::default();
                budget.take(100, &mut b).await.map(|()| b)
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!waiting.is_finished());
        drop(a);
        let b = waiting
            .await
            .unwrap()
            .expect("room came free within the wait");
        assert_eq!(budget.held(), 100);
        drop(b);
        assert_eq!(budget.held(), 0);
        // More than the whole budget takes all of it rather than waiting for ever.
        let mut c = Held::default();
        budget.take(1_000, &mut c).await.unwrap();
        assert_eq!(budget.held(), 100);
    }

    #[tokio::test]
    async fn a_full_budget_refuses_after_its_wait_and_holds_nothing_for_it() {
        let budget = BodyBudget::new(10, Duration::from_millis(20));
        let mut a = Held::default();
        budget.take(10, &mut a).await.unwrap();
        let mut b = Held::default();
        assert!(budget.take(1, &mut b).await.is_err());
        drop(a);
        assert_eq!(budget.held(), 0);
    }
}
