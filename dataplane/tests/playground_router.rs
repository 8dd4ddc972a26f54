//! The playground's router: the supervisor restarts it when it dies, and the playground's
//! key and value limits reach the router as well as every node.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dataplane::client::AdminClient;
use dataplane::slots::SLOT_COUNT;
use dataplane::topology::{ReplicaInfo, Role, ShardInfo, Topology};
use dataplane::wire::{AckMode, RoleRequest};
use hyper::Method;

/// A playground whose data directory is a fresh `/tmp/pg-*`, removed after it stops.
struct Pg {
    pg: Playground,
    _tmp: tempfile::TempDir,
}

fn start(shards: u32, replicas: u32, extra: &[&str]) -> Pg {
    let tmp = tempfile::Builder::new()
        .prefix("pg-")
        .tempdir_in("/tmp")
        .unwrap();
    let pg = Playground::start_in(&tmp.path().join("data"), shards, replicas, extra);
    Pg { pg, _tmp: tmp }
}

/// A child process of `parent`: (pid, state letter from /proc/PID/stat, its subcommand).
#[derive(Debug)]
struct ChildProc {
    pid: u32,
    state: char,
    subcommand: String,
}

fn children_of(parent: u32) -> Vec<ChildProc> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid != parent {
            continue;
        }
        // A zombie has no command line left; it is still a child.
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let subcommand = cmdline
            .split(|&b| b == 0)
            .nth(1)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        out.push(ChildProc {
            pid,
            state,
            subcommand,
        });
    }
    out
}

/// The pid of the playground's live `distkv router` child, if there is exactly one.
fn live_router(parent: u32) -> Option<u32> {
    let routers: Vec<u32> = children_of(parent)
        .into_iter()
        .filter(|c| c.subcommand == "router" && c.state != 'Z')
        .map(|c| c.pid)
        .collect();
    match routers[..] {
        [pid] => Some(pid),
        _ => None,
    }
}

/// `playground.json` as JSON (read untyped so that a missing field fails an assertion).
fn info_json(dir: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(dir.join("playground.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// kill -9 of the router: the supervisor reaps it and starts another on the same port,
/// which routes with the current topology, and `playground.json` names the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_router_is_restarted_on_the_same_port() {
    let Pg { pg, _tmp } = start(2, 1, &[]);
    let http = Http::default();
    let keys: Vec<String> = (0..8).map(|i| format!("before-{i}")).collect();
    for k in &keys {
        assert_eq!(http.put(&pg.router, k, format!("v-{k}")).await.status, 201);
    }
    let supervisor = pg.child.id();
    let old = live_router(supervisor).expect("the playground runs one router");
    let before = info_json(&pg.dir).unwrap();

    signal(old, libc::SIGKILL);
    // The same URL answers again, with the keys of both shards.
    let started = std::time::Instant::now();
    eventually(
        "the router to answer again on its port",
        Duration::from_secs(10),
        || async {
            for k in &keys {
                let r = http
                    .try_req(
                        Method::GET,
                        &pg.router,
                        &format!("/v1/kv/{k}"),
                        Bytes::new(),
                    )
                    .await?;
                if r.status != 200 || r.body != format!("v-{k}") {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    println!("router answered again after {:?}", started.elapsed());
    // Writes go through too.
    assert_eq!(http.put(&pg.router, "after", "x").await.status, 201);
    assert_eq!(http.get(&pg.router, "/v1/kv/after").await.body, "x");

    // The old router was reaped (no zombie) and one new router runs.
    let new = live_router(supervisor).expect("one live router");
    assert_ne!(new, old);
    let children = children_of(supervisor);
    assert!(
        children.iter().all(|c| c.pid != old && c.state != 'Z'),
        "the dead router was not reaped: {children:?}"
    );
    // playground.json named the old router, now names the new one, and its admin address
    // is the new router's.
    assert_eq!(
        before["router_pid"].as_u64(),
        Some(u64::from(old)),
        "{before}"
    );
    let info = eventually(
        "playground.json to name the new router",
        Duration::from_secs(5),
        || async {
            let info = info_json(&pg.dir)?;
            (info["router_pid"].as_u64() == Some(u64::from(new))).then_some(info)
        },
    )
    .await;
    assert_eq!(info["router"], format!("http://{}", pg.router));
    let admin = info["router_admin"].as_str().unwrap();
    assert_eq!(http.get(admin, "/healthz").await.status, 200);
    let pushed = json(&http.get(admin, "/internal/topology").await);
    assert!(
        pushed["version"].as_u64().unwrap() > 0,
        "the new router has no topology: {pushed}"
    );
    pg.stop();
}

/// `--max-value-bytes` raises the limit at the router and the nodes alike: a value over
/// 1 MiB is stored and read back through the router, and one over the new limit is 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raised_value_limit_reaches_the_router_and_the_nodes() {
    let Pg { pg, _tmp } = start(1, 1, &["--max-value-bytes", "2097152"]);
    let http = Http::default();
    let value: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let put = http.put(&pg.router, "big", value.clone()).await;
    assert_eq!(
        put.status,
        201,
        "{}",
        String::from_utf8_lossy(&put.body[..put.body.len().min(500)])
    );
    let got = http.get(&pg.router, "/v1/kv/big").await;
    assert_eq!(got.status, 200);
    assert!(got.body == value, "the value read back differs");
    let node = pg.info().nodes[0].address.clone();
    let direct = http.get(&node, "/v1/kv/big").await;
    assert_eq!(direct.body.len(), value.len());
    let over = http
        .put(&pg.router, "big", vec![b'x'; 2 * 1024 * 1024 + 1])
        .await;
    assert_eq!(
        (over.status.as_u16(), error_code(&over)),
        (413, "value_too_large".to_string())
    );
    pg.stop();
}

/// `--max-key-bytes` lowers the limit at the router and the nodes alike: a longer key is
/// refused with 413 and a JSON error, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowered_key_limit_reaches_the_router_and_the_nodes() {
    let Pg { pg, _tmp } = start(1, 1, &["--max-key-bytes", "16"]);
    let http = Http::default();
    let fits = "k".repeat(16);
    assert_eq!(http.put(&pg.router, &fits, "v").await.status, 201);
    let long = "k".repeat(17);
    let refused = http.put(&pg.router, &long, "v").await;
    assert_eq!(refused.status, 413);
    let body = json(&refused);
    assert_eq!(body["error"]["code"], "key_too_large", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let demo = http
        .req(
            Method::POST,
            &pg.router,
            "/put",
            &[("content-type", "application/json")],
            format!(r#"{{"key":"{long}","value":"v"}}"#),
        )
        .await;
    assert_eq!(demo.status, 413);
    // The node has the same limit.
    let node = pg.info().nodes[0].address.clone();
    let direct = http.put(&node, &long, "v").await;
    assert_eq!(
        (direct.status.as_u16(), error_code(&direct)),
        (413, "key_too_large".to_string())
    );
    assert_eq!(
        http.get(&pg.router, &format!("/v1/kv/{long}")).await.status,
        413
    );
    pg.stop();
}

/// A router alone, its topology one shard led by `node`, started with `extra` flags.
/// Returns the process (killed when dropped), its address, its admin address, and its
/// stdout, which stays open while it runs.
fn start_router(
    dir: &Path,
    node: &NodeProc,
    extra: &[&str],
) -> (Killed, String, String, impl Sized + Send + use<>) {
    let topology = Topology {
        version: 1,
        shards: vec![ShardInfo {
            id: 0,
            epoch: 1,
            leader: Some(node.id.clone()),
            slot_ranges: vec![(0, SLOT_COUNT - 1)],
            replicas: vec![ReplicaInfo {
                id: node.id.clone(),
                address: node.addr.clone(),
                role: Role::Leader,
                in_sync: true,
            }],
        }],
        ..Topology::default()
    };
    let file = dir.join("topology.json");
    std::fs::write(&file, serde_json::to_vec(&topology).unwrap()).unwrap();
    let mut router = Killed(
        std::process::Command::new(exe())
            .args(["router", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0", "--topology"])
            .arg(&file)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(router.0.stdout.take().unwrap());
    let mut lines = [String::new(), String::new()];
    for line in &mut lines {
        std::io::BufRead::read_line(&mut out, line).unwrap();
    }
    let addr = lines[0]
        .strip_prefix("listening ")
        .unwrap()
        .trim()
        .to_string();
    let admin = lines[1].strip_prefix("admin ").unwrap().trim().to_string();
    (router, addr, admin, out)
}

/// A router whose topology names a leader that does not lead (a replica never given a
/// role) asks again once, then answers 503 `leader_moved` with `Retry-After`: not the
/// replica's own 421, which a client cannot act on.
#[tokio::test]
async fn a_shard_whose_leader_does_not_lead_answers_503_leader_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let node = NodeProc::start("s0-r0", &tmp.path().join("r0"), &[]);
    let (_router, addr, _admin, _out) = start_router(tmp.path(), &node, &[]);
    let http = Http::default();
    for r in [
        http.put(&addr, "k", "v").await,
        http.get(&addr, "/v1/kv/k").await,
    ] {
        assert_eq!(
            (r.status.as_u16(), error_code(&r)),
            (503, "leader_moved".into())
        );
        assert!(r.headers.contains_key("retry-after"));
    }
}

/// A leader that stops answering (SIGSTOP) costs a request the router's
/// `--request-timeout-ms`, then 504, which says a write's outcome is unknown.
#[tokio::test]
async fn a_silent_leader_is_a_504_after_the_routers_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let node = NodeProc::start("s0-r0", &tmp.path().join("r0"), &[]);
    lead_alone(&node).await;
    let (_router, addr, _admin, _out) =
        start_router(tmp.path(), &node, &["--request-timeout-ms", "300"]);
    let http = Http::default();
    assert_eq!(http.put(&addr, "k", "v").await.status, 201);
    signal(node.pid(), libc::SIGSTOP);
    let r = http.put(&addr, "k", "v2").await;
    signal(node.pid(), libc::SIGCONT);
    assert_eq!(
        (r.status.as_u16(), error_code(&r)),
        (504, "upstream_timeout".into())
    );
    assert!(
        json(&r)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown")
    );
}

/// A node made leader of the whole key space, for a router of its own.
async fn lead_alone(node: &NodeProc) {
    let lead = RoleRequest {
        epoch: 1,
        role: Role::Leader,
        leader: None,
        in_sync: vec![node.id.clone()],
        lease_ms: 60_000,
        peers: vec![],
        slot_ranges: vec![],
        mode: AckMode::Sync,
        min_in_sync: 1,
        round: 0,
    };
    let admin = AdminClient::new(Duration::from_secs(5));
    admin.set_role(&node.addr, &lead).await.unwrap();
}

/// Status and `error.code` (empty when the answer is not an error).
fn outcome(r: &dataplane::client::Response) -> (u16, String) {
    let code = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (r.status.as_u16(), code)
}

/// A leader alone with a router of its own, and one key `k` written through it.
struct OneKey {
    node: NodeProc,
    router: String,
    /// The router's admin listener.
    admin: String,
    /// The ETag of `k`.
    version: String,
    http: Http,
    _router: Killed,
    _out: Box<dyn Send>,
    _tmp: tempfile::TempDir,
}

const KEY: &str = "/v1/kv/k";

impl OneKey {
    async fn start() -> OneKey {
        let tmp = tempfile::tempdir().unwrap();
        let node = NodeProc::start("s0-r0", &tmp.path().join("r0"), &[]);
        lead_alone(&node).await;
        let (killed, router, admin, out) = start_router(tmp.path(), &node, &[]);
        let http = Http::default();
        let put = http.put(&router, "k", "v").await;
        assert_eq!(put.status, 201);
        OneKey {
            version: etag(&put),
            node,
            router,
            admin,
            http,
            _router: killed,
            _out: Box::new(out),
            _tmp: tmp,
        }
    }

    /// Sends `method` on `k` with `headers`, to the node and through the router.
    async fn both(
        &self,
        method: Method,
        headers: &[(&str, &str)],
    ) -> (dataplane::client::Response, dataplane::client::Response) {
        let direct = self.req(&self.node.addr, method.clone(), headers).await;
        let routed = self.req(&self.router, method, headers).await;
        (direct, routed)
    }

    async fn req(
        &self,
        addr: &str,
        method: Method,
        headers: &[(&str, &str)],
    ) -> dataplane::client::Response {
        self.http
            .req(method, addr, KEY, headers, Bytes::new())
            .await
    }

    /// Checks that `k` still holds what was written.
    async fn unchanged(&self) {
        let got = self.http.get(&self.router, KEY).await;
        assert_eq!(
            (got.status.as_u16(), etag(&got)),
            (200, self.version.clone())
        );
        assert_eq!(got.body, "v");
    }
}

/// Repeated precondition headers reach the node whole: two `If-Match` on a DELETE and two
/// `If-None-Match` on a GET get the node's own answers through the router, and the key is
/// unchanged.
#[tokio::test]
async fn repeated_preconditions_get_the_nodes_answers_through_the_router() {
    let k = OneKey::start().await;
    let v = k.version.as_str();
    // The node is asked first: it refuses, so the key is still there for the router's turn.
    let (direct, routed) = k
        .both(Method::DELETE, &[("if-match", v), ("if-match", "\"0-0\"")])
        .await;
    assert_eq!(outcome(&direct), (400, "invalid_precondition".into()));
    assert_eq!(outcome(&routed), outcome(&direct));
    k.unchanged().await;
    let (direct, routed) = k
        .both(
            Method::GET,
            &[("if-none-match", "\"0-0\""), ("if-none-match", v)],
        )
        .await;
    assert_eq!(direct.status, 304);
    assert_eq!(routed.status, direct.status);
    assert_eq!(etag(&routed), v);
}

/// A precondition longer than the link carries (64 KiB a header) is never forwarded
/// without it. An `If-Match` that long is one a node refuses, and the router gives the
/// node's answer; an `If-None-Match` list that long, which a node would read, is 431. The
/// key is unchanged.
#[tokio::test]
async fn a_precondition_too_long_for_the_link_is_refused_not_dropped() {
    let k = OneKey::start().await;
    let list = format!("\"0-0\"{},\"9-9\"", " ".repeat(70_000));
    let foreign = format!("\"{}\"", "x".repeat(70_000));
    for (value, answer) in [
        (&list, (400, "invalid_precondition")),
        (&foreign, (412, "precondition_failed")),
    ] {
        let (direct, routed) = k.both(Method::DELETE, &[("if-match", value)]).await;
        assert_eq!(outcome(&direct), (answer.0, answer.1.to_string()));
        assert_eq!(outcome(&routed), outcome(&direct));
        k.unchanged().await;
    }
    let mut tags = vec!["\"0-0\""; 10_000];
    tags.push(&k.version);
    let tags = tags.join(", ");
    let (direct, routed) = k.both(Method::GET, &[("if-none-match", &tags)]).await;
    assert_eq!(direct.status, 304);
    assert_eq!(
        outcome(&routed),
        (431, "request_header_fields_too_large".into())
    );
    assert!(json(&routed)["error"]["message"].as_str().unwrap().len() < 200);
}

/// A pushed topology without shards is refused, 400 `invalid_topology`, and the one in use
/// stays: installed, it made every key answer 503 `no_topology` until a restart. No
/// shards is only a router's state before its first topology.
#[tokio::test]
async fn a_pushed_topology_without_shards_is_refused() {
    let k = OneKey::start().await;
    let empty = Topology {
        version: 2,
        ..Topology::default()
    };
    let body = serde_json::to_vec(&empty).unwrap();
    let path = "/internal/topology";
    let pushed = k.http.req(Method::PUT, &k.admin, path, &[], body).await;
    assert_eq!(outcome(&pushed), (400, "invalid_topology".into()));
    let message = json(&pushed)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("no shards"), "{message}");
    assert_eq!(json(&k.http.get(&k.admin, path).await)["version"], 1);
    k.unchanged().await;
}

/// A listen address may name its host (`localhost:0`), not only give its IP.
#[tokio::test]
async fn a_listen_address_may_be_a_host_name() {
    let mut router = Killed(
        std::process::Command::new(exe())
            .args([
                "router",
                "--listen",
                "localhost:0",
                "--admin-listen",
                "localhost:0",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(router.0.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr = line.strip_prefix("listening ").unwrap().trim().to_string();
    let health = Http::default().get(&addr, "/healthz").await;
    assert_eq!(health.status, 200);
}

/// A child process killed when the test ends, passed or failed.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
