//! Test harness: real `distkv` processes on loopback, in temporary directories.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dataplane::client::{AdminClient, HttpClient, Response, full};
use dataplane::playground::PlaygroundInfo;
use dataplane::topology::Role;
use dataplane::wire::{AckMode, NodeStatus, Peer, RoleRequest};
use hyper::Method;

/// The binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_distkv")
}

/// Polls `f` every 50 ms until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// A small HTTP client for tests.
#[derive(Clone)]
pub struct Http {
    pub client: HttpClient,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            client: HttpClient::new(),
        }
    }
}

impl Http {
    pub async fn req(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response {
        self.client
            .call(
                method,
                addr,
                path,
                headers,
                full(body.into()),
                Duration::from_secs(20),
            )
            .await
            .unwrap_or_else(|e| panic!("{path} on {addr}: {e}"))
    }
    pub async fn try_req(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Option<Response> {
        self.client
            .call(
                method,
                addr,
                path,
                &[],
                full(body.into()),
                Duration::from_secs(10),
            )
            .await
            .ok()
    }
    pub async fn put(&self, addr: &str, key: &str, value: impl Into<Bytes>) -> Response {
        self.req(Method::PUT, addr, &format!("/v1/kv/{key}"), &[], value)
            .await
    }
    pub async fn get(&self, addr: &str, path: &str) -> Response {
        self.req(Method::GET, addr, path, &[], Bytes::new()).await
    }
    pub async fn delete(&self, addr: &str, path: &str) -> Response {
        self.req(Method::DELETE, addr, path, &[], Bytes::new())
            .await
    }
}

/// The `error.code` of an error body.
pub fn error_code(r: &Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&r.body)));
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {v}"))
        .to_string()
}

pub fn etag(r: &Response) -> String {
    r.headers
        .get("etag")
        .expect("etag")
        .to_str()
        .unwrap()
        .to_string()
}

pub fn json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&r.body)))
}

/// The shard's leader as `/v1/cluster` reports it: (replica id, epoch).
pub async fn leader_of(http: &Http, router: &str, shard: usize) -> Option<(String, u64)> {
    let r = http.try_req(Method::GET, router, "/v1/cluster", "").await?;
    let c = json(&r);
    let s = &c["shards"][shard];
    Some((s["leader"].as_str()?.to_string(), s["epoch"].as_u64()?))
}

/// Whether every replica of the shard is marked in-sync and reachable.
pub async fn fully_in_sync(http: &Http, router: &str, shard: usize) -> bool {
    let Some(r) = http.try_req(Method::GET, router, "/v1/cluster", "").await else {
        return false;
    };
    let c = json(&r);
    c["shards"][shard]["replicas"].as_array().is_some_and(|rs| {
        rs.iter()
            .all(|x| x["in_sync"] == true && x["reachable"] == true)
    })
}

/// A playground started as a child process.
pub struct Playground {
    pub child: Child,
    pub dir: PathBuf,
    pub router: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Playground {
    /// Starts a playground in a fresh temporary directory.
    pub fn start(shards: u32, replicas: u32, extra: &[&str]) -> Playground {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut p = Self::start_in(&dir, shards, replicas, extra);
        p._tmp = Some(tmp);
        p
    }

    /// Starts a playground on `dir` (which may hold an earlier cluster's data).
    pub fn start_in(dir: &Path, shards: u32, replicas: u32, extra: &[&str]) -> Playground {
        let mut child = Command::new(exe())
            .args([
                "playground",
                "--port",
                "0",
                "--shards",
                &shards.to_string(),
                "--replicas",
                &replicas.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", test_log())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(url) = line.strip_prefix("router: http://") {
                    let _ = tx.send(url.to_string());
                    sent = true;
                }
            }
        });
        let router = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("playground did not announce its router within 60 s");
        Playground {
            child,
            dir: dir.to_path_buf(),
            router,
            _tmp: None,
        }
    }

    /// The current `playground.json`.
    pub fn info(&self) -> PlaygroundInfo {
        let bytes = std::fs::read(self.dir.join("playground.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Stops it with SIGTERM and waits (the data directory stays).
    pub fn stop(mut self) -> Option<tempfile::TempDir> {
        signal(self.child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "playground exited with {status}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "playground did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self._tmp.take()
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `distkv node` process started by a test.
pub struct NodeProc {
    pub id: String,
    pub dir: PathBuf,
    pub child: Child,
    pub addr: String,
    pub extra: Vec<String>,
}

impl NodeProc {
    pub fn start(id: &str, dir: &Path, extra: &[&str]) -> NodeProc {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) = Self::spawn(id, dir, &extra);
        NodeProc {
            id: id.into(),
            dir: dir.into(),
            child,
            addr,
            extra,
        }
    }

    fn spawn(id: &str, dir: &Path, extra: &[String]) -> (Child, String) {
        let mut child = Command::new(exe())
            .args(["node", "--id", id, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", test_log())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening ")
            .expect("node announces its address")
            .trim()
            .to_string();
        (child, addr)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same data directory (new port).
    pub fn restart(&mut self) {
        self.kill9();
        let (child, addr) = Self::spawn(&self.id, &self.dir, &self.extra);
        self.child = child;
        self.addr = addr;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-driven shard: the test plays control plane through `/internal/role`.
pub struct Shard {
    pub nodes: Vec<NodeProc>,
    pub admin: AdminClient,
    pub mode: AckMode,
    pub lease_ms: u64,
    _tmp: tempfile::TempDir,
}

impl Shard {
    pub fn start(replicas: usize, mode: AckMode, extra: &[&str]) -> Shard {
        let tmp = tempfile::tempdir().unwrap();
        let nodes = (0..replicas)
            .map(|i| {
                NodeProc::start(
                    &format!("s0-r{i}"),
                    &tmp.path().join(format!("r{i}")),
                    extra,
                )
            })
            .collect();
        Shard {
            nodes,
            admin: AdminClient::new(Duration::from_secs(5)),
            mode,
            lease_ms: 60_000,
            _tmp: tmp,
        }
    }

    fn peers(&self) -> Vec<Peer> {
        self.nodes
            .iter()
            .map(|n| Peer {
                id: n.id.clone(),
                address: n.addr.clone(),
            })
            .collect()
    }

    /// The request that makes a replica lead at `epoch` with `in_sync` (indices).
    pub fn lead_request(&self, epoch: u64, in_sync: &[usize]) -> RoleRequest {
        RoleRequest {
            epoch,
            role: Role::Leader,
            leader: None,
            in_sync: in_sync.iter().map(|&i| self.nodes[i].id.clone()).collect(),
            lease_ms: self.lease_ms,
            peers: self.peers(),
            slot_ranges: vec![],
            mode: self.mode,
            min_in_sync: 1,
            round: 0,
        }
    }

    /// Makes `leader` lead at `epoch` with `in_sync` (indices), the others follow it.
    pub async fn assign(&self, leader: usize, epoch: u64, in_sync: &[usize]) {
        let lead = self.lead_request(epoch, in_sync);
        self.admin
            .set_role(&self.nodes[leader].addr, &lead)
            .await
            .expect("leader takes its role");
        for (i, n) in self.nodes.iter().enumerate() {
            if i != leader {
                self.follow(i, leader, epoch).await;
                let _ = n;
            }
        }
    }

    /// Tells node `i` to follow `leader` at `epoch` (errors ignored: it may be down).
    pub async fn follow(&self, i: usize, leader: usize, epoch: u64) {
        let req = RoleRequest {
            epoch,
            role: Role::Follower,
            leader: Some(self.nodes[leader].addr.clone()),
            in_sync: vec![],
            lease_ms: 0,
            peers: vec![],
            slot_ranges: vec![],
            mode: self.mode,
            min_in_sync: 1,
            round: 0,
        };
        let _ = self.admin.set_role(&self.nodes[i].addr, &req).await;
    }

    pub async fn status(&self, i: usize) -> NodeStatus {
        self.admin
            .status(&self.nodes[i].addr)
            .await
            .expect("status")
    }

    pub async fn verified(&self, i: usize) -> NodeStatus {
        self.admin
            .verified_status(&self.nodes[i].addr)
            .await
            .expect("verified status")
    }

    /// Waits until node `f` holds exactly what node `l` holds (verified digests).
    pub async fn converged(&self, l: usize, f: usize, limit: Duration) -> NodeStatus {
        eventually("digests to converge", limit, || async {
            let a = self.admin.verified_status(&self.nodes[l].addr).await.ok()?;
            let b = self.admin.verified_status(&self.nodes[f].addr).await.ok()?;
            (a.last_seq == b.last_seq && a.digest == b.digest && a.keys == b.keys).then_some(b)
        })
        .await
    }
}

/// Tiny deterministic PRNG (xorshift) so a failing run can be replayed from its seed.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writers that each own their keys and write increasing counters to the current leader,
/// recording the highest acknowledged counter per key.
pub struct History {
    pub leader: Arc<RwLock<String>>,
    pub acked: Arc<Mutex<HashMap<String, u64>>>,
    pub stop: Arc<AtomicBool>,
    pub writes: Arc<AtomicU64>,
    /// Milliseconds since `t0` at which the latest successful request was sent.
    pub last_success_sent_ms: Arc<AtomicU64>,
    pub t0: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl History {
    pub fn start(leader: &str, writers: usize, prefix: &str) -> History {
        let h = History {
            leader: Arc::new(RwLock::new(leader.to_string())),
            acked: Arc::default(),
            stop: Arc::default(),
            writes: Arc::default(),
            last_success_sent_ms: Arc::default(),
            t0: Instant::now(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (leader, acked, stop, writes) = (
                h.leader.clone(),
                h.acked.clone(),
                h.stop.clone(),
                h.writes.clone(),
            );
            let (last, t0, prefix) = (h.last_success_sent_ms.clone(), h.t0, prefix.to_string());
            tasks.push(tokio::spawn(async move {
                let http = Http::default();
                let mut counter = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    counter += 1;
                    let key = format!("{prefix}{w}-{}", counter % 16);
                    let addr = leader.read().unwrap().clone();
                    let sent = t0.elapsed().as_millis() as u64;
                    let r = http
                        .try_req(
                            Method::PUT,
                            &addr,
                            &format!("/v1/kv/{key}"),
                            counter.to_string(),
                        )
                        .await;
                    match r {
                        Some(r) if r.status.is_success() => {
                            writes.fetch_add(1, Ordering::Relaxed);
                            last.fetch_max(sent, Ordering::Relaxed);
                            let mut a = acked.lock().unwrap();
                            let e = a.entry(key).or_default();
                            *e = (*e).max(counter);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
        History { tasks, ..h }
    }

    pub async fn finish(self) -> HashMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.acked.lock().unwrap().clone()
    }

    /// Counts acknowledged writes not readable with their value or a later one.
    pub async fn lost(acked: &HashMap<String, u64>, leader: &str) -> usize {
        let http = Http::default();
        let mut lost = 0;
        for (key, &counter) in acked {
            let r = http.get(leader, &format!("/v1/kv/{key}")).await;
            let found: u64 = if r.status == 200 {
                String::from_utf8_lossy(&r.body).parse().unwrap()
            } else {
                0
            };
            if found < counter {
                lost += 1;
                println!("LOST: {key} acknowledged at {counter}, reads {found}");
            }
        }
        lost
    }
}

/// The log filter for the processes a test starts: `DISTKV_TEST_LOG` when set, so a
/// failing run can be repeated with the nodes' logs, else errors only.
fn test_log() -> String {
    std::env::var("DISTKV_TEST_LOG").unwrap_or_else(|_| "error".into())
}
