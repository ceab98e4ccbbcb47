//! Helpers shared by integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Builds the `sync` example and returns its path, as cargo reports it. Every test builds it
/// with the same features as the test build (`--all-features`): one artifact, built once, never
/// replaced under a running test.
pub fn build_sync() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--all-features",
            "--example",
            "sync",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo build --example sync");
    assert!(out.status.success(), "building the sync example failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sync")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo did not report the sync example's executable")
}

/// The example directory, `examples/data/corp.ldif` (an Active Directory export), as a source:
/// anchored on objectGUID, which the file holds as GUID text.
#[cfg(feature = "ldif")]
pub fn example_directory() -> dirsync::connector::ldif::LdifSource {
    use dirsync::connector::ldif::{default_binary_attributes, LdifSource, LdifSourceConfig};
    LdifSource::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/corp.ldif"),
        LdifSourceConfig {
            anchor_attribute: dirsync::model::AttrName::new("objectGUID"),
            binary_attributes: default_binary_attributes()
                .into_iter()
                .filter(|a| !a.is("objectGUID"))
                .collect(),
            ..LdifSourceConfig::default()
        },
    )
}

/// The rule set `examples/rules/<name>`.
pub fn example_rules(name: &str) -> dirsync::rules::ruleset::RuleSet {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/rules")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    dirsync::rules::ruleset::RuleSet::from_toml(&text, Some(name)).unwrap()
}

/// The target ids, sorted, of the linked objects that source object `anchor` references in
/// `attribute`: what its target object should hold.
pub fn linked_references(
    views: &dirsync::state::Views,
    anchor: &dirsync::model::Anchor,
    attribute: &str,
) -> Vec<String> {
    let mut ids: Vec<String> = views
        .mirror
        .get(anchor)
        .and_then(|e| e.get(attribute))
        .into_iter()
        .flatten()
        .filter_map(|v| match v {
            dirsync::model::Value::Reference(r) => views.mirror.resolve(r),
            _ => None,
        })
        .filter_map(|a| views.links.get(&a).map(|l| l.target_id.to_string()))
        .collect();
    ids.sort();
    ids
}

/// The objects of a memory target by name (`userName` or `displayName`), to check references.
pub struct Named<'a>(pub &'a dirsync::connector::memory::MemoryTarget);

impl Named<'_> {
    /// The target id of the object named `name`.
    pub fn id(&self, name: &str) -> String {
        self.0
            .objects()
            .into_iter()
            .find(|o| {
                o.attributes.first_str("userName") == Some(name)
                    || o.attributes.first_str("displayName") == Some(name)
            })
            .map(|o| o.id.to_string())
            .unwrap_or_else(|| panic!("{name} is in the target"))
    }

    /// The target ids of `names`, sorted.
    pub fn ids(&self, names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| self.id(n)).collect();
        v.sort();
        v
    }

    /// The target ids the object named `name` references in `attr`, sorted.
    pub fn refs(&self, name: &str, attr: &str) -> Vec<String> {
        use dirsync::model::{Reference, Value};
        let id = self.id(name);
        let o = self
            .0
            .objects()
            .into_iter()
            .find(|o| o.id.as_str() == id)
            .unwrap();
        let mut v: Vec<String> = o
            .attributes
            .get(attr)
            .map(|vs| {
                vs.iter()
                    .map(|v| match v {
                        Value::Reference(Reference::Target(t)) => t.to_string(),
                        other => panic!("{attr} of {name}: {other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The rules of [`references_life_cycle`]: users (`userName` from `user_name`, a single-valued
/// `manager` reference) and groups (`displayName` from `group_name`, `members` references).
pub fn reference_rules(user_name: &str, group_name: &str) -> dirsync::rules::ruleset::RuleSet {
    let text = format!(
        r#"
[[rule]]
name = "people"
source_type = "user"
target_type = "User"
join = [["userName"]]
deprovision = {{ action = "delete" }}
[[rule.flow]]
target = "userName"
expression = '{user_name}'
[[rule.flow]]
target = "manager"
expression = '[manager]'
reference = true
multi = false
[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["displayName"]]
deprovision = {{ action = "delete" }}
[[rule.flow]]
target = "displayName"
expression = '{group_name}'
[[rule.flow]]
target = "members"
expression = '[member]'
reference = true
"#
    );
    dirsync::rules::ruleset::RuleSet::from_toml(&text, Some("rules.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// What the directory does in [`references_life_cycle`].
pub struct ReferenceSteps<'a> {
    /// Deletes `lc-boss`.
    pub delete_boss: &'a dyn Fn(),
    /// Adds a user `lc-boss2` at the DN `lc-boss` had.
    pub reuse_boss_dn: &'a dyn Fn(),
    /// Renames `lc-mem`; renames and moves `lc-mgr` to another container.
    pub rename_and_move: &'a dyn Fn(),
    /// How many objects the delta after the delete, and after the renames, delivers (when the
    /// directory's behaviour makes it exact).
    pub imported: Option<(u64, u64)>,
}

/// Issue 14's reference life cycle through the engine, into `target` (the directory holds users
/// `lc-boss`, `lc-report` managed by `lc-boss`, `lc-mgr`, `lc-rep2` managed by `lc-mgr`,
/// `lc-mem`, and a group `lc-team` of `lc-boss`, `lc-report`, `lc-mgr` and `lc-mem`): a
/// manager deleted (its report loses the manager, the group the member, no issue stays), its DN
/// taken by a new user (inherits nothing), a member renamed and a member-and-manager renamed
/// and moved (the group and the report keep them: same target ids); then a full sync finds
/// nothing to repair.
pub async fn references_life_cycle(
    sync: &mut dirsync::engine::Synchronizer,
    target: &dirsync::connector::memory::MemoryTarget,
    label: &str,
    steps: ReferenceSteps<'_>,
) {
    let named = Named(target);
    let (id_of, refs, ids) = (
        |n: &str| named.id(n),
        |n: &str, a: &str| named.refs(n, a),
        |ns: &[&str]| named.ids(ns),
    );
    macro_rules! cycle {
        () => {{
            let r = sync.run_cycle().await.unwrap();
            assert!(r.failures.is_empty(), "{label}: {r}");
            assert!(r.issues.is_empty(), "{label}: {r}");
            r
        }};
    }
    // The first load (a group or a report may be created before what it references: a second
    // cycle settles references).
    let _ = (cycle!(), cycle!());
    assert_eq!(refs("lc-report", "manager"), [id_of("lc-boss")]);
    assert_eq!(refs("lc-rep2", "manager"), [id_of("lc-mgr")]);
    let (mgr, mem) = (id_of("lc-mgr"), id_of("lc-mem"));
    assert_eq!(
        refs("lc-team", "members"),
        ids(&["lc-boss", "lc-report", "lc-mgr", "lc-mem"])
    );

    (steps.delete_boss)();
    let r = cycle!();
    assert_eq!(r.count("delete"), 1, "{label}: {r}");
    if let Some((after_delete, _)) = steps.imported {
        assert_eq!(r.imported, after_delete, "{label}: {r}");
    }
    assert!(refs("lc-report", "manager").is_empty(), "{label}: {r}");
    let rest = ids(&["lc-report", "lc-mgr", "lc-mem"]);
    assert_eq!(refs("lc-team", "members"), rest, "{label}: {r}");
    let r = cycle!();
    assert_eq!(r.total_done(), 0, "{label}: {r}");

    (steps.reuse_boss_dn)();
    let r = cycle!();
    assert_eq!(r.count("create"), 1, "{label}: {r}");
    assert!(refs("lc-report", "manager").is_empty(), "{label}: {r}");
    assert_eq!(refs("lc-team", "members"), rest, "{label}: {r}");

    (steps.rename_and_move)();
    let r = cycle!();
    if let Some((_, after_renames)) = steps.imported {
        assert_eq!(r.imported, after_renames, "{label}: {r}");
    }
    assert_eq!((id_of("lc-mgr"), id_of("lc-mem")), (mgr.clone(), mem));
    assert_eq!(refs("lc-rep2", "manager"), [mgr], "{label}: {r}");
    assert_eq!(refs("lc-team", "members"), rest, "{label}: {r}");
    let r = sync.full_sync().await.unwrap();
    assert_eq!(r.total_done(), 0, "{label}: {r}");
    assert!(r.issues.is_empty(), "{label}: {r}");
    let r = cycle!();
    assert_eq!(r.total_done(), 0, "{label}: {r}");
}

/// A free TCP port on 127.0.0.1 (free when asked; a server started on it may still lose it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running scim2-server (PyPI `scim2-server`, path in `DIRSYNC_SCIM2_SERVER`); killed on drop.
pub struct Scim2Server {
    child: std::process::Child,
    /// The service's base URL (`http://127.0.0.1:PORT/v2`).
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Scim2Server {
    /// The write requests (POST, PUT, PATCH, DELETE) the server has answered, by its own log.
    ///
    /// The server writes a request's log line after it has sent the answer, so the client can
    /// be ahead of the log: the count is read until it has stayed the same for 250 ms (at most
    /// 5 s).
    pub fn writes(&self) -> usize {
        use std::time::{Duration, Instant};
        let count = || {
            let log = std::fs::read_to_string(self._dir.path().join("server.log")).unwrap();
            log.lines()
                .filter(|l| {
                    ["\"POST ", "\"PUT ", "\"PATCH ", "\"DELETE "]
                        .iter()
                        .any(|m| l.contains(m))
                })
                .count()
        };
        let (t0, mut last, mut since) = (Instant::now(), count(), Instant::now());
        while since.elapsed() < Duration::from_millis(250) && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(25));
            let n = count();
            if n != last {
                (last, since) = (n, Instant::now());
            }
        }
        last
    }
}

impl Drop for Scim2Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts scim2-server on a free port of 127.0.0.1 with bearer token `token`, or `None` (with the
/// reason printed) when `DIRSYNC_SCIM2_SERVER` is unset — a failure instead when
/// `DIRSYNC_REQUIRE_SERVERS` is set. Panics — fails the test — when the server does not come up.
pub fn scim2_server(token: &str) -> Option<Scim2Server> {
    use std::time::{Duration, Instant};
    let Some(bin) = std::env::var_os("DIRSYNC_SCIM2_SERVER") else {
        let why =
            "DIRSYNC_SCIM2_SERVER is not set (scripts/test.sh installs scim2-server and sets it)";
        if std::env::var_os("DIRSYNC_REQUIRE_SERVERS").is_some() {
            panic!("{why}, and DIRSYNC_REQUIRE_SERVERS is");
        }
        eprintln!("skipped: {why}");
        return None;
    };
    let bin = PathBuf::from(bin);
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(&bin)
            .args([
                "--hostname",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--bearer-token",
                token,
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            // The server logs one line per request on stderr ("POST /v2/Users HTTP/1.1" 201 …).
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("DIRSYNC_SCIM2_SERVER={} cannot start: {e}", bin.display()));
        let mut s = Scim2Server {
            child,
            base: format!("http://127.0.0.1:{port}/v2"),
            _dir: dir,
        };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = s.child.try_wait() {
                break; // exited (port taken?): try another port
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = s.child.kill();
    }
    panic!("scim2-server ({}) did not become ready", bin.display());
}
