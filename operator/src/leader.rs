//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas never
//! both drive a cluster: only the holder reconciles; the others wait to take over.
//!
//! Expiry is judged on this process's own monotonic clock (how long the holder's
//! `renewTime` has gone unchanged since we first saw it), not by comparing timestamps
//! written by another machine, so clock skew between nodes cannot cause two leaders.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// Timing of the election.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder's lease lasts without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_period: Duration,
}

/// What a candidate should do with the Lease as it found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create one naming us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else's lease expired: take it over.
    TakeOver,
    /// Someone else holds a live lease: wait.
    Wait,
}

/// What the candidate remembers of another holder's lease between polls.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// `(holder, renewTime)` last seen, and when we first saw that exact pair.
    last: Option<(String, String, Instant)>,
}

/// Decides the next step for `me` given the Lease's spec (if it exists).
pub fn step(spec: Option<&LeaseSpec>, me: &str, observed: &mut Observed, now: Instant) -> Step {
    let Some(spec) = spec else {
        return Step::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        // Released by its holder.
        return Step::TakeOver;
    }
    let renew = spec
        .renew_time
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    let since = match &observed.last {
        Some((h, r, at)) if *h == holder && *r == renew => *at,
        _ => {
            observed.last = Some((holder, renew, now));
            now
        }
    };
    if now.duration_since(since) > duration {
        Step::TakeOver
    } else {
        Step::Wait
    }
}

/// Blocks until this replica holds the Lease, then keeps renewing it in the background.
/// The returned receiver turns `false` once a renewal has failed for a whole lease
/// duration; the caller must then stop acting (the operator exits and restarts as a
/// candidate), since another replica may take over from that moment.
pub async fn acquire(
    api: Api<Lease>,
    config: ElectionConfig,
) -> tokio::sync::watch::Receiver<bool> {
    let mut observed = Observed::default();
    let mut renewed;
    loop {
        renewed = tokio::time::Instant::now();
        match try_once(&api, &config, &mut observed).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => warn!("leader election: {e}"),
        }
        tokio::time::sleep(config.retry_period).await;
    }
    info!(identity = %config.identity, lease = %config.name, "became leader");
    let (tx, rx) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        // Others may take over one lease duration after they first see our last renewal,
        // which is no earlier than when we sent it; stop a retry period before that. Each
        // call is bounded by that deadline: a renewal that hangs (the client's own timeout
        // is minutes) must not keep us acting after another replica took over.
        let margin = config.retry_period.min(config.lease_duration / 2);
        loop {
            tokio::time::sleep(config.retry_period).await;
            let deadline = renewed + config.lease_duration - margin;
            let sent = tokio::time::Instant::now();
            let attempt =
                tokio::time::timeout_at(deadline, try_once(&api, &config, &mut observed)).await;
            match attempt {
                Ok(Ok(true)) => renewed = sent,
                Ok(Ok(false)) => {
                    warn!("leader election: lease taken by another replica");
                    let _ = tx.send(false);
                    return;
                }
                Ok(Err(e)) => warn!("leader election: renewal failed: {e}"),
                Err(_) => warn!("leader election: renewal did not answer in time"),
            }
            if tokio::time::Instant::now() + config.retry_period >= deadline {
                warn!("leader election: no renewal for too long; giving up leadership");
                let _ = tx.send(false);
                return;
            }
        }
    });
    rx
}

/// One poll: returns whether we hold the Lease afterwards.
async fn try_once(
    api: &Api<Lease>,
    config: &ElectionConfig,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let duration = config.lease_duration.as_secs().max(1) as i32;
    let next = step(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &config.identity,
        observed,
        Instant::now(),
    );
    let result = match (next, current) {
        (Step::Wait, _) => return Ok(false),
        (Step::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        (step, Some(mut lease)) => {
            // `replace` carries the resourceVersion we read, so a concurrent writer makes
            // this fail with a conflict instead of both of us winning.
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if step == Step::TakeOver {
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(duration);
            spec.renew_time = Some(now);
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
                .map(drop)
        }
        (_, None) => return Ok(false),
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renew_secs: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_second(renew_secs).unwrap(),
            )),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn no_lease_means_create_and_our_own_means_renew() {
        let mut seen = Observed::default();
        assert_eq!(step(None, "a", &mut seen, Instant::now()), Step::Create);
        assert_eq!(
            step(Some(&lease("a", 1)), "a", &mut seen, Instant::now()),
            Step::Renew
        );
    }

    #[test]
    fn a_live_lease_is_respected_and_a_stale_one_taken_over() {
        let mut seen = Observed::default();
        let t0 = Instant::now();
        // (holder's renewal count, seconds after t0, expected step)
        let rounds = [
            (1, 0, Step::Wait),
            // Still the same renewTime 10 s later: not yet expired.
            (1, 10, Step::Wait),
            // The holder renews: the clock restarts from this sighting.
            (2, 14, Step::Wait),
            (2, 20, Step::Wait),
            // Unchanged for longer than the lease duration: take over.
            (2, 30, Step::TakeOver),
        ];
        for (renewals, secs, expected) in rounds {
            let at = t0 + Duration::from_secs(secs);
            assert_eq!(
                step(Some(&lease("b", renewals)), "a", &mut seen, at),
                expected,
                "at {secs} s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_ends_leadership_before_the_lease_runs_out() {
        let api = crate::testing::FakeApi::default();
        let leases: Api<Lease> = Api::namespaced(api.client(), "ops");
        let config = ElectionConfig {
            name: "distkv-operator".into(),
            namespace: "ops".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(3),
        };
        let mut held = acquire(leases, config).await;
        // Renewed once, then the API server stops answering (a partition, not an error).
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(*held.borrow());
        api.hang_paths("/leases/");
        let renewed = tokio::time::Instant::now() - Duration::from_secs(1);
        let lost = tokio::time::timeout(Duration::from_secs(120), async {
            while *held.borrow() {
                held.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            lost.is_ok(),
            "leadership never given up while renewals hang"
        );
        // Another replica may take over 15 s after our last renewal went out.
        assert!(
            renewed.elapsed() < Duration::from_secs(15),
            "given up {:?} after the last renewal",
            renewed.elapsed()
        );
    }

    #[test]
    fn timestamps_from_another_clock_do_not_decide_expiry() {
        // A renewTime far in the past (skewed clock) is still a live lease on first sight.
        let mut seen = Observed::default();
        assert_eq!(
            step(Some(&lease("b", 0)), "a", &mut seen, Instant::now()),
            Step::Wait
        );
    }
}
