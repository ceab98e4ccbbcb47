//! `scim_bench`: 10,000 user creates, then 10,000 updates, exported through dirsync's
//! [`ScimTarget`] to a local `scim2-server`, next to a plain reqwest loop sending the same
//! requests with the same concurrency in the same run. Prints both rates and the ratio; then
//! dirsync again with `/Bulk`, the operations handed to the target in calls of 50 (as the
//! engine hands them, `max_batch`).
//!
//! ```text
//! scripts/bench-scim.sh            # (default 10000 users, concurrency 4) installs scim2-server when missing, then runs this
//! DIRSYNC_SCIM2_SERVER=… cargo run --release --features scim --example scim_bench -- [N] [CONCURRENCY]
//! ```
//!
//! Each side gets a fresh server so neither pays for the other's data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dirsync::connector::scim::{ScimAuth, ScimConfig, ScimTarget, Secret};
use dirsync::connector::{Target, TargetOperation};
use dirsync::model::{AttributeChange, Attributes, TargetId, Values};
use futures::stream::{self, StreamExt};
use serde_json::json;

const TOKEN: &str = "bench-token";

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bin: &str) -> Result<Server, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new(bin)
        .args([
            "--hostname",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--bearer-token",
            TOKEN,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    let s = Server(child, format!("http://127.0.0.1:{port}/v2"));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("scim2-server did not start".into())
}

fn user(i: usize) -> Attributes {
    let mut a = Attributes::new();
    a.set("userName", Values::one(format!("user{i}@bench.test")));
    a.set("externalId", Values::one(format!("ext{i}")));
    a.set("displayName", Values::one(format!("User {i}")));
    a.set("name.givenName", Values::one(format!("Given{i}")));
    a.set("active", Values::one(true));
    a
}

fn changes(i: usize) -> Vec<AttributeChange> {
    vec![AttributeChange::replace(
        "displayName",
        Values::one(format!("User {i} (renamed)")),
    )]
}

/// dirsync's target: operations handed over `batch` to an apply call (1: one request each, no
/// bulk; more: `/Bulk` requests), `c` calls at once.
async fn dirsync(base: &str, n: usize, c: usize, batch: usize) -> Result<(f64, f64), String> {
    let t = ScimTarget::new(ScimConfig {
        base_url: base.into(),
        auth: ScimAuth::Bearer {
            token: Secret::new(TOKEN),
        },
        bulk: batch > 1,
        max_batch: batch,
        etags: false,
        ..ScimConfig::default()
    })
    .map_err(|e| e.to_string())?;
    t.service_info().await.map_err(|e| e.to_string())?;
    let creates: Vec<TargetOperation> = (0..n)
        .map(|i| TargetOperation::Create {
            object_type: "User".into(),
            attributes: user(i),
        })
        .collect();
    let t0 = Instant::now();
    let ids: Vec<Vec<Result<TargetId, String>>> = stream::iter(creates.chunks(batch))
        .map(|ops| {
            let t = &t;
            async move {
                t.apply(ops)
                    .await
                    .into_iter()
                    .map(|r| r.map(|a| a.id).map_err(|e| e.to_string()))
                    .collect()
            }
        })
        .buffered(c)
        .collect()
        .await;
    let create = n as f64 / t0.elapsed().as_secs_f64();
    let ids: Vec<TargetId> = ids.into_iter().flatten().collect::<Result<_, _>>()?;
    let updates: Vec<TargetOperation> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| TargetOperation::Update {
            id: id.clone(),
            object_type: "User".into(),
            changes: changes(i),
        })
        .collect();
    let t0 = Instant::now();
    let fails: usize = stream::iter(updates.chunks(batch))
        .map(|ops| {
            let t = &t;
            async move { t.apply(ops).await.iter().filter(|r| r.is_err()).count() }
        })
        .buffer_unordered(c)
        .fold(0, |a, f| futures::future::ready(a + f))
        .await;
    if fails > 0 {
        return Err(format!("{fails} dirsync updates failed"));
    }
    Ok((create, n as f64 / t0.elapsed().as_secs_f64()))
}

async fn plain(base: &str, n: usize, c: usize) -> Result<(f64, f64), String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let ids: Vec<Result<String, String>> = stream::iter(0..n)
        .map(|i| {
            let http = &http;
            async move {
                let body = json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "userName": format!("user{i}@bench.test"), "externalId": format!("ext{i}"),
                    "displayName": format!("User {i}"), "name": {"givenName": format!("Given{i}")},
                    "active": true,
                });
                let r = http
                    .post(format!("{base}/Users"))
                    .bearer_auth(TOKEN)
                    .header("Content-Type", "application/scim+json")
                    .header("Accept", "application/scim+json")
                    .body(body.to_string())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let j: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
                j["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("no id: {j}"))
            }
        })
        .buffered(c)
        .collect()
        .await;
    let create = n as f64 / t0.elapsed().as_secs_f64();
    let ids: Vec<String> = ids.into_iter().collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let fails = stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let http = &http;
            async move {
                let body = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                    "Operations": [{"op": "replace", "path": "displayName", "value": format!("User {i} (renamed)")}]});
                let r = http.patch(format!("{base}/Users/{id}")).bearer_auth(TOKEN)
                    .header("Content-Type", "application/scim+json").header("Accept", "application/scim+json")
                    .body(body.to_string()).send().await;
                !matches!(r, Ok(r) if r.status().is_success())
            }
        })
        .buffer_unordered(c)
        .filter(|f| futures::future::ready(*f))
        .count()
        .await;
    if fails > 0 {
        return Err(format!("{fails} plain updates failed"));
    }
    Ok((create, n as f64 / t0.elapsed().as_secs_f64()))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let bin = std::env::var("DIRSYNC_SCIM2_SERVER").map_err(|_| {
        "set DIRSYNC_SCIM2_SERVER to the scim2-server executable (scripts/bench-scim.sh does)"
            .to_string()
    })?;
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let c: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let s1 = start(&bin)?;
    let (pc, pu) = plain(&s1.1, n, c).await?;
    drop(s1);
    let s2 = start(&bin)?;
    let (dc, du) = dirsync(&s2.1, n, c, 1).await?;
    drop(s2);
    let s3 = start(&bin)?;
    let (bc, bu) = dirsync(&s3.1, n, c, 50).await?;
    drop(s3);
    println!("scim export, {n} users, concurrency {c}, scim2-server on 127.0.0.1");
    println!("{:<14} {:>14} {:>14}", "", "creates/s", "updates/s");
    println!("{:<14} {:>14.1} {:>14.1}", "plain", pc, pu);
    println!("{:<14} {:>14.1} {:>14.1}", "dirsync", dc, du);
    println!("{:<14} {:>14.3} {:>14.3}", "ratio", dc / pc, du / pu);
    println!("{:<14} {:>14.1} {:>14.1}", "dirsync /Bulk", bc, bu);
    println!("{:<14} {:>14.3} {:>14.3}", "ratio", bc / pc, bu / pu);
    Ok(())
}
