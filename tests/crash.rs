//! Crash safety, end to end: the `sync` example is killed with SIGKILL at seeded random moments
//! (during import, planning and export) again and again while the source changes under it; then
//! runs to completion must leave the LDIF target holding exactly one object per in-scope source
//! object — none duplicated, none lost, every attribute and membership as the rules say — and a
//! further full plan must find nothing to do.

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::build_sync;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dirsync::connector::ldif::{parse_str, LdifBody};

/// SplitMix64: a small seeded PRNG, so every run of the test makes the same choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone)]
struct User {
    uuid: String,
    uid: String,
    given: String,
    sn: String,
    department: String,
}

#[derive(Clone)]
struct Group {
    uuid: String,
    cn: String,
    /// Member uids.
    users: BTreeSet<String>,
    /// Member group names.
    groups: BTreeSet<String>,
}

const OUT_OF_SCOPE: &str = "Service Accounts";
const DEPARTMENTS: [&str; 5] = ["Engineering", "Sales", "Finance", "Research", "Support"];

/// The source directory, as the test knows it.
struct Directory {
    users: BTreeMap<String, User>,
    groups: Vec<Group>,
    next_id: usize,
}

fn uuid_of(n: usize, kind: u8) -> String {
    format!("{:08x}-0000-4000-8{kind:03x}-{n:012x}", n * 7919 + 1)
}

fn user_dn(uid: &str) -> String {
    format!("uid={uid},ou=People,dc=example,dc=com")
}

fn group_dn(cn: &str) -> String {
    format!("cn={cn},ou=Groups,dc=example,dc=com")
}

impl Directory {
    fn new(users: usize, groups: usize, rng: &mut Rng) -> Directory {
        let mut d = Directory {
            users: BTreeMap::new(),
            groups: Vec::new(),
            next_id: 0,
        };
        for _ in 0..users {
            d.add_user(rng);
        }
        for g in 0..groups {
            let cn = format!("team-{g:02}");
            let mut members = BTreeSet::new();
            let uids: Vec<String> = d.in_scope().map(|u| u.uid.clone()).collect();
            for _ in 0..(5 + rng.below(25)) {
                members.insert(uids[rng.below(uids.len())].clone());
            }
            d.groups.push(Group {
                uuid: uuid_of(g, 0x9),
                cn,
                users: members,
                groups: BTreeSet::new(),
            });
        }
        // Nested groups: the first two hold some of the others.
        for g in 2..groups.min(8) {
            let name = d.groups[g].cn.clone();
            d.groups[g % 2].groups.insert(name);
        }
        d
    }

    fn add_user(&mut self, rng: &mut Rng) {
        let n = self.next_id;
        self.next_id += 1;
        let department = if rng.below(20) == 0 {
            OUT_OF_SCOPE
        } else {
            DEPARTMENTS[rng.below(DEPARTMENTS.len())]
        };
        let u = User {
            uuid: uuid_of(n, 0x1),
            uid: format!("user{n:04}"),
            given: format!("Given{n}"),
            sn: format!("Family{n}"),
            department: department.to_owned(),
        };
        self.users.insert(u.uid.clone(), u);
    }

    fn in_scope(&self) -> impl Iterator<Item = &User> {
        self.users.values().filter(|u| u.department != OUT_OF_SCOPE)
    }

    fn random_in_scope(&self, rng: &mut Rng) -> Option<String> {
        let uids: Vec<&User> = self.in_scope().collect();
        (!uids.is_empty()).then(|| uids[rng.below(uids.len())].uid.clone())
    }

    fn forget_member(&mut self, uid: &str) {
        for g in &mut self.groups {
            g.users.remove(uid);
        }
    }

    /// A round of edits: renames, deletions and scope exits (a few: within the guard),
    /// membership changes, new users. Returns a description for the log.
    fn edit(&mut self, rng: &mut Rng) -> String {
        let mut done = Vec::new();
        for _ in 0..(3 + rng.below(8)) {
            match rng.below(10) {
                0..=2 => {
                    if let Some(uid) = self.random_in_scope(rng) {
                        if let Some(u) = self.users.get_mut(&uid) {
                            u.sn = format!(
                                "{}-R{}",
                                u.sn.split("-R").next().unwrap_or(""),
                                rng.below(1000)
                            );
                        }
                        done.push(format!("rename {uid}"));
                    }
                }
                3 => {
                    if let Some(uid) = self.random_in_scope(rng) {
                        self.users.remove(&uid);
                        self.forget_member(&uid);
                        done.push(format!("delete {uid}"));
                    }
                }
                4 => {
                    if let Some(uid) = self.random_in_scope(rng) {
                        if let Some(u) = self.users.get_mut(&uid) {
                            u.department = OUT_OF_SCOPE.to_owned();
                        }
                        self.forget_member(&uid);
                        done.push(format!("out of scope {uid}"));
                    }
                }
                5..=7 => {
                    let g = rng.below(self.groups.len());
                    if let Some(uid) = self.random_in_scope(rng) {
                        let group = &mut self.groups[g];
                        if !group.users.remove(&uid) {
                            group.users.insert(uid.clone());
                        }
                        done.push(format!("membership {} {uid}", group.cn));
                    }
                }
                _ => {
                    self.add_user(rng);
                    done.push("new user".to_owned());
                }
            }
        }
        done.join(", ")
    }

    fn to_ldif(&self) -> String {
        let mut s = String::from("version: 1\n\n");
        for u in self.users.values() {
            s.push_str(&format!(
                "dn: {}\nobjectClass: top\nobjectClass: inetOrgPerson\nentryUUID: {}\nuid: {}\ncn: {} {}\n\
                 givenName: {}\nsn: {}\nmail: {}@example.com\ndepartment: {}\n\n",
                user_dn(&u.uid), u.uuid, u.uid, u.given, u.sn, u.given, u.sn, u.uid, u.department
            ));
        }
        for g in &self.groups {
            s.push_str(&format!(
                "dn: {}\nobjectClass: top\nobjectClass: groupOfNames\nentryUUID: {}\ncn: {}\n",
                group_dn(&g.cn),
                g.uuid,
                g.cn
            ));
            for m in &g.users {
                s.push_str(&format!("member: {}\n", user_dn(m)));
            }
            for m in &g.groups {
                s.push_str(&format!("member: {}\n", group_dn(m)));
            }
            s.push('\n');
        }
        s
    }

    /// Writes the file as a directory export would appear: whole, by rename.
    fn write(&self, path: &Path) {
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, self.to_ldif()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

const RULES: &str = r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["externalId"]]
deprovision = { action = "delete" }

[rule.scope]
family = "connect-sync"
groups = [[ { attribute = "department", operator = "NOTEQUAL", value = "Service Accounts" } ]]

[[rule.flow]]
target = "externalId"
expression = '[entryUUID]'

[[rule.flow]]
target = "userName"
expression = '[uid]'

[[rule.flow]]
target = "displayName"
expression = 'Join(" ", [givenName], [sn])'

[[rule.flow]]
target = "name.familyName"
expression = '[sn]'

[[rule.flow]]
target = "department"
expression = '[department]'

[[rule.flow]]
target = "active"
expression = 'True'

[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["externalId"]]
deprovision = { action = "delete" }

[[rule.flow]]
target = "externalId"
expression = '[entryUUID]'

[[rule.flow]]
target = "displayName"
expression = '[cn]'

[[rule.flow]]
target = "members"
expression = '[member]'
reference = true
"#;

const CONFIG: &str = r#"
rules = "rules.toml"
state = "state.sqlite"

[source]
type = "ldif"
path = "source.ldif"

[target]
type = "ldif"
path = "target.ldif"
object_type_map = { appUser = "User", appGroup = "Group" }
reference_attributes = ["members"]

[target.object_types.User]
rdn_attribute = "userName"
parent = "ou=Users,o=app"
object_classes = ["top", "appUser"]

[target.object_types.Group]
rdn_attribute = "displayName"
parent = "ou=Groups,o=app"
object_classes = ["top", "appGroup"]

[guard]
max_ratio = 0.5

[engine]
concurrency = 1
import_batch = 25
seed = 7
"#;

/// The last stage named by the `--progress` lines of a run's stderr.
fn last_stage(stderr: &str) -> &'static str {
    let last = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("progress "))
        .filter_map(|l| l.split(' ').next())
        .next_back();
    match last {
        None => "startup/import",
        Some("Import") => "import/plan",
        Some("Plan") => "plan/export",
        Some("Export") => "export",
        Some("Recover") => "recover",
        Some(_) => "other",
    }
}

struct Sync<'a> {
    exe: &'a Path,
    dir: &'a Path,
}

impl Sync<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.exe);
        c.arg("--config")
            .arg(self.dir.join("sync.toml"))
            .args(args)
            .current_dir(self.dir);
        c
    }

    /// Runs to completion; returns the exit code and stdout.
    fn complete(&self, args: &[&str]) -> (i32, String) {
        let out = self.command(args).output().expect("spawn sync");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("$ sync {}\n{stdout}{stderr}", args.join(" "));
        (out.status.code().unwrap_or(-1), stdout)
    }
}

/// The target file's objects of one class: externalId → attributes (lower-cased names).
fn target_objects(text: &str, class: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let records = parse_str(text).expect("the target file parses");
    let mut out = BTreeMap::new();
    let mut external_ids = Vec::new();
    for r in records {
        let LdifBody::Content(values) = &r.body else {
            panic!("a change record in the target file");
        };
        let mut attrs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in values {
            attrs
                .entry(v.attribute.as_str().to_ascii_lowercase())
                .or_default()
                .push(v.value.to_text());
        }
        attrs
            .entry("dn".into())
            .or_default()
            .push(r.dn.normalized().to_string());
        let is_class = attrs
            .get("objectclass")
            .is_some_and(|c| c.iter().any(|c| c.eq_ignore_ascii_case(class)));
        if !is_class {
            continue;
        }
        let ext = attrs
            .get("externalid")
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_else(|| panic!("{} has no externalId", r.dn));
        external_ids.push(ext.clone());
        assert!(
            out.insert(ext.clone(), attrs).is_none(),
            "two {class} objects with externalId {ext}"
        );
    }
    out
}

fn check_target(dir: &Path, d: &Directory) {
    let text = std::fs::read_to_string(dir.join("target.ldif")).expect("the target file exists");
    let users = target_objects(&text, "appUser");
    let groups = target_objects(&text, "appGroup");
    let expected: BTreeMap<&str, &User> = d.in_scope().map(|u| (u.uuid.as_str(), u)).collect();
    let got: BTreeSet<&str> = users.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = expected.keys().copied().collect();
    assert_eq!(
        got.difference(&want).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "users in the target that should not be"
    );
    assert_eq!(
        want.difference(&got).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "in-scope users missing from the target"
    );
    let dn_of_uid: BTreeMap<String, String> = users
        .values()
        .map(|a| (a["username"][0].clone(), a["dn"][0].clone()))
        .collect();
    for (ext, attrs) in &users {
        let u = expected[ext.as_str()];
        assert_eq!(attrs["username"], vec![u.uid.clone()], "{ext}");
        assert_eq!(
            attrs["displayname"],
            vec![format!("{} {}", u.given, u.sn)],
            "{ext}"
        );
        assert_eq!(attrs["department"], vec![u.department.clone()], "{ext}");
    }
    assert_eq!(groups.len(), d.groups.len(), "groups in the target");
    let dn_of_group: BTreeMap<String, String> = groups
        .values()
        .map(|a| (a["displayname"][0].clone(), a["dn"][0].clone()))
        .collect();
    for g in &d.groups {
        let attrs = groups
            .get(&g.uuid)
            .unwrap_or_else(|| panic!("group {} missing", g.cn));
        assert_eq!(attrs["displayname"], vec![g.cn.clone()]);
        let want: BTreeSet<String> = g
            .users
            .iter()
            .map(|uid| dn_of_uid[uid].clone())
            .chain(g.groups.iter().map(|cn| dn_of_group[cn].clone()))
            .collect();
        let got: BTreeSet<String> = attrs
            .get("members")
            .map(|m| {
                m.iter()
                    .map(|dn| {
                        dirsync::model::Dn::parse(dn)
                            .expect("member DN")
                            .normalized()
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(got, want, "members of {}", g.cn);
    }
}

#[test]
fn killed_runs_converge_without_duplicates_or_losses() {
    let started = Instant::now();
    let exe = build_sync();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    std::fs::write(dir.join("sync.toml"), CONFIG).unwrap();
    let mut rng = Rng(0x5eed_c0de);
    let mut d = Directory::new(250, 16, &mut rng);
    d.write(&dir.join("source.ldif"));
    let sync = Sync { exe: &exe, dir };

    const ROUNDS: usize = 60;
    // How long an uninterrupted run takes; delays are drawn as shares of it (so kills land
    // inside runs on fast and slow machines alike), updated from runs that finish on their own.
    let mut estimate = Duration::from_millis(1500);
    let mut stages: BTreeMap<&str, usize> = BTreeMap::new();
    let mut finished = 0;
    for round in 0..ROUNDS {
        if round % 3 == 2 {
            let what = d.edit(&mut rng);
            d.write(&dir.join("source.ldif"));
            eprintln!("round {round}: source edited: {what}");
        }
        // A third of the kills early (start-up, import, planning), the rest anywhere up to a
        // little past the expected end.
        let share = if rng.below(3) == 0 {
            rng.unit() * 0.25
        } else {
            rng.unit() * 1.1
        };
        let delay = estimate.mul_f64(share).max(Duration::from_millis(5));
        let stderr_path = dir.join("stderr.txt");
        let mut child = sync
            .command(&["--progress", "run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn sync");
        let t0 = Instant::now();
        let mut exited = None;
        while t0.elapsed() < delay {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let outcome = match exited {
            Some(status) => {
                finished += 1;
                let took = t0.elapsed();
                estimate = (estimate + took.max(Duration::from_millis(100))) / 2;
                let code = status.code().unwrap_or(-1);
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                assert!(
                    code == 0,
                    "round {round}: an uninterrupted run failed ({code}):\n{err}"
                );
                format!("finished on its own in {took:.0?}")
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let stage = last_stage(&err);
                *stages.entry(stage).or_default() += 1;
                format!("killed after {delay:.0?} (last progress: {stage})")
            }
        };
        eprintln!("round {round}: delay {delay:.0?} (share {share:.2}): {outcome}");
    }
    eprintln!(
        "kills by last progress stage: {stages:?}; {finished} of {ROUNDS} runs finished before their kill"
    );

    // Run to completion: the first run resolves what the kills left unconfirmed.
    let (code, out) = sync.complete(&["run"]);
    assert_eq!(code, 0, "the run after the kills failed:\n{out}");
    let (code, out) = sync.complete(&["run"]);
    assert_eq!(code, 0, "the second run failed:\n{out}");
    check_target(dir, &d);
    let (code, out) = sync.complete(&["plan", "--full"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("nothing to do"),
        "a full plan after convergence should be empty:\n{out}"
    );
    let (code, out) = sync.complete(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("pending (dirty) objects: 0"), "{out}");
    assert!(out.contains("escrow:\n  (empty)"), "{out}");
    eprintln!("crash test took {:.1?}", started.elapsed());
}
