//! `distkv playground`: a whole cluster on one machine. The router and every replica run
//! as child processes of this binary; this process is their supervisor and drives the
//! control core: it observes each replica, applies the core's decisions (roles, leases,
//! in-sync sets, topology) and restarts children that die, the router included.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::Limits;
use crate::client::{AdminClient, ClientError};
use crate::control::{self, Action, ClusterSpec, ControlState, Observation};
use crate::wire::AckMode;

/// Settings of a playground.
#[derive(Debug, Clone)]
pub struct PlaygroundConfig {
    /// Shards.
    pub shards: u32,
    /// Replicas per shard.
    pub replicas: u32,
    /// Router port (0: any free port).
    pub port: u16,
    /// Data directory of the whole cluster.
    pub data_dir: PathBuf,
    /// Ack mode.
    pub mode: AckMode,
    /// Fewest in-sync replicas with which a shard takes writes.
    pub min_in_sync: u32,
    /// Leader lease.
    pub lease_ms: u64,
    /// Wait beyond the lease before replacing an unreachable leader.
    pub failover_grace_ms: u64,
    /// Poll interval.
    pub poll_ms: u64,
    /// A follower silent this long leaves the in-sync set.
    pub in_sync_timeout_ms: u64,
    /// Key and value limits of the router and every node.
    pub limits: Limits,
    /// Extra flags for every node; a limit flag among them overrides `limits` for the
    /// nodes (not the router).
    pub node_args: Vec<String>,
    /// The `distkv` binary to start children from.
    pub exe: PathBuf,
}

impl PlaygroundConfig {
    /// Runtime threads per child: the machine's cores shared by every child, at least one.
    fn child_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let children = (self.shards * self.replicas + 1) as usize;
        (cores / children).max(1)
    }
}

/// Why the playground could not run.
#[derive(Debug, thiserror::Error)]
pub enum PlaygroundError {
    /// File-system or process failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
    /// Another playground holds the data directory.
    #[error("another playground is already running on {0}")]
    Locked(PathBuf),
    /// The data directory belongs to a cluster of another shape.
    #[error("{0}")]
    Mismatch(String),
    /// A child did not start.
    #[error("{0} did not start: {1}")]
    Start(String, String),
    /// The settings are invalid.
    #[error("invalid settings: {}", in_flags(.0))]
    Spec(control::SpecError),
}

/// A spec error in the words of the playground's flags (the spec's own name the
/// KvCluster fields).
fn in_flags(e: &control::SpecError) -> String {
    use control::SpecError::*;
    match e {
        Shards(n) => format!(
            "--shards must be between 1 and {}, got {n}",
            crate::slots::SLOT_COUNT
        ),
        NoReplicas => "--replicas must be at least 1".into(),
        MinInSync { min, replicas } => {
            format!("--min-in-sync must be between 1 and --replicas ({replicas}), got {min}")
        }
        ZeroLease => "--lease-ms must be positive".into(),
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PlaygroundError {
    let context = context.into();
    move |source| PlaygroundError::Io { context, source }
}

/// `playground.json`: where everything runs, rewritten whenever a child changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaygroundInfo {
    /// URL of the router.
    pub router: String,
    /// Admin address of the router (topology pushes); it changes when the router restarts.
    pub router_admin: String,
    /// Process id of the router; absent while it is being restarted.
    #[serde(default)]
    pub router_pid: Option<u32>,
    /// Pid of the supervisor.
    pub pid: u32,
    /// Every node.
    pub nodes: Vec<NodeInfo>,
}

/// One node in `playground.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// Replica id.
    pub id: String,
    /// Shard.
    pub shard: u32,
    /// Address.
    pub address: String,
    /// Process id.
    pub pid: u32,
}

/// What the supervisor keeps in `control.json` across restarts.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    spec: ClusterSpec,
    state: ControlState,
}

/// A running child and what it announced.
struct Proc {
    child: Child,
    address: String,
    pid: u32,
}

/// A replica the supervisor keeps running.
struct Member {
    id: String,
    shard: u32,
    proc: Option<Proc>,
    /// A start is under way in the background.
    starting: bool,
    restarts: Restarts,
}

/// A replica's start, finished in the background, as the next round finds it.
type Started = (String, Result<Proc, PlaygroundError>);

/// When a supervised child may be started again: the wait grows with the failures in a
/// row, which are forgotten once the child has stayed up a while.
struct Restarts {
    failures: u32,
    restart_at: Instant,
    started_at: Instant,
}

impl Restarts {
    /// A child that has just started.
    fn new() -> Self {
        Restarts {
            failures: 0,
            restart_at: Instant::now(),
            started_at: Instant::now(),
        }
    }

    /// The child exited or could not start: wait longer before the next try.
    fn failed(&mut self) {
        self.failures += 1;
        self.restart_at = Instant::now() + Duration::from_millis(100 << self.failures.min(6));
    }

    /// Whether the wait since the last failure is over.
    fn due(&self) -> bool {
        Instant::now() >= self.restart_at
    }

    /// The child started again.
    fn started(&mut self) {
        self.started_at = Instant::now();
    }

    /// Called while the child runs: one up for 30 s is healthy again.
    fn running(&mut self) {
        if self.started_at.elapsed() > Duration::from_secs(30) {
            self.failures = 0;
        }
    }
}

/// Starts a child and waits for it to announce `labels` on stdout (`label ADDR` lines).
async fn spawn(
    exe: &Path,
    args: &[String],
    log: &Path,
    labels: &[&str],
    threads: usize,
) -> Result<(Child, Vec<String>), PlaygroundError> {
    let name = log
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("cannot open log {}", log.display())))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true);
    if std::env::var_os("DISTKV_WORKER_THREADS").is_none() {
        cmd.env("DISTKV_WORKER_THREADS", threads.to_string());
    }
    // SAFETY: prctl is async-signal-safe; it makes the child die with the supervisor, so
    // a kill -9 of the playground leaves no orphans holding ports and data directories.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io(format!("cannot start {name}")))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut found = Vec::new();
    let announce = async {
        while found.len() < labels.len() {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some((label, addr)) = line.split_once(' ')
                        && labels.get(found.len()) == Some(&label)
                    {
                        found.push(addr.trim().to_string());
                    }
                }
                _ => return false,
            }
        }
        true
    };
    let announced = tokio::time::timeout(Duration::from_secs(30), announce).await;
    if announced != Ok(true) {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let why = last_error(log).unwrap_or_default();
        return Err(PlaygroundError::Start(
            name,
            format!("{why}(log: {})", log.display()),
        ));
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, found))
}

/// The child's own error report (`Error: …` and its causes) from the end of its log.
fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    // `Error: ` from our own report, `error: ` from the argument parser's.
    let start = text.rfind("Error: ").max(text.rfind("error: "))?;
    let report: Vec<&str> = text[start..]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "Caused by:")
        .take_while(|l| !l.starts_with("Stack backtrace") && !l.starts_with("0:"))
        .take(4)
        .collect();
    Some(format!(
        "{}; ",
        report
            .join(": ")
            .trim_start_matches("Error: ")
            .trim_start_matches("error: ")
    ))
}

/// Holds an exclusive lock on the data directory for the playground's lifetime.
struct DirLock(#[allow(dead_code)] std::fs::File);

fn lock_dir(dir: &Path) -> Result<DirLock, PlaygroundError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("playground.lock"))
        .map_err(io("cannot create the lock file"))?;
    // SAFETY: flock on an open descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(PlaygroundError::Locked(dir.to_path_buf()));
    }
    Ok(DirLock(f))
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, synced, renamed
/// over `path`, then the directory synced. A crash or power cut leaves the old file or
/// the new one; the control state must never go back to an in-sync set or an epoch that
/// replicas were already told had changed.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The router the supervisor keeps running, always on the same public address.
struct RouterChild {
    proc: Option<Proc>,
    /// Public address (`127.0.0.1:PORT`), kept across restarts.
    address: String,
    /// Admin address of the running router (a restart picks a new one).
    admin: String,
    restarts: Restarts,
}

/// Whether `args` give the flag `--NAME` (as `--NAME V` or `--NAME=V`).
fn flag_given(args: &[String], name: &str) -> bool {
    let flag = format!("--{name}");
    args.iter()
        .any(|a| *a == flag || a.strip_prefix(&flag).is_some_and(|v| v.starts_with('=')))
}

fn router_args(cfg: &PlaygroundConfig, listen: &str) -> Vec<String> {
    vec![
        "router".into(),
        "--listen".into(),
        listen.into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--topology".into(),
        cfg.data_dir.join("topology.json").display().to_string(),
        "--max-key-bytes".into(),
        cfg.limits.max_key_bytes.to_string(),
        "--max-value-bytes".into(),
        cfg.limits.max_value_bytes.to_string(),
    ]
}

/// Starts the router on `listen`; returns it and its admin address. It loads the
/// topology file at start; the caller pushes the current topology as well.
async fn start_router(
    cfg: &PlaygroundConfig,
    listen: &str,
) -> Result<(Proc, String), PlaygroundError> {
    let log = cfg.data_dir.join("logs").join("router.log");
    let (child, addrs) = spawn(
        &cfg.exe,
        &router_args(cfg, listen),
        &log,
        &["listening", "admin"],
        cfg.child_threads(),
    )
    .await?;
    let proc = Proc {
        pid: child.id().unwrap_or(0),
        child,
        address: addrs[0].clone(),
    };
    Ok((proc, addrs[1].clone()))
}

struct Supervisor {
    cfg: Arc<PlaygroundConfig>,
    spec: ClusterSpec,
    state: ControlState,
    members: Vec<Member>,
    router: RouterChild,
    admin: AdminClient,
    epoch0: Instant,
    info: Option<PlaygroundInfo>,
    /// Restarts report here. They run in the background: a replica that takes seconds to
    /// open its data must not hold up the rounds that renew every other leader's lease.
    started_tx: tokio::sync::mpsc::UnboundedSender<Started>,
    started_rx: tokio::sync::mpsc::UnboundedReceiver<Started>,
}

impl Supervisor {
    fn node_args(&self, id: &str) -> Vec<String> {
        let dir = self.cfg.data_dir.join(id);
        let mut args = vec![
            "node".into(),
            "--id".into(),
            id.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        // The playground's limits, unless --node-arg sets one for the nodes (a flag given
        // twice is an error).
        let limits = [
            ("max-key-bytes", self.cfg.limits.max_key_bytes),
            ("max-value-bytes", self.cfg.limits.max_value_bytes),
        ];
        for (name, value) in limits {
            if !flag_given(&self.cfg.node_args, name) {
                args.push(format!("--{name}={value}"));
            }
        }
        args.extend(self.cfg.node_args.iter().cloned());
        args
    }

    /// Starts replica `id`; the future borrows nothing, so it can run in the background.
    fn start_member(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<Proc, PlaygroundError>> + Send + 'static {
        let log = self.cfg.data_dir.join("logs").join(format!("{id}.log"));
        let (exe, args, threads) = (
            self.cfg.exe.clone(),
            self.node_args(id),
            self.cfg.child_threads(),
        );
        async move {
            let (child, addrs) = spawn(&exe, &args, &log, &["listening"], threads).await?;
            Ok(Proc {
                pid: child.id().unwrap_or(0),
                child,
                address: addrs[0].clone(),
            })
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch0.elapsed().as_millis() as u64
    }

    /// Reaps the router if it exited and restarts it (on the same public address) once its
    /// backoff has passed; a restarted router gets the current topology.
    async fn supervise_router(&mut self) {
        let r = &mut self.router;
        if let Some(p) = &mut r.proc {
            match p.child.try_wait() {
                Ok(None) => {
                    r.restarts.running();
                    return;
                }
                Ok(Some(status)) => {
                    tracing::warn!(%status, "router exited");
                    println!("router exited ({status}); restarting");
                    r.proc = None;
                    r.restarts.failed();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the router");
                    return;
                }
            }
        }
        if !r.restarts.due() {
            return;
        }
        match start_router(&self.cfg, &r.address).await {
            Ok((p, admin)) => {
                println!("router restarted at http://{} (pid {})", p.address, p.pid);
                r.proc = Some(p);
                r.admin = admin;
                r.restarts.started();
                // It read the topology file at start; push too, in case the file is behind.
                self.publish(&self.state.topology.clone()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "router restart failed");
                println!("router restart failed: {e}; retrying");
                r.restarts.failed();
            }
        }
    }

    /// One round: observe every replica, run the control core, apply what it decided.
    async fn round(&mut self) {
        self.supervise_router().await;
        self.collect_started();
        let mut observations = Vec::with_capacity(self.members.len());
        let mut calls = Vec::new();
        for m in &mut self.members {
            let alive = match &mut m.proc {
                Some(p) => match p.child.try_wait() {
                    Ok(None) => {
                        m.restarts.running();
                        true
                    }
                    Ok(Some(status)) => {
                        tracing::warn!(replica = %m.id, %status, "replica exited");
                        println!("replica {} exited ({status}); restarting", m.id);
                        m.proc = None;
                        m.restarts.failed();
                        false
                    }
                    Err(_) => false,
                },
                None => false,
            };
            let address = m.proc.as_ref().map(|p| p.address.clone());
            observations.push(Observation {
                replica: m.id.clone(),
                shard: m.shard,
                address: address.clone(),
                status: None,
                process_alive: Some(alive),
            });
            calls.push(address);
        }
        let statuses = futures_util::future::join_all(calls.iter().map(|a| async {
            match a {
                Some(a) => self.admin.status(a).await.ok(),
                None => None,
            }
        }))
        .await;
        for (o, s) in observations.iter_mut().zip(statuses) {
            o.status = s;
        }
        let decision = control::decide(&self.spec, &self.state, &observations, self.now_ms());
        for e in &decision.events {
            tracing::debug!(event = %e, "control");
            println!("{e}");
        }
        // Recorded before acting, as the operator does: after a restart the supervisor
        // promotes from the recorded in-sync set and above the recorded epochs, so no
        // leader may be told a smaller set, nor a replica a new leadership, that the file
        // does not hold yet. A round that cannot be recorded is not acted on.
        if decision.state != self.state && !self.save(&decision.state) {
            return;
        }
        self.state = decision.state;
        // The lease runs from the send, which the save above put after the decision: so
        // must the wait before a leader is replaced, as in the operator.
        self.state.leases_sent(&decision.actions, self.now_ms());
        let mut roles = Vec::new();
        let mut topology = None;
        for action in decision.actions {
            match action {
                Action::SendRole {
                    replica,
                    address,
                    request,
                } => roles.push((replica, address, request)),
                Action::PublishTopology(t) => topology = Some(t),
                Action::Restart { replica } => self.restart(&replica),
            }
        }
        let admin = &self.admin;
        let results = futures_util::future::join_all(
            roles.iter().map(|(_, addr, req)| admin.set_role(addr, req)),
        )
        .await;
        for ((replica, _, req), r) in roles.iter().zip(results) {
            if let Err(e) = r {
                log_role_failure(replica, req.epoch, &e);
            }
        }
        // Only now that the new leaders know it: a router sent to a replica not yet told
        // it leads would get not_leader.
        if let Some(t) = topology {
            self.publish(&t).await;
        }
        self.write_info();
    }

    /// Starts `replica` again in the background, unless it runs, is starting, or is
    /// waiting out its backoff.
    fn restart(&mut self, replica: &str) {
        let Some(i) = self.members.iter().position(|m| m.id == replica) else {
            return;
        };
        let m = &self.members[i];
        if m.proc.is_some() || m.starting || !m.restarts.due() {
            return;
        }
        let start = self.start_member(replica);
        let (tx, id) = (self.started_tx.clone(), replica.to_string());
        tokio::spawn(async move {
            // Nobody to tell once the playground stops; the child dies with its handle.
            let _ = tx.send((id, start.await));
        });
        self.members[i].starting = true;
    }

    /// Takes in the restarts that finished since the last round.
    fn collect_started(&mut self) {
        while let Ok((replica, started)) = self.started_rx.try_recv() {
            let Some(m) = self.members.iter_mut().find(|m| m.id == replica) else {
                continue;
            };
            m.starting = false;
            match started {
                Ok(p) => {
                    println!("replica {replica} restarted at {}", p.address);
                    m.proc = Some(p);
                    m.restarts.started();
                }
                Err(e) => {
                    tracing::error!(%replica, error = %e, "restart failed");
                    m.restarts.failed();
                }
            }
        }
    }

    async fn publish(&self, t: &crate::topology::Topology) {
        let path = self.cfg.data_dir.join("topology.json");
        if let Err(e) = write_atomic(
            &path,
            &serde_json::to_vec_pretty(t).expect("topology encodes"),
        ) {
            tracing::error!(error = %e, "cannot write topology file");
        }
        if self.router.proc.is_none() {
            // A router that starts later loads the file just written.
            return;
        }
        if let Err(e) = self.admin.push_topology(&self.router.admin, t).await {
            tracing::warn!(error = %e, "cannot push topology to the router; it reloads the file on its next miss");
        }
    }

    /// Writes `state` to `control.json`; whether it was written.
    fn save(&self, state: &ControlState) -> bool {
        let saved = Saved {
            spec: self.spec.clone(),
            state: state.clone(),
        };
        let path = self.cfg.data_dir.join("control.json");
        if let Err(e) = write_atomic(
            &path,
            &serde_json::to_vec_pretty(&saved).expect("state encodes"),
        ) {
            tracing::error!(error = %e, "cannot save control state");
            return false;
        }
        true
    }

    fn write_info(&mut self) {
        let info = PlaygroundInfo {
            router: format!("http://{}", self.router.address),
            router_admin: self.router.admin.clone(),
            router_pid: self.router.proc.as_ref().map(|p| p.pid),
            pid: std::process::id(),
            nodes: self
                .members
                .iter()
                .filter_map(|m| {
                    let p = m.proc.as_ref()?;
                    Some(NodeInfo {
                        id: m.id.clone(),
                        shard: m.shard,
                        address: p.address.clone(),
                        pid: p.pid,
                    })
                })
                .collect(),
        };
        if self.info.as_ref() != Some(&info) {
            let path = self.cfg.data_dir.join("playground.json");
            if let Err(e) = write_atomic(
                &path,
                &serde_json::to_vec_pretty(&info).expect("info encodes"),
            ) {
                tracing::error!(error = %e, "cannot write playground.json");
            }
            self.info = Some(info);
        }
    }

    fn every_shard_led(&self) -> bool {
        let t = &self.state.topology;
        t.version > 0 && t.shards.iter().all(|s| s.leader_address().is_some())
    }

    async fn stop(mut self) {
        let mut procs: Vec<Proc> = self
            .members
            .iter_mut()
            .filter_map(|m| m.proc.take())
            .collect();
        procs.extend(self.router.proc.take());
        // A pid of 0 (a child reaped before its id was read) would signal our whole group.
        for p in procs.iter().filter(|p| p.pid > 0) {
            // SAFETY: sending a signal to a child we started.
            unsafe { libc::kill(p.pid as i32, libc::SIGTERM) };
        }
        for mut p in procs {
            if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.kill().await;
            }
        }
        let _ = std::fs::remove_file(self.cfg.data_dir.join("playground.json"));
    }
}

fn log_role_failure(replica: &str, epoch: u64, e: &ClientError) {
    tracing::debug!(%replica, epoch, error = %e, "role assignment not delivered");
}

/// Loads the saved control state, refusing a data directory of another shape.
fn load_state(dir: &Path, spec: &ClusterSpec) -> Result<ControlState, PlaygroundError> {
    let path = dir.join("control.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(control::initial_state(spec));
    };
    let saved: Saved = serde_json::from_slice(&bytes)
        .map_err(|e| PlaygroundError::Mismatch(format!("{} is unreadable: {e}", path.display())))?;
    if saved.spec.shards != spec.shards || saved.spec.replicas_per_shard != spec.replicas_per_shard
    {
        return Err(PlaygroundError::Mismatch(format!(
            "{} holds a cluster of {} shards x {} replicas; start it with --shards {} --replicas {} \
             (changing the shape of an existing cluster is not supported yet)",
            dir.display(),
            saved.spec.shards,
            saved.spec.replicas_per_shard,
            saved.spec.shards,
            saved.spec.replicas_per_shard
        )));
    }
    let mut state = saved.state;
    // Time restarts at zero in this process; stale timers must not trigger failovers.
    state.resume(0);
    Ok(state)
}

/// Runs the playground until `shutdown` resolves, then stops every child.
pub async fn run(
    cfg: Arc<PlaygroundConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), PlaygroundError> {
    let spec = ClusterSpec {
        shards: cfg.shards,
        replicas_per_shard: cfg.replicas,
        min_in_sync: cfg.min_in_sync,
        mode: cfg.mode,
        lease_ms: cfg.lease_ms,
        failover_grace_ms: cfg.failover_grace_ms,
        in_sync_timeout_ms: cfg.in_sync_timeout_ms,
        // A follower this close may rejoin: writes wait for it at once, and the leader
        // reports it in sync (eligible for promotion) only once it holds the whole log.
        catch_up_lag: 2000,
    };
    spec.validate().map_err(PlaygroundError::Spec)?;
    std::fs::create_dir_all(cfg.data_dir.join("logs")).map_err(io(format!(
        "cannot create data directory {}",
        cfg.data_dir.display()
    )))?;
    let _lock = lock_dir(&cfg.data_dir)?;
    let state = load_state(&cfg.data_dir, &spec)?;
    for name in ["max-key-bytes", "max-value-bytes"] {
        if flag_given(&cfg.node_args, name) {
            tracing::warn!(
                "--node-arg=--{name} applies to the nodes only; --{name} sets it for the \
                 router and every node"
            );
        }
    }
    let (router, router_admin) = start_router(&cfg, &format!("127.0.0.1:{}", cfg.port)).await?;
    let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut sup = Supervisor {
        members: Vec::new(),
        started_tx,
        started_rx,
        router: RouterChild {
            address: router.address.clone(),
            proc: Some(router),
            admin: router_admin,
            restarts: Restarts::new(),
        },
        admin: AdminClient::new(Duration::from_millis(250)),
        epoch0: Instant::now(),
        info: None,
        spec,
        state,
        cfg: cfg.clone(),
    };
    let ids: Vec<(u32, String)> = (0..cfg.shards)
        .flat_map(|s| (0..cfg.replicas).map(move |r| (s, control::replica_id(s, r))))
        .collect();
    let started =
        futures_util::future::join_all(ids.iter().map(|(_, id)| sup.start_member(id))).await;
    for ((shard, id), p) in ids.into_iter().zip(started) {
        let p = match p {
            Ok(p) => p,
            Err(e) => {
                sup.stop().await;
                return Err(e);
            }
        };
        sup.members.push(Member {
            id,
            shard,
            proc: Some(p),
            starting: false,
            restarts: Restarts::new(),
        });
    }
    // The router may have loaded an older topology file; make sure it gets the current one.
    sup.publish(&sup.state.topology.clone()).await;
    tokio::pin!(shutdown);
    let mut announced = false;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.poll_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                sup.round().await;
                if !announced && sup.every_shard_led() {
                    announced = true;
                    println!("router: http://{}", sup.router.address);
                }
            }
        }
    }
    println!("stopping");
    sup.save(&sup.state);
    sup.stop().await;
    Ok(())
}
