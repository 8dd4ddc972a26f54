//! The public API through the router of a real playground (issue: data plane foundation).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use dataplane::client::AdminClient;
use dataplane::wire::AckMode;
use hyper::Method;

/// 1,000 keys with the v1 API and 100 with the demo API, through the router: put, get,
/// overwrite, conditional put and delete, delete; the keys spread over the shards; every
/// key is on its shard's follower too; a restart keeps every key and version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_through_the_router_survive_a_restart() {
    let pg = Playground::start(3, 2, &[]);
    let r = pg.router.clone();
    let http = Http::default();

    // v1: create 1,000 keys concurrently.
    let mut tasks = Vec::new();
    for chunk in 0..20 {
        let (http, r) = (http.clone(), r.clone());
        tasks.push(tokio::spawn(async move {
            for i in chunk * 50..(chunk + 1) * 50 {
                let resp = http
                    .put(&r, &format!("key-{i}"), format!("value-{i}"))
                    .await;
                assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in (0..1000).step_by(7) {
        let resp = http.get(&r, &format!("/v1/kv/key-{i}")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, Bytes::from(format!("value-{i}")));
    }
    // Overwrite: 200, new version.
    let before = http.get(&r, "/v1/kv/key-1").await;
    let over = http.put(&r, "key-1", "second").await;
    assert_eq!(over.status, 200);
    assert_ne!(etag(&over), etag(&before));
    assert_eq!(http.get(&r, "/v1/kv/key-1").await.body, "second");
    // HEAD: the headers of a GET, its length included, and no body.
    let head = http.req(Method::HEAD, &r, "/v1/kv/key-1", &[], "").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-length"], "6");
    assert_eq!(etag(&head), etag(&over));
    assert!(head.body.is_empty());
    // A read naming the current version is 304 without the value; an older one gets it.
    let holding = |tag: String| {
        let (http, r) = (http.clone(), r.clone());
        async move {
            http.req(
                Method::GET,
                &r,
                "/v1/kv/key-1",
                &[("if-none-match", &tag)],
                "",
            )
            .await
        }
    };
    let cached = holding(etag(&over)).await;
    assert_eq!(cached.status, 304);
    assert_eq!(etag(&cached), etag(&over));
    assert!(cached.body.is_empty());
    let outdated = holding(etag(&before)).await;
    assert_eq!(
        (outdated.status.as_u16(), &outdated.body[..]),
        (200, &b"second"[..])
    );
    // Conditional put: a stale ETag loses, the current one wins.
    let stale = etag(&before);
    let current = etag(&over);
    let lost = http
        .req(
            Method::PUT,
            &r,
            "/v1/kv/key-1",
            &[("if-match", &stale)],
            "third",
        )
        .await;
    assert_eq!(lost.status, 412);
    assert_eq!(error_code(&lost), "precondition_failed");
    let won = http
        .req(
            Method::PUT,
            &r,
            "/v1/kv/key-1",
            &[("if-match", &current)],
            "third",
        )
        .await;
    assert_eq!(won.status, 200);
    // Create-only.
    let exists = http
        .req(
            Method::PUT,
            &r,
            "/v1/kv/key-2",
            &[("if-none-match", "*")],
            "x",
        )
        .await;
    assert_eq!(exists.status, 412);
    let fresh = http
        .req(
            Method::PUT,
            &r,
            "/v1/kv/brand-new",
            &[("if-none-match", "*")],
            "x",
        )
        .await;
    assert_eq!(fresh.status, 201);
    // Conditional delete.
    let del_stale = http
        .req(
            Method::DELETE,
            &r,
            "/v1/kv/key-1",
            &[("if-match", &current)],
            "",
        )
        .await;
    assert_eq!(del_stale.status, 412);
    let now = etag(&http.get(&r, "/v1/kv/key-1").await);
    let del = http
        .req(
            Method::DELETE,
            &r,
            "/v1/kv/key-1",
            &[("if-match", &now)],
            "",
        )
        .await;
    assert_eq!(del.status, 204);
    assert_eq!(http.get(&r, "/v1/kv/key-1").await.status, 404);
    assert_eq!(http.delete(&r, "/v1/kv/key-1").await.status, 404);
    let plain_del = http.delete(&r, "/v1/kv/brand-new").await;
    assert_eq!(plain_del.status, 204);
    // Restore key-1 so the count below is simple.
    http.put(&r, "key-1", "value-1").await;

    // Demo API: 100 keys.
    for i in 0..100 {
        let body = format!(r#"{{"key":"demo-{i}","value":"dv-{i}"}}"#);
        let resp = http
            .req(
                Method::POST,
                &r,
                "/put",
                &[("content-type", "application/json")],
                body,
            )
            .await;
        assert_eq!(json(&resp), serde_json::json!({"status": "Successful"}));
    }
    let got = http.get(&r, "/get?key=demo-7").await;
    assert_eq!(
        json(&got),
        serde_json::json!({"key": "demo-7", "value": "dv-7"})
    );
    let overwrite = r#"{"key":"demo-7","value":"again"}"#;
    http.req(Method::POST, &r, "/put", &[], overwrite).await;
    assert_eq!(
        json(&http.get(&r, "/get?key=demo-7").await)["value"],
        "again"
    );
    // JSON as Python's json.dumps writes it: every non-ASCII character escaped, six
    // bytes for two. A value well under the limit is taken however it is escaped.
    let accents = "é".repeat(400_000);
    let escaped = serde_json::json!({"key": "demo-8", "value": accents})
        .to_string()
        .replace('é', "\\u00e9");
    assert!(escaped.len() > 2 << 20);
    let resp = http.req(Method::POST, &r, "/put", &[], escaped).await;
    assert_eq!(json(&resp), serde_json::json!({"status": "Successful"}));
    assert_eq!(http.get(&r, "/v1/kv/demo-8").await.body, accents);
    let missing = http.get(&r, "/get?key=nope").await;
    assert_eq!(
        (missing.status.as_u16(), json(&missing)),
        (200, serde_json::json!({"status": "Key not found"}))
    );
    let deleted = http.get(&r, "/delete?key=demo-99").await;
    assert_eq!(
        json(&deleted),
        serde_json::json!({"status": "Delete successful"})
    );
    let deleted = http.delete(&r, "/delete?key=demo-98").await;
    assert_eq!(
        json(&deleted),
        serde_json::json!({"status": "Delete successful"})
    );
    let again = http.delete(&r, "/delete?key=demo-98").await;
    assert_eq!(
        (again.status.as_u16(), json(&again)),
        (200, serde_json::json!({"status": "Key not found"}))
    );
    assert_eq!(
        json(&http.get(&r, "/get?key=demo-99").await)["status"],
        "Key not found"
    );
    // Demo and v1 share one keyspace.
    assert_eq!(http.get(&r, "/v1/kv/demo-5").await.body, "dv-5");
    // A value that is not text is not handed to the demo API as other bytes.
    assert_eq!(http.put(&r, "binary", vec![0xFFu8, 0, 7]).await.status, 201);
    let binary = http.get(&r, "/get?key=binary").await;
    assert_eq!(binary.status, 406);
    assert!(
        json(&binary)["status"]
            .as_str()
            .unwrap()
            .contains("GET /v1/kv/")
    );

    // Spread over shards: each leader holds 20%..47% of the v1 keys.
    let cluster = json(&http.get(&r, "/v1/cluster").await);
    let shards = cluster["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    let total = 1000 + 98;
    for s in shards {
        let leader = s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["role"] == "leader")
            .unwrap();
        let share = leader["keys"].as_u64().unwrap() as f64 / total as f64;
        assert!(
            (0.20..=0.47).contains(&share),
            "shard {} holds {:.1}% of the keys",
            s["id"],
            share * 100.0
        );
    }

    // Every key is on its follower too, read directly with consistency=stale.
    let info = pg.info();
    let admin = AdminClient::new(Duration::from_secs(5));
    let mut owner: HashMap<u32, Vec<String>> = HashMap::new();
    for n in &info.nodes {
        owner.entry(n.shard).or_default().push(n.address.clone());
    }
    let mut versions = HashMap::new();
    for i in 0..1000 {
        let key = format!("key-{i}");
        let via_router = http.get(&r, &format!("/v1/kv/{key}")).await;
        assert_eq!(via_router.status, 200, "{key}");
        versions.insert(key.clone(), (etag(&via_router), via_router.body.clone()));
    }
    for n in &info.nodes {
        let st = admin.status(&n.address).await.unwrap();
        if st.role != dataplane::topology::Role::Follower {
            continue;
        }
        // Followers apply asynchronously after the ack in the committed order; wait for level.
        let leader = owner[&n.shard]
            .iter()
            .find(|a| **a != n.address)
            .unwrap()
            .clone();
        eventually("follower to catch up", Duration::from_secs(10), || async {
            let l = admin.status(&leader).await.ok()?;
            let f = admin.status(&n.address).await.ok()?;
            (l.last_seq == f.last_seq).then_some(())
        })
        .await;
        let slot_owner = cluster["shards"][n.shard as usize]["slot_ranges"].clone();
        let ranges: Vec<(u16, u16)> = serde_json::from_value(slot_owner).unwrap();
        // Another shard's key is not "missing" here: the follower says it is not its own.
        let foreign = (0..1000)
            .map(|i| format!("key-{i}"))
            .find(|k| {
                let slot = dataplane::slots::slot_for(k.as_bytes());
                !ranges.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .unwrap();
        let resp = http
            .get(&n.address, &format!("/v1/kv/{foreign}?consistency=stale"))
            .await;
        assert_eq!(
            (resp.status.as_u16(), error_code(&resp)),
            (421, "wrong_shard".to_string())
        );
        for (key, (tag, value)) in &versions {
            let slot = dataplane::slots::slot_for(key.as_bytes());
            if !ranges.iter().any(|&(a, b)| a <= slot && slot <= b) {
                continue;
            }
            let resp = http
                .get(&n.address, &format!("/v1/kv/{key}?consistency=stale"))
                .await;
            assert_eq!(resp.status, 200, "{key} missing on follower {}", n.id);
            assert_eq!(
                (&etag(&resp), &resp.body),
                (tag, value),
                "{key} differs on follower {}",
                n.id
            );
        }
    }

    // Stop, start on the same data dir: every key, same version.
    let held: u64 = shards
        .iter()
        .flat_map(|s| s["replicas"].as_array().unwrap())
        .filter(|x| x["role"] == "leader")
        .map(|x| x["keys"].as_u64().unwrap())
        .sum();
    let dir = pg.dir.clone();
    let tmp = pg.stop();
    // A stopped replica closed its database cleanly: `distkv inspect` reads it without a
    // repair, and every replica holds its shard's keys.
    let mut rows = 0;
    for n in &info.nodes {
        let out = std::process::Command::new(exe())
            .args(["inspect", "--data-dir"])
            .arg(dir.join(&n.id))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "inspect {}: {stderr}", n.id);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let kv = report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "kv")
            .unwrap();
        rows += kv["rows"].as_u64().unwrap();
    }
    assert_eq!(rows, 2 * held, "kv rows over all replicas after the stop");
    let pg = Playground::start_in(&dir, 3, 2, &[]);
    let r = pg.router.clone();
    for (key, (tag, value)) in &versions {
        let resp = http.get(&r, &format!("/v1/kv/{key}")).await;
        assert_eq!(resp.status, 200, "{key} lost in restart");
        assert_eq!(
            (&etag(&resp), &resp.body),
            (tag, value),
            "{key} changed in restart"
        );
    }
    assert_eq!(
        json(&http.get(&r, "/get?key=demo-7").await)["value"],
        "again"
    );
    drop(pg);
    drop(tmp);
}

/// (what, method, path, headers, body, expected status, expected error code)
type BadCase = (
    &'static str,
    Method,
    String,
    Vec<(&'static str, &'static str)>,
    Bytes,
    u16,
    &'static str,
);

/// Every bad input gets its status and error body, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let pg = Playground::start(
        1,
        1,
        &[
            "--node-arg=--max-value-bytes=1000",
            "--node-arg=--max-key-bytes=64",
        ],
    );
    let r = pg.router.clone();
    let node = pg.info().nodes[0].address.clone();
    let http = Http::default();
    assert_eq!(http.put(&r, "k", "original").await.status, 201);
    let version = etag(&http.get(&r, "/v1/kv/k").await);

    // Router limits are the defaults (1 KiB keys, 1 MiB values); the node's are smaller.
    let cases: Vec<BadCase> = vec![
        (
            "value over 1 MiB at the router",
            Method::PUT,
            "/v1/kv/k".into(),
            vec![],
            Bytes::from(vec![b'x'; (1 << 20) + 1]),
            413,
            "value_too_large",
        ),
        (
            "key over 1 KiB at the router",
            Method::PUT,
            format!("/v1/kv/{}", "k".repeat(1025)),
            vec![],
            Bytes::from("v"),
            413,
            "key_too_large",
        ),
        (
            "empty key",
            Method::PUT,
            "/v1/kv/".into(),
            vec![],
            Bytes::from("v"),
            400,
            "empty_key",
        ),
        (
            "bad If-Match",
            Method::PUT,
            "/v1/kv/k".into(),
            vec![("if-match", "garbage")],
            Bytes::from("v"),
            400,
            "invalid_precondition",
        ),
        (
            "unknown route",
            Method::GET,
            "/v2/nothing".into(),
            vec![],
            Bytes::new(),
            404,
            "unknown_route",
        ),
        (
            "wrong method",
            Method::POST,
            "/v1/kv/k".into(),
            vec![],
            Bytes::from("v"),
            405,
            "method_not_allowed",
        ),
        (
            "wrong method on demo",
            Method::PUT,
            "/put".into(),
            vec![],
            Bytes::from("v"),
            405,
            "method_not_allowed",
        ),
        (
            "a method /v1/kv/{key} does not have, without a key",
            Method::PATCH,
            "/v1/kv/".into(),
            vec![],
            Bytes::from("v"),
            405,
            "method_not_allowed",
        ),
        (
            "a misspelt consistency",
            Method::GET,
            "/v1/kv/k?consistency=stal".into(),
            vec![],
            Bytes::new(),
            400,
            "invalid_consistency",
        ),
        (
            "internal routes are not routed",
            Method::GET,
            "/internal/status".into(),
            vec![],
            Bytes::new(),
            404,
            "unknown_route",
        ),
        (
            "internal role not routed",
            Method::POST,
            "/internal/role".into(),
            vec![],
            Bytes::from("{}"),
            404,
            "unknown_route",
        ),
    ];
    for (what, method, path, headers, body, status, code) in cases {
        let resp = http.req(method, &r, &path, &headers, body).await;
        assert_eq!(
            resp.status.as_u16(),
            status,
            "{what}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(error_code(&resp), code, "{what}");
    }
    // An oversized body of moderate size is read and dropped, so the client gets its 413
    // rather than a reset while still sending, and the connection stays usable.
    let big = http
        .req(Method::PUT, &r, "/v1/kv/k", &[], vec![b'x'; (1 << 20) + 1])
        .await;
    assert_eq!(big.status, 413);
    assert_eq!(big.headers.get("connection"), None);
    // A huge declared body is refused unread: the answer comes before any of it is sent
    // and closes the connection, and says so (a client pool must not reuse it).
    let huge = raw_exchange(
        &r,
        "PUT /v1/kv/k HTTP/1.1\r\nhost: x\r\ncontent-length: 104857600\r\n\r\n",
    )
    .await;
    assert_first_answer(&huge, 413, "value_too_large");
    assert!(
        huge.to_ascii_lowercase().contains("connection: close"),
        "{huge}"
    );
    // A client that waits for 100 Continue is refused at once, not asked for the body.
    let expecting = raw_exchange(
        &r,
        "PUT /v1/kv/k HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5000000\r\n\r\n",
    )
    .await;
    assert!(expecting.starts_with("HTTP/1.1 413"), "{expecting}");
    // An empty key's body is read too: the next request on the connection is answered.
    let body = "x".repeat(100_000);
    let both = raw_exchange(
        &r,
        &format!(
            "PUT /v1/kv/ HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}\
             GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            body.len()
        ),
    )
    .await;
    assert_first_answer(&both, 400, "empty_key");
    assert!(both.contains("HTTP/1.1 200"), "{both}");
    // A broken chunked encoding is bad input, not a body too large; nothing is stored.
    let broken = raw_exchange(
        &r,
        "PUT /v1/kv/chunky HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nvalue\r\n0\r\n\r\n",
    )
    .await;
    assert_first_answer(&broken, 400, "invalid_body");
    assert_eq!(http.get(&r, "/v1/kv/chunky").await.status, 404);
    // A transfer coding the HTTP layer does not undo is refused, not stored encoded.
    let gzip = raw_exchange(
        &r,
        "PUT /v1/kv/k HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nGZZ\r\n0\r\n\r\n",
    )
    .await;
    assert_first_answer(&gzip, 501, "unsupported_transfer_encoding");
    // HEAD must change nothing, and a GET of the demo's /delete deletes.
    for target in [&r, &node] {
        let head = http
            .req(Method::HEAD, target, "/delete?key=k", &[], "")
            .await;
        assert_eq!(head.status, 405, "HEAD /delete at {target}");
        assert_eq!(head.headers["allow"], "GET,DELETE");
    }
    // A repeated demo key gets the demo's answer, not the query parser's plain text.
    let twice = http.get(&r, "/get?key=a&key=b").await;
    assert_eq!(
        twice.status,
        200,
        "{}",
        String::from_utf8_lossy(&twice.body)
    );
    assert_eq!(json(&twice)["status"], "Key not found");
    // Node-side limits, straight at the node.
    let big = http
        .req(Method::PUT, &node, "/v1/kv/k", &[], vec![b'x'; 1001])
        .await;
    assert_eq!(
        (big.status.as_u16(), error_code(&big)),
        (413, "value_too_large".to_string())
    );
    let long = http
        .req(
            Method::PUT,
            &node,
            &format!("/v1/kv/{}", "k".repeat(65)),
            &[],
            "v",
        )
        .await;
    assert_eq!(
        (long.status.as_u16(), error_code(&long)),
        (413, "key_too_large".to_string())
    );
    // Demo API: bad JSON and missing fields are 400 in the demo's own shape.
    for body in [
        "{",
        r#"{"key":"k"}"#,
        r#"{"value":"v"}"#,
        r#"{"key":"k","value":7}"#,
        r#"{"key":"","value":"v"}"#,
    ] {
        let resp = http.req(Method::POST, &r, "/put", &[], body).await;
        assert_eq!(resp.status, 400, "{body}");
        assert!(json(&resp)["status"].is_string(), "{body}");
    }
    let no_key = http.get(&r, "/get").await;
    assert_eq!(no_key.status, 400);
    // Nothing changed.
    let after = http.get(&r, "/v1/kv/k").await;
    assert_eq!(
        (after.body.clone(), etag(&after)),
        (Bytes::from("original"), version)
    );
    assert_eq!(json(&http.get(&r, "/get?key=k").await)["value"], "original");
    let st = AdminClient::new(Duration::from_secs(5))
        .status(&node)
        .await
        .unwrap();
    assert_eq!(
        (st.keys, st.last_seq),
        (1, 1),
        "a rejected request wrote to the log"
    );
}

/// Health, readiness, metrics and the OpenAPI document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_endpoints() {
    let pg = Playground::start(1, 2, &[]);
    let r = pg.router.clone();
    let http = Http::default();
    http.put(&r, "m", "v").await;
    assert_eq!(http.get(&r, "/healthz").await.status, 200);
    assert_eq!(http.get(&r, "/readyz").await.status, 200);
    let metrics = String::from_utf8(http.get(&r, "/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("distkv_http_requests_total{route=\"/v1/kv/{*key}\",status=\"201\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("distkv_http_request_duration_seconds_bucket"));
    let node = pg.info().nodes[0].address.clone();
    let node_metrics = String::from_utf8(http.get(&node, "/metrics").await.body.to_vec()).unwrap();
    for m in [
        "distkv_keys",
        "distkv_applied_seq",
        "distkv_group_commit_requests_bucket",
    ] {
        assert!(node_metrics.contains(m), "node metrics lack {m}");
    }
    let doc = json(&http.get(&r, "/openapi.json").await);
    for path in [
        "/v1/kv/{key}",
        "/put",
        "/get",
        "/delete",
        "/v1/cluster",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    // Every answer a client can get from the key routes is declared.
    let kv = &doc["paths"]["/v1/kv/{key}"];
    for (method, statuses) in [
        ("get", &["200", "400", "404", "413", "503", "504"][..]),
        ("put", &["200", "201", "400", "412", "413", "503", "504"]),
        ("delete", &["204", "400", "404", "412", "413", "503", "504"]),
    ] {
        for status in statuses {
            assert!(
                kv[method]["responses"][status].is_object(),
                "openapi lacks {status} for {method}"
            );
        }
    }
    assert_eq!(doc["info"]["license"]["name"], "Apache-2.0");
}

/// Runs `distkv playground ARGS` expecting it to refuse to start; returns its stderr.
fn refused_start(args: &[&str]) -> String {
    let out = std::process::Command::new(exe())
        .arg("playground")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "playground {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A taken port, a data directory in use, and a data directory of another shape are
/// refused with a message that says so, and the existing cluster is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playground_refuses_bad_starts_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh");
    let err = refused_start(&["--port", &port, "--data-dir", fresh.to_str().unwrap()]);
    assert!(err.contains("Address already in use"), "{err}");

    let pg = Playground::start(1, 2, &[]);
    let dir = pg.dir.to_str().unwrap().to_string();
    let err = refused_start(&["--port", "0", "--shards", "1", "--data-dir", &dir]);
    assert!(err.contains("already running"), "{err}");
    let http = Http::default();
    assert_eq!(http.put(&pg.router, "still", "here").await.status, 201);

    let tmp2 = pg.stop().unwrap();
    let err = refused_start(&["--port", "0", "--shards", "3", "--data-dir", &dir]);
    assert!(err.contains("1 shards x 2 replicas"), "{err}");
    let err = refused_start(&[
        "--port",
        "0",
        "--shards",
        "1",
        "--replicas",
        "2",
        "--min-in-sync",
        "3",
        "--data-dir",
        &dir,
    ]);
    assert!(
        err.contains("--min-in-sync must be between 1 and --replicas (2), got 3"),
        "{err}"
    );
    // A node flag the node does not know: the node's own reason, not only its log's path.
    let bogus = tmp.path().join("bogus");
    let err = refused_start(&[
        "--port",
        "0",
        "--data-dir",
        bogus.to_str().unwrap(),
        "--node-arg=--bogus",
    ]);
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
    let err = refused_start(&["--max-key-bytes", "0"]);
    assert!(
        err.contains("0 is not a number of bytes from 1 to 32768"),
        "{err}"
    );
    drop(tmp2);
}

/// Asserts that the first answer of a raw exchange has `status` and names `code`.
fn assert_first_answer(exchange: &str, status: u16, code: &str) {
    assert!(
        exchange.starts_with(&format!("HTTP/1.1 {status}")),
        "{exchange}"
    );
    assert!(exchange.contains(code), "{exchange}");
}

/// Sends `request` as raw bytes and reads the answer until the server closes.
async fn raw_exchange(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// An idle timeout that a request waiting for its answer could outlast is refused at the
/// start, in one line without a backtrace.
#[test]
fn an_idle_timeout_below_the_request_timeout_is_refused() {
    let out = std::process::Command::new(exe())
        .args([
            "router",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--request-timeout-ms", "40000"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "Error: --idle-timeout-ms (30000) must be above --request-timeout-ms (40000): a \
         connection waiting that long for its answer would be closed first"
    );
}

/// A connection that says nothing, or stops in the middle of its headers or body, is
/// closed after `--idle-timeout-ms`, on a node and on both router ports, and so is one
/// whose headers, sent a byte at a time, are not whole by then; one that keeps talking
/// stays open longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stall_are_closed_and_busy_ones_are_not() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let idle = ["--idle-timeout-ms", "300"];
    let tmp = tempfile::tempdir().unwrap();
    let node_args = [&idle[..], &["--replication-timeout-ms", "200"]].concat();
    let node = NodeProc::start("s0-r0", &tmp.path().join("s0-r0"), &node_args);
    // Killed however the test ends: a router left running would hold the test's output.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut router = Killed(
        Command::new(exe())
            .args(["router", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--request-timeout-ms", "200"])
            .args(idle)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(router.0.stdout.take().unwrap()).lines();
    let mut announced = || {
        let line = lines.next().unwrap().unwrap();
        line.rsplit(' ').next().unwrap().to_string()
    };
    let (public, admin) = (announced(), announced());

    for addr in [&node.addr, &public, &admin] {
        for (what, sent) in [
            ("silent", ""),
            ("half-sent headers", "GET /healthz HTTP/1.1\r\nhost: x\r\n"),
            (
                "half-sent body",
                "PUT /v1/kv/k HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
            ),
        ] {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(sent.as_bytes()).await.unwrap();
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest));
            assert!(
                closed.await.is_ok(),
                "{what} connection to {addr} still open after 10 s"
            );
        }
        // Headers a byte every 100 ms: never idle, but not whole within the timeout.
        let (mut rd, mut wr) = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap()
            .into_split();
        let trickle = tokio::spawn(async move {
            for b in b"GET /healthz HTTP/1.1\r\nx-slow: "
                .iter()
                .chain(&[b'a'; 40])
            {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut rest));
        assert!(
            closed.await.is_ok(),
            "connection to {addr} trickling its headers still open after 5 s"
        );
        trickle.abort();
        // Five requests 150 ms apart: twice the idle timeout in all, never idle for it.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        for i in 0..5 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 512];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "busy connection to {addr} closed at request {i}");
                answer.extend_from_slice(&chunk[..n]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{addr}");
        }
    }
}

/// The request bodies a replica holds at once are bounded: 64 MiB. A body past its first
/// 64 KiB holds room for all it declared; once eight half-sent 8 MiB bodies hold all but
/// 512 KiB, a 1 MiB upload waits and is refused with 503 `server_busy`, a small one is
/// taken at once, and when the half-sent ones go, large uploads are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_held_at_once_are_bounded() {
    use tokio::io::AsyncWriteExt;
    const DECLARED: usize = 8 << 20;
    let shard = Shard::start(1, AckMode::Sync, &["--max-value-bytes", "8388608"]);
    shard.assign(0, 1, &[0]).await;
    let addr = shard.nodes[0].addr.clone();
    let http = Http::default();
    let held = || body_bytes_held(&http, &addr);
    let mut holders = Vec::new();
    for i in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head =
            format!("PUT /v1/kv/held{i} HTTP/1.1\r\nhost: x\r\ncontent-length: {DECLARED}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&[b'h'; 65_537]).await.unwrap();
        holders.push(stream);
    }
    let all_but = (64 << 20) - 8 * (DECLARED - (64 << 10)) as u64;
    assert_eq!(all_but, 512 << 10);
    eventually(
        "the half-sent bodies to take their room",
        Duration::from_secs(10),
        || async { (held().await == (64 << 20) - all_but).then_some(()) },
    )
    .await;

    let r = http.put(&addr, "large", vec![b'l'; 1 << 20]).await;
    assert_eq!(
        (r.status.as_u16(), error_code(&r).as_str()),
        (503, "server_busy")
    );
    let r = http.put(&addr, "small", vec![b's'; 1 << 10]).await;
    assert_eq!(r.status.as_u16(), 201, "a small body waits for no room");

    drop(holders);
    eventually("the room to come free", Duration::from_secs(10), || async {
        (held().await == 0).then_some(())
    })
    .await;
    let r = http.put(&addr, "large", vec![b'l'; 1 << 20]).await;
    assert_eq!(r.status.as_u16(), 201);
    let r = http.get(&addr, "/v1/kv/held0").await;
    assert_eq!(
        r.status.as_u16(),
        404,
        "a body never finished stores nothing"
    );
}

/// What a process reports holding of request bodies (`/metrics`).
async fn body_bytes_held(http: &Http, addr: &str) -> u64 {
    let metrics = http.get(addr, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("distkv_request_body_bytes_held "))
        .map(|v| v.trim().parse::<u64>().unwrap())
        .expect("the process exports the bytes held")
}

/// Sends `head` and `first` bytes of a body, then one more byte every half second (never
/// idle), until the server answers and closes; returns how long that took after `first`
/// and the answer.
async fn trickle_body(addr: &str, head: String, first: usize) -> (Duration, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    wr.write_all(&vec![b't'; first]).await.unwrap();
    let started = std::time::Instant::now();
    let trickle = tokio::spawn(async move {
        while wr.write_all(b"t").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut answer))
        .await
        .expect("the node cuts the body off")
        .unwrap();
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    (started.elapsed(), answer)
}

/// A request body must arrive at 16 KiB/s on average after a 5 s grace: one sent a byte
/// every half second, never idle, is cut off with 408 `body_too_slow` once its time is up
/// (5 s for 100 bytes; 13 s for 128 KiB, which held room in the body budget from its
/// first 64 KiB on, and gives it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_trickle_are_cut_off() {
    let shard = Shard::start(1, AckMode::Sync, &["--max-value-bytes", "131072"]);
    shard.assign(0, 1, &[0]).await;
    let addr = shard.nodes[0].addr.clone();
    let head = |key: &str, len: usize| {
        format!("PUT /v1/kv/{key} HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n")
    };
    let ((small, small_answer), (large, large_answer)) = tokio::join!(
        trickle_body(&addr, head("small", 100), 10),
        trickle_body(&addr, head("large", 131_072), 65_537),
    );
    for answer in [&small_answer, &large_answer] {
        assert_first_answer(answer, 408, "body_too_slow");
    }
    assert!(small >= Duration::from_secs(4), "cut off after {small:?}");
    assert!(large >= Duration::from_secs(12), "cut off after {large:?}");
    let http = Http::default();
    assert_eq!(body_bytes_held(&http, &addr).await, 0);
    for key in ["small", "large"] {
        let r = http.get(&addr, &format!("/v1/kv/{key}")).await;
        assert_eq!(r.status.as_u16(), 404, "nothing was stored");
    }
}
