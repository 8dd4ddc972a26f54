//! Linearizability per key through the router while leaders die and stall: concurrent
//! clients share a few keys, every operation is recorded with the real-time interval in
//! which it ran and what it answered, and the history is checked against what any
//! linearizable register with versions must show.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use dataplane::client::{AdminClient, ClientError, HttpClient, Response, full};
use hyper::Method;

/// Clients running at once.
const CLIENTS: usize = 8;
/// Keys they share; few, so that they contend.
const KEYS: usize = 5;
/// Faults injected, one after the other.
const ROUNDS: usize = 8;
/// The playground's leader lease; a stopped leader stays stopped longer than this.
const LEASE_MS: u64 = 500;
/// The playground's default wait beyond the lease before it replaces a silent leader.
const GRACE_MS: u64 = 300;
/// Longest a client waits for one answer; past it the operation's outcome is unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Key `i` of the shared set: one hash tag, so one shard, so every fault hits them all.
fn key(i: usize) -> String {
    format!("{{lin}}k{i}")
}

/// A value's version, `(epoch, seq)` as its ETag `"epoch-seq"` carries it; `(0, 0)` is
/// the version of a key that was never written.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
struct Version(u64, u64);

impl Version {
    fn from_etag(r: &Response) -> Version {
        let tag = etag(r);
        let (e, s) = tag
            .trim_matches('"')
            .split_once('-')
            .unwrap_or_else(|| panic!("ETag {tag} is not \"epoch-seq\""));
        Version(e.parse().unwrap(), s.parse().unwrap())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// What a client asked.
#[derive(Clone, Debug)]
enum Request {
    Get,
    /// A PUT of a value no other request writes; with `if_match`, a compare-and-set.
    Put {
        value: String,
        if_match: Option<Version>,
    },
}

/// What it learned.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// A read: the version and the value (`None`: the key was absent).
    Read(Version, Option<String>),
    /// An acknowledged write and the version it got.
    Written(Version),
    /// A write that was certainly not applied: 412, or a 503 that says nothing was written.
    Refused { precondition_failed: bool },
    /// A write that may or may not have taken effect, or a read that answered nothing.
    Unknown(String),
}

/// One operation, with the interval it ran in (nanoseconds since the run began): invoked
/// before the request left, completed after the answer arrived.
#[derive(Clone, Debug)]
struct Op {
    client: usize,
    key: usize,
    request: Request,
    invoke: u64,
    complete: u64,
    outcome: Outcome,
}

impl Op {
    /// The version this operation shows the key at: a read's, or an acknowledged write's.
    fn observed(&self) -> Option<Version> {
        match self.outcome {
            Outcome::Read(v, _) | Outcome::Written(v) => Some(v),
            _ => None,
        }
    }

    fn written_value(&self) -> Option<&str> {
        match &self.request {
            Request::Put { value, .. } => Some(value),
            Request::Get => None,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.client == usize::MAX {
            "final read".to_string()
        } else {
            format!("client {}", self.client)
        };
        let secs = |ns: u64| ns as f64 / 1e9;
        write!(f, "{who} ")?;
        match &self.request {
            Request::Get => write!(f, "GET {}", key(self.key))?,
            Request::Put { value, if_match } => {
                write!(f, "PUT {} {value:?}", key(self.key))?;
                if let Some(v) = if_match {
                    write!(f, " If-Match {v}")?;
                }
            }
        }
        write!(
            f,
            " [{:.4}s..{:.4}s] -> ",
            secs(self.invoke),
            secs(self.complete)
        )?;
        match &self.outcome {
            Outcome::Read(v, Some(value)) => write!(f, "{value:?} at {v}"),
            Outcome::Read(_, None) => write!(f, "absent"),
            Outcome::Written(v) => write!(f, "written at {v}"),
            Outcome::Refused {
                precondition_failed: true,
            } => write!(f, "412"),
            Outcome::Refused { .. } => write!(f, "refused, nothing written"),
            Outcome::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// 503 codes that say the write was not applied (README, error table): refused before
/// anything was stored, or decided on a state it did not change.
const NOT_WRITTEN: [&str; 5] = [
    "no_leader",
    "lease_expired",
    "not_enough_replicas",
    "value_not_committed",
    "leader_moved",
];

/// What an answer (or its absence) says about a request.
fn outcome(request: &Request, answer: Result<Response, ClientError>) -> Outcome {
    let r = match answer {
        Ok(r) => r,
        Err(ClientError::Timeout(_)) => return Outcome::Unknown("client timeout".into()),
        Err(e) => return Outcome::Unknown(format!("no answer: {e}")),
    };
    let status = r.status.as_u16();
    match (request, status) {
        (Request::Get, 200) => Outcome::Read(
            Version::from_etag(&r),
            Some(String::from_utf8(r.body.to_vec()).unwrap()),
        ),
        (Request::Get, 404) => Outcome::Read(Version::default(), None),
        (Request::Put { .. }, 200 | 201) => Outcome::Written(Version::from_etag(&r)),
        (Request::Put { .. }, 412) => Outcome::Refused {
            precondition_failed: true,
        },
        (Request::Put { .. }, 503) => {
            let (code, message) = error_of(&r);
            // The router says so when a request it could not finish had reached a replica.
            let never_sent =
                code == "upstream_unavailable" && !message.contains("outcome is unknown");
            if NOT_WRITTEN.contains(&code.as_str()) || never_sent {
                Outcome::Refused {
                    precondition_failed: false,
                }
            } else {
                Outcome::Unknown(code)
            }
        }
        _ => Outcome::Unknown(format!("{status} {}", error_of(&r).0)),
    }
}

/// `(error.code, error.message)` of an error answer, empty when it has none.
fn error_of(r: &Response) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let text = |f: &str| v["error"][f].as_str().unwrap_or_default().to_string();
    (text("code"), text("message"))
}

/// Sends `request` for key `k` through the router and records it.
async fn perform(
    http: &HttpClient,
    router: &str,
    t0: Instant,
    client: usize,
    k: usize,
    request: Request,
) -> Op {
    let path = format!("/v1/kv/{}", key(k));
    let if_match = match &request {
        Request::Put {
            if_match: Some(v), ..
        } => Some(format!("\"{v}\"")),
        _ => None,
    };
    let headers: Vec<(&str, &str)> = if_match.iter().map(|v| ("if-match", v.as_str())).collect();
    let (method, body) = match &request {
        Request::Get => (Method::GET, String::new()),
        Request::Put { value, .. } => (Method::PUT, value.clone()),
    };
    let invoke = t0.elapsed().as_nanos() as u64;
    let answer = http
        .call(method, router, &path, &headers, full(body), CLIENT_TIMEOUT)
        .await;
    let complete = t0.elapsed().as_nanos() as u64;
    Op {
        client,
        key: k,
        outcome: outcome(&request, answer),
        request,
        invoke,
        complete,
    }
}

/// One client: a random mix of reads, blind writes and compare-and-sets on the shared
/// keys until `stop`; a compare-and-set names the last version this client saw.
async fn client(
    id: usize,
    seed: u64,
    router: String,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Op> {
    let http = HttpClient::new();
    let mut rng = Rng(seed);
    let mut seen: Vec<Option<Version>> = vec![None; KEYS];
    let mut ops = Vec::new();
    let mut written = 0;
    while !stop.load(Ordering::Relaxed) {
        let k = (rng.next() % KEYS as u64) as usize;
        let roll = rng.next() % 100;
        let request = if roll < 45 {
            Request::Get
        } else {
            written += 1;
            Request::Put {
                value: format!("c{id}-{written}"),
                if_match: seen[k].filter(|_| roll >= 75),
            }
        };
        let op = perform(&http, &router, t0, id, k, request).await;
        match &op.outcome {
            Outcome::Read(v, Some(_)) | Outcome::Written(v) => seen[k] = Some(*v),
            // An absent key has no version to name: `If-Match` would be refused whatever.
            Outcome::Read(_, None) => seen[k] = None,
            // As a real client would, rather than spin while the shard has no leader.
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        ops.push(op);
    }
    ops
}

/// A fault the nemesis injects.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// kill -9 of the shard's leader.
    KillLeader,
    /// SIGSTOP of the leader for this long (past its lease), then SIGCONT.
    StopLeader(Duration),
    /// kill -9 of a follower.
    KillFollower,
    /// SIGSTOP of every follower for this long (shorter than the in-sync timeout, so they
    /// stay in the set), kill -9 of the leader, then SIGCONT: the leader dies holding
    /// writes nobody else has.
    IsolateThenKillLeader(Duration),
}

impl Fault {
    fn pick(rng: &mut Rng) -> Fault {
        match rng.next() % 10 {
            0..=2 => Fault::KillLeader,
            3..=5 => Fault::StopLeader(Duration::from_millis(
                LEASE_MS + GRACE_MS + 200 + rng.next() % 1000,
            )),
            6..=8 => Fault::IsolateThenKillLeader(Duration::from_millis(200 + rng.next() % 500)),
            _ => Fault::KillFollower,
        }
    }
}

/// Waits, within `limit`, for shard 0 to have a leader and every replica back in sync;
/// whether it did (a fault may land on a shard still healing, which is fine too).
async fn settle(http: &Http, router: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if fully_in_sync(http, router, 0).await && leader_of(http, router, 0).await.is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Injects `fault` into shard 0 and returns what it did, once it is over.
async fn inject(pg: &Playground, http: &Http, fault: Fault) -> String {
    let Some((leader, epoch)) = leader_of(http, &pg.router, 0).await else {
        return "no leader known: skipped".into();
    };
    let nodes = pg.info().nodes;
    let followers: Vec<_> = nodes
        .iter()
        .filter(|n| n.shard == 0 && n.id != leader)
        .collect();
    let target = match fault {
        Fault::KillFollower => followers.first().copied(),
        _ => nodes.iter().find(|n| n.id == leader),
    };
    let Some(target) = target else {
        return format!("{fault:?}: no target known, skipped");
    };
    match fault {
        Fault::KillLeader | Fault::KillFollower => signal(target.pid, libc::SIGKILL),
        Fault::StopLeader(d) => {
            signal(target.pid, libc::SIGSTOP);
            tokio::time::sleep(d).await;
            signal(target.pid, libc::SIGCONT);
        }
        Fault::IsolateThenKillLeader(d) => {
            followers.iter().for_each(|f| signal(f.pid, libc::SIGSTOP));
            tokio::time::sleep(d).await;
            signal(target.pid, libc::SIGKILL);
            followers.iter().for_each(|f| signal(f.pid, libc::SIGCONT));
        }
    }
    format!(
        "{fault:?} of {} (pid {}; {leader} led at epoch {epoch})",
        target.id, target.pid
    )
}

/// After the run: each key read through the router until it answers, as operations
/// invoked after every other one completed.
async fn final_reads(router: &str, t0: Instant) -> Vec<Op> {
    let http = HttpClient::new();
    let mut ops = Vec::new();
    for k in 0..KEYS {
        let op = eventually("a final read", Duration::from_secs(20), || async {
            let op = perform(&http, router, t0, usize::MAX, k, Request::Get).await;
            matches!(op.outcome, Outcome::Read(..)).then_some(op)
        })
        .await;
        ops.push(op);
    }
    ops
}

/// Every violation of the register's rules in one key's history (`ops` of that key).
///
/// What is checked holds for any linearizable history, whatever the outcome of the
/// operations whose outcome is unknown: those may have taken effect at any moment after
/// they were invoked, or never.
fn violations(ops: &[Op]) -> Vec<String> {
    let mut found = Vec::new();
    let writes: HashMap<&str, &Op> = ops
        .iter()
        .filter_map(|op| Some((op.written_value()?, op)))
        .collect();

    // 1. No phantoms: a value read was written by a PUT invoked before the read ended,
    // which was not refused; one write has one version, and one version one value.
    let mut version_of: HashMap<&str, (Version, &Op)> = HashMap::new();
    let mut value_at: HashMap<Version, (Option<&str>, &Op)> = HashMap::new();
    for op in ops {
        let (v, value) = match &op.outcome {
            Outcome::Read(v, value) => (*v, value.as_deref()),
            Outcome::Written(v) => (*v, op.written_value()),
            _ => continue,
        };
        if let Some((other, first)) = value_at.insert(v, (value, op))
            && other != value
        {
            found.push(format!("version {v} holds two values:\n  {first}\n  {op}"));
        }
        let Some(value) = value else { continue };
        if let Some((other, first)) = version_of.insert(value, (v, op))
            && other != v
        {
            found.push(format!(
                "one write shows as two versions:\n  {first}\n  {op}"
            ));
        }
        let Some(w) = writes.get(value) else {
            found.push(format!("a value nobody wrote:\n  {op}"));
            continue;
        };
        if matches!(w.outcome, Outcome::Refused { .. }) {
            found.push(format!("the value of a refused write:\n  {op}\n  {w}"));
        }
        if w.invoke > op.complete {
            found.push(format!(
                "a value read before its write began:\n  {op}\n  {w}"
            ));
        }
    }

    // 2 and 3. Real time: an operation that began after another ended sees the key at
    // that one's version or later; a write after it makes a strictly later version. So
    // nothing acknowledged is lost, and no read goes back in time.
    let mut by_end: Vec<&Op> = ops.iter().filter(|op| op.observed().is_some()).collect();
    by_end.sort_by_key(|op| op.complete);
    // latest[i]: the op with the highest version among by_end[..=i].
    let mut latest: Vec<&Op> = Vec::with_capacity(by_end.len());
    for op in &by_end {
        let best = match latest.last() {
            Some(b) if b.observed() >= op.observed() => *b,
            _ => *op,
        };
        latest.push(best);
    }
    for op in ops {
        let Some(v) = op.observed() else { continue };
        let before = by_end.partition_point(|a| a.complete < op.invoke);
        let Some(a) = before.checked_sub(1).map(|i| latest[i]) else {
            continue;
        };
        let floor = a.observed().unwrap();
        let stale = match op.outcome {
            Outcome::Written(_) => v <= floor,
            _ => v < floor,
        };
        if stale {
            found.push(format!(
                "went back in time: {v} after {floor}:\n  {a}\n  {op}"
            ));
        }
    }

    // 4. A compare-and-set that succeeded replaced the version it named: nothing was
    // seen between the two.
    let seen: BTreeSet<Version> = ops.iter().filter_map(Op::observed).collect();
    for op in ops {
        let (
            Request::Put {
                if_match: Some(p), ..
            },
            Outcome::Written(c),
        ) = (&op.request, &op.outcome)
        else {
            continue;
        };
        if let Some(between) = seen.range(*p..*c).find(|v| *v > p) {
            let witness = ops.iter().find(|o| o.observed() == Some(*between)).unwrap();
            found.push(format!(
                "a compare-and-set skipped {between}:\n  {op}\n  {witness}"
            ));
        }
    }

    // 5. A compare-and-set refused with 412 names a version the key had moved past: one
    // read after it ended still at that version means the key held it throughout.
    for op in ops {
        let (
            Request::Put {
                if_match: Some(p), ..
            },
            Outcome::Refused {
                precondition_failed: true,
            },
        ) = (&op.request, &op.outcome)
        else {
            continue;
        };
        let later = ops.iter().find(|r| {
            matches!(r.outcome, Outcome::Read(v, Some(_)) if v == *p) && r.invoke > op.complete
        });
        if let Some(r) = later {
            found.push(format!(
                "412 while the key held the version named:\n  {op}\n  {r}"
            ));
        }
    }
    found
}

/// Waits until every replica of shard 0 holds exactly the same data (verified digests).
async fn replicas_converge(pg: &Playground) {
    let admin = AdminClient::new(Duration::from_secs(2));
    eventually("replicas to converge", Duration::from_secs(30), || async {
        let mut digests = Vec::new();
        for n in pg.info().nodes.iter().filter(|n| n.shard == 0) {
            let st = admin.verified_status(&n.address).await.ok()?;
            digests.push((st.last_seq, st.digest, st.keys));
        }
        digests.windows(2).all(|w| w[0] == w[1]).then_some(())
    })
    .await;
}

/// Counts of operations by kind and outcome, for the summary.
fn tally(ops: &[Op]) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for op in ops {
        let kind = match &op.request {
            Request::Get => "get",
            Request::Put { if_match: None, .. } => "put",
            Request::Put { .. } => "cas",
        };
        let outcome = match &op.outcome {
            Outcome::Read(_, Some(_)) | Outcome::Written(_) => "ok".to_string(),
            Outcome::Read(_, None) => "absent".to_string(),
            Outcome::Refused {
                precondition_failed: true,
            } => "412".to_string(),
            Outcome::Refused { .. } => "refused".to_string(),
            Outcome::Unknown(why) => format!("unknown:{}", why.split(':').next().unwrap()),
        };
        *counts.entry(format!("{kind} {outcome}")).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    counts
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Eight clients read, write and compare-and-set five keys of one shard through the
/// router while its leader is killed (-9), stopped past its lease, or cut off from its
/// stopped followers and then killed, and now and then a follower is killed, at seeded
/// random moments (`DISTKV_SEED` makes the same choices again), the playground failing
/// over and restarting as it does for users. Every key's history is linearizable as far
/// as these rules can tell: no value that was never written or was refused, one version
/// per write, no read older than anything that completed before it began, no
/// acknowledged write lost, compare-and-set neither skipping a version nor refusing a
/// current one; and at the end the replicas hold identical data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_through_the_router_is_linearizable_per_key_under_faults() {
    let seed = std::env::var("DISTKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.unwrap().as_nanos() as u64
        });
    println!("seed {seed} (DISTKV_SEED={seed} makes the same choices again; timing differs)");
    let started = Instant::now();
    let lease = LEASE_MS.to_string();
    let pg = Playground::start(1, 3, &["--lease-ms", &lease]);
    let http = Http::default();
    assert!(settle(&http, &pg.router, Duration::from_secs(20)).await);

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let client_seed = seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            tokio::spawn(client(
                id,
                client_seed.max(1),
                pg.router.clone(),
                t0,
                stop.clone(),
            ))
        })
        .collect();

    let mut rng = Rng(seed.max(1));
    let mut faults = Vec::new();
    for round in 0..ROUNDS {
        let settled = settle(&http, &pg.router, Duration::from_secs(8)).await;
        tokio::time::sleep(Duration::from_millis(200 + rng.next() % 800)).await;
        let at = t0.elapsed();
        let did = inject(&pg, &http, Fault::pick(&mut rng)).await;
        let note = if settled {
            ""
        } else {
            " (shard still healing)"
        };
        println!("round {round} at {at:.2?}: {did}{note}");
        faults.push(did);
    }
    settle(&http, &pg.router, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    for c in clients {
        ops.extend(c.await.unwrap());
    }
    let client_ops = ops.len();
    ops.extend(final_reads(&pg.router, t0).await);
    replicas_converge(&pg).await;

    let mut found = Vec::new();
    for k in 0..KEYS {
        let history: Vec<Op> = ops.iter().filter(|op| op.key == k).cloned().collect();
        for v in violations(&history) {
            found.push(format!("{}: {v}", key(k)));
        }
    }
    println!(
        "LINEARIZABILITY: seed {seed}, {} faults, {client_ops} operations in {:.1?} ({}), \
         {} violations; test took {:.1?}",
        faults.len(),
        t0.elapsed(),
        tally(&ops[..client_ops]),
        found.len(),
        started.elapsed()
    );
    for v in found.iter().take(20) {
        println!("VIOLATION {v}");
    }
    assert!(found.is_empty(), "{} violations (seed {seed})", found.len());
}

/// The checker itself: it accepts a linearizable history, including writes of unknown
/// outcome that took effect late, and flags each kind of violation it looks for.
#[test]
fn checker_flags_what_no_register_allows() {
    let put = |value: &str, if_match: Option<Version>| Request::Put {
        value: value.into(),
        if_match,
    };
    let read = |v: Version, value: &str| Outcome::Read(v, Some(value.into()));
    let op = |request: Request, ms: (u64, u64), outcome: Outcome| Op {
        client: 0,
        key: 0,
        request,
        invoke: ms.0 * 1_000_000,
        complete: ms.1 * 1_000_000,
        outcome,
    };
    let (v1, v2, v3) = (Version(1, 1), Version(1, 2), Version(2, 3));
    let w1 = op(put("a", None), (0, 1), Outcome::Written(v1));
    let w2 = op(put("b", None), (2, 3), Outcome::Written(v2));
    let late = op(put("c", None), (4, 5), Outcome::Unknown("timeout".into()));
    let absent = Outcome::Read(Version::default(), None);
    // An absent key has no version: `If-Match` on it is refused, and is no violation.
    let named_absent = vec![
        op(Request::Get, (0, 1), absent.clone()),
        op(
            put("z", Some(Version::default())),
            (2, 3),
            Outcome::Refused {
                precondition_failed: true,
            },
        ),
        op(Request::Get, (4, 5), absent.clone()),
    ];
    assert_eq!(violations(&named_absent), Vec::<String>::new());
    let fine = vec![
        op(Request::Get, (0, 1), absent),
        w1.clone(),
        op(Request::Get, (1, 2), read(v1, "a")),
        op(put("d", Some(v1)), (2, 6), Outcome::Written(v2)),
        op(
            put("e", Some(v1)),
            (7, 8),
            Outcome::Refused {
                precondition_failed: true,
            },
        ),
        late.clone(),
        op(Request::Get, (9, 10), read(v3, "c")),
    ];
    assert_eq!(violations(&fine), Vec::<String>::new());

    let refused = Outcome::Refused {
        precondition_failed: false,
    };
    let bad: [(&str, Vec<Op>); 8] = [
        (
            "went back in time",
            vec![
                w1.clone(),
                w2.clone(),
                op(Request::Get, (4, 5), read(v1, "a")),
            ],
        ),
        (
            "went back in time",
            vec![
                w2.clone(),
                op(
                    Request::Get,
                    (4, 5),
                    Outcome::Read(Version::default(), None),
                ),
            ],
        ),
        (
            "nobody wrote",
            vec![op(Request::Get, (0, 1), read(v1, "x"))],
        ),
        (
            "refused write",
            vec![
                op(put("x", None), (0, 1), refused),
                op(Request::Get, (2, 3), read(v1, "x")),
            ],
        ),
        (
            "before its write began",
            vec![late.clone(), op(Request::Get, (0, 1), read(v3, "c"))],
        ),
        (
            "two versions",
            vec![w1.clone(), op(Request::Get, (0, 2), read(v2, "a"))],
        ),
        (
            "skipped",
            vec![
                w1.clone(),
                w2.clone(),
                op(put("d", Some(v1)), (2, 6), Outcome::Written(v3)),
            ],
        ),
        (
            "412 while the key held",
            vec![
                w1.clone(),
                op(
                    put("e", Some(v1)),
                    (2, 3),
                    Outcome::Refused {
                        precondition_failed: true,
                    },
                ),
                op(Request::Get, (4, 5), read(v1, "a")),
            ],
        ),
    ];
    for (expected, history) in bad {
        let found = violations(&history);
        assert!(
            found.iter().any(|v| v.contains(expected)),
            "expected {expected:?}, found {found:?}"
        );
    }
}
