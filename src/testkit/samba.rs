//! Samba as an Active Directory domain controller for tests: a network namespace per test, a
//! provisioned domain cached across tests and processes, one DC started per test from a copy of
//! it, and helpers to load and change directory data.
//!
//! Samba's LDAP ports are fixed (389, 636, 3268, 3269), so each DC runs with the test that talks
//! to it inside a network namespace of its own: [`in_own_netns`] re-executes the current test
//! there (with `unshare -n`, no unsafe code). The domain is `contoso.test` (`DC=contoso,DC=test`),
//! provisioned once by [`template`] into a cache dir guarded by a lock file; [`SambaDc::start`]
//! copies it into the caller's dir, writes an `smb.conf` with LDAP and CLDAP only and TLS with a
//! [`TestCa`] certificate, and runs `samba` in the foreground.
//!
//! Which write path does what (measured on Samba 4.17): `ldbadd`, `ldbmodify`, `ldbdel` and
//! `ldbrename` on `private/sam.ldb` go through Samba's own module stack, so they work while the DC
//! runs, assign real USNs (`uSNCreated`, `uSNChanged`, `highestCommittedUSN`), make tombstones
//! with `lastKnownParent` and are seen by DirSync — they are the fast path for loading data. The
//! `ldapmodify` helpers go through the LDAP server over LDAPS with the Administrator's simple bind,
//! exactly as a client's changes would. This module may do file and process I/O; it is test
//! support and holds no connector logic.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use super::servers::{find_binary, port_open, run, ServerProcess, TestCa, REQUIRE_SERVERS_ENV};

/// The environment variable that marks a process as already inside its own network namespace
/// (set by [`in_own_netns`] on the re-executed test; its value is the test name).
pub const NETNS_ENV: &str = "DIRSYNC_TEST_IN_NETNS";

/// The realm provisioned.
pub const REALM: &str = "CONTOSO.TEST";
/// The NetBIOS domain name.
pub const DOMAIN: &str = "CONTOSO";
/// The DC's host name; its certificate also names `dc1.contoso.test`.
pub const HOST_NAME: &str = "dc1";
/// The domain's base DN.
pub const BASE_DN: &str = "DC=contoso,DC=test";
/// The Administrator's DN.
pub const ADMIN_DN: &str = "CN=Administrator,CN=Users,DC=contoso,DC=test";
/// The Administrator's password (meets AD's complexity rules).
pub const ADMIN_PASSWORD: &str = "Dirsync-Test-Passw0rd!";
/// The OU that [`users_ldif`] puts users in.
pub const PEOPLE_OU: &str = "OU=People,DC=contoso,DC=test";
/// The OU that [`group_ldif`] puts groups in.
pub const GROUPS_OU: &str = "OU=Groups,DC=contoso,DC=test";

/// The tools a Samba test needs.
const TOOLS: [&str; 7] = [
    "samba",
    "samba-tool",
    "ldbadd",
    "ldapsearch",
    "ldapmodify",
    "unshare",
    "ip",
];

/// Why Samba tests cannot run here: `Ok(Some(reason))` when a tool is missing (the caller prints
/// the reason and skips), `Ok(None)` when everything is installed, an error when a tool is
/// missing but [`REQUIRE_SERVERS_ENV`] is set.
pub fn skip_reason() -> io::Result<Option<String>> {
    let mut missing = Vec::new();
    for tool in TOOLS {
        if find_binary(tool)?.is_none() {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        Ok(None)
    } else {
        Ok(Some(format!(
            "skipped: {} not installed (packages samba, ldb-tools, ldap-utils, iproute2; set {REQUIRE_SERVERS_ENV} to make this an error)",
            missing.join(", ")
        )))
    }
}

/// Runs the calling test inside a network namespace of its own.
///
/// Call it at the top of a test with the test's full libtest name (its module path within the
/// test binary, e.g. `dirsync::loads_users` → `loads_users` in an integration test at the crate
/// root, `connector::ldap::tests::x` in the library). Outside the namespace it re-executes the
/// current test binary as `unshare -n sh -c 'ip link set lo up && exec "$@"' <bin> --exact <name>
/// --nocapture` with [`NETNS_ENV`] set, prints the child's output, and returns `Ok(false)` when the
/// test passed there (the caller returns at once) or an error carrying the output when it failed.
/// Inside it returns `Ok(true)`: go on with the test. Works under `cargo test` and `cargo nextest`.
pub fn in_own_netns(test_name: &str) -> io::Result<bool> {
    if std::env::var_os(NETNS_ENV).is_some() {
        return Ok(true);
    }
    let exe = std::env::current_exe()?;
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$@\"", "sh"])
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, test_name)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run unshare: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{test_name} failed in its network namespace ({}):\n{stdout}\n{stderr}",
            out.status
        )));
    }
    // libtest succeeds when `--exact` matches nothing: make sure the test really ran.
    if !stdout.contains(&format!("test {test_name} ... ok")) {
        return Err(io::Error::other(format!(
            "{test_name} did not run in its network namespace: pass the test's full libtest name \
             (module path within the test binary, as `cargo test -- --list` prints it):\n{stdout}\n{stderr}"
        )));
    }
    Ok(false)
}

/// The installed Samba version (`4.17.12-Debian`), from `samba --version`.
pub fn version() -> io::Result<String> {
    let out = Command::new("samba")
        .arg("--version")
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.trim().trim_start_matches("Version").trim();
    if !out.status.success() || v.is_empty() {
        return Err(io::Error::other(format!(
            "`samba --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(v.to_string())
}

/// The provisioned domain to copy, provisioning it first if needed.
///
/// It lives in `cache_root` (default: the system temp dir) as `dirsync-samba-template-<version>`.
/// A lock file (`….lock`, created exclusively; a lock older than 10 minutes is taken as stale)
/// makes parallel test processes provision once; provisioning goes to a scratch dir renamed
/// into place at the end, so a template that exists is complete.
pub fn template(cache_root: Option<&Path>) -> io::Result<PathBuf> {
    let root = cache_root.map_or_else(std::env::temp_dir, Path::to_path_buf);
    std::fs::create_dir_all(&root)?;
    let name = format!(
        "dirsync-samba-template-{}",
        version()?.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "_")
    );
    let dir = root.join(&name);
    if is_template(&dir) {
        return Ok(dir);
    }
    let lock = root.join(format!("{name}.lock"));
    let _guard = LockFile::acquire(&lock, Duration::from_secs(300))?;
    if is_template(&dir) {
        return Ok(dir);
    }
    let scratch = root.join(format!("{name}.tmp-{}", std::process::id()));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    run(Command::new("samba-tool")
        .args(["domain", "provision"])
        .arg(format!("--realm={REALM}"))
        .arg(format!("--domain={DOMAIN}"))
        .args(["--server-role=dc", "--dns-backend=NONE"])
        .arg(format!("--adminpass={ADMIN_PASSWORD}"))
        .arg(format!("--host-name={HOST_NAME}"))
        .arg("--option=interfaces=lo")
        .arg("--option=bind interfaces only=yes")
        .arg(format!("--targetdir={}", scratch.display())))
    .map_err(|e| io::Error::other(format!("provisioning the Samba template failed: {e}")))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&scratch, &dir)?;
    Ok(dir)
}

fn is_template(dir: &Path) -> bool {
    dir.join("etc/smb.conf").is_file() && dir.join("private/sam.ldb").is_file()
}

/// An exclusive lock held while it lives (a file created with `create_new`, removed on drop).
#[derive(Debug)]
struct LockFile(PathBuf);

impl LockFile {
    fn acquire(path: &Path, timeout: Duration) -> io::Result<LockFile> {
        let mut waited = Duration::ZERO;
        let step = Duration::from_millis(100);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => return Ok(LockFile(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age > Duration::from_secs(600));
                    if stale {
                        let _ = std::fs::remove_file(path);
                        continue;
                    }
                    if waited >= timeout {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "lock {} still held after {timeout:?}; remove it if no test runs",
                                path.display()
                            ),
                        ));
                    }
                    std::thread::sleep(step);
                    waited += step;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot create lock {}: {e}", path.display()),
                    ))
                }
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running Samba AD DC on 127.0.0.1:389/636 of the current network namespace; stopped when
/// dropped. Its files live in the dir given to [`SambaDc::start`], which the caller owns.
#[derive(Debug)]
pub struct SambaDc {
    dir: PathBuf,
    conf: PathBuf,
    ca: TestCa,
    log: PathBuf,
    process: ServerProcess,
}

impl SambaDc {
    /// Starts a DC from a copy of the [`template`] (cached under the system temp dir) in `dir`.
    pub fn start(dir: &Path) -> io::Result<SambaDc> {
        SambaDc::start_with_cache(dir, None)
    }

    /// Starts a DC from a copy of the [`template`] cached under `cache_root`, in `dir`.
    ///
    /// Fails if something already listens on 389 or 636 here: one DC per network namespace
    /// (see [`in_own_netns`]).
    pub fn start_with_cache(dir: &Path, cache_root: Option<&Path>) -> io::Result<SambaDc> {
        if port_open(636) || port_open(389) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "127.0.0.1:389 or :636 is already in use: Samba's ports are fixed, run each DC \
                 in its own network namespace (samba::in_own_netns)",
            ));
        }
        let template = template(cache_root)?;
        std::fs::create_dir_all(dir)?;
        let dc = dir.join("dc");
        if dc.exists() {
            std::fs::remove_dir_all(&dc)?;
        }
        run(Command::new("cp").arg("-a").arg(&template).arg(&dc))?;
        for sub in ["run", "log"] {
            std::fs::create_dir_all(dc.join(sub))?;
        }
        let ca = TestCa::generate(&dir.join("ca"), &["dc1.contoso.test"])?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Samba refuses a private key others can read.
            std::fs::set_permissions(&ca.key, std::fs::Permissions::from_mode(0o600))?;
        }
        let conf = dc.join("etc/smb.conf");
        let text = std::fs::read_to_string(&conf)?;
        std::fs::write(&conf, dc_conf(&text, &dc, &ca)?)?;
        let log = dir.join("samba.log");
        let mut process = ServerProcess::spawn(
            "samba",
            Command::new("samba")
                .arg("-s")
                .arg(&conf)
                .args(["-i", "-M", "single"]),
            &log,
        )?;
        let ca_file = ca.ca_cert.clone();
        process.wait_ready(Duration::from_secs(60), &log, || {
            port_open(636)
                && Command::new("ldapsearch")
                    .args(["-x", "-LLL", "-H", "ldaps://127.0.0.1", "-b", "", "-s"])
                    .args(["base", "dn"])
                    .env("LDAPTLS_CACERT", &ca_file)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        })?;
        Ok(SambaDc {
            dir: dc,
            conf,
            ca,
            log,
            process,
        })
    }

    /// `ldaps://127.0.0.1:636`.
    pub fn ldaps_url(&self) -> &'static str {
        "ldaps://127.0.0.1:636"
    }

    /// `ldap://127.0.0.1:389` (simple binds are refused here: strong auth is required).
    pub fn ldap_url(&self) -> &'static str {
        "ldap://127.0.0.1:389"
    }

    /// The CA certificate (PEM) clients must trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca.ca_cert
    }

    /// The domain's base DN, [`BASE_DN`].
    pub fn base_dn(&self) -> &'static str {
        BASE_DN
    }

    /// The Administrator's DN, [`ADMIN_DN`].
    pub fn admin_dn(&self) -> &'static str {
        ADMIN_DN
    }

    /// The Administrator's password, [`ADMIN_PASSWORD`].
    pub fn admin_password(&self) -> &'static str {
        ADMIN_PASSWORD
    }

    /// The DC's dir (the template copy).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The DC's `smb.conf`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The DC's log (its stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The `samba` process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The SAM database: `<dir>/private/sam.ldb`.
    pub fn sam_ldb(&self) -> PathBuf {
        self.dir.join("private/sam.ldb")
    }

    /// Adds entries with `ldbadd` straight into the SAM database (fast: ~2 s per 1,000 users
    /// without passwords; works while the DC runs; USNs and DirSync see the adds).
    pub fn ldbadd(&self, ldif: &str) -> io::Result<()> {
        self.ldb_tool("ldbadd", ldif)
    }

    /// Applies an LDIF of changes (`changetype: modify` records) with `ldbmodify` straight into
    /// the SAM database; `uSNChanged` is bumped and DirSync reports the changes.
    pub fn ldbmodify(&self, ldif: &str) -> io::Result<()> {
        self.ldb_tool("ldbmodify", ldif)
    }

    fn ldb_tool(&self, tool: &str, ldif: &str) -> io::Result<()> {
        let file = self.scratch_file(tool, ldif)?;
        let result = run(Command::new(tool).arg("-H").arg(self.sam_ldb()).arg(&file));
        let _ = std::fs::remove_file(&file);
        result
    }

    /// Applies an LDIF of changes (adds, modifies, modrdn/moves, deletes) through the LDAP
    /// server with `ldapmodify` over LDAPS as Administrator: what a client's change does.
    pub fn ldapmodify(&self, ldif: &str) -> io::Result<()> {
        let file = self.scratch_file("ldapmodify", ldif)?;
        let result = run(Command::new("ldapmodify")
            .args(self.ldap_auth_args())
            .arg("-f")
            .arg(&file)
            .env("LDAPTLS_CACERT", self.ca_file()));
        let _ = std::fs::remove_file(&file);
        result
    }

    /// Renames or moves an entry through the LDAP server: `new_rdn` (`CN=x`) under
    /// `new_parent` (or the same parent when `None`).
    pub fn ldap_rename(&self, dn: &str, new_rdn: &str, new_parent: Option<&str>) -> io::Result<()> {
        let mut ldif =
            format!("dn: {dn}\nchangetype: modrdn\nnewrdn: {new_rdn}\ndeleteoldrdn: 1\n");
        if let Some(p) = new_parent {
            let _ = writeln!(ldif, "newsuperior: {p}");
        }
        self.ldapmodify(&ldif)
    }

    /// Deletes an entry through the LDAP server (it becomes a tombstone under
    /// `CN=Deleted Objects` with `isDeleted: TRUE` and `lastKnownParent`).
    pub fn ldap_delete(&self, dn: &str) -> io::Result<()> {
        self.ldapmodify(&format!("dn: {dn}\nchangetype: delete\n"))
    }

    /// Runs `ldapsearch` over LDAPS as Administrator with `args` appended (base, scope, filter,
    /// attributes, `-E` controls…) and LDIF lines unwrapped; returns its stdout.
    pub fn ldapsearch(&self, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("ldapsearch");
        cmd.args(self.ldap_auth_args())
            .args(["-o", "ldif-wrap=no"])
            .args(args)
            .env("LDAPTLS_CACERT", self.ca_file())
            .stdin(Stdio::null());
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8(out.stdout)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// The root DSE's `highestCommittedUSN`.
    pub fn highest_committed_usn(&self) -> io::Result<u64> {
        let text = self.ldapsearch(&["-LLL", "-b", "", "-s", "base", "highestCommittedUSN"])?;
        text.lines()
            .find_map(|l| l.strip_prefix("highestCommittedUSN: "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("no highestCommittedUSN in: {text}")))
    }

    fn ldap_auth_args(&self) -> [&str; 7] {
        [
            "-x",
            "-H",
            "ldaps://127.0.0.1:636",
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PASSWORD,
        ]
    }

    fn scratch_file(&self, tool: &str, content: &str) -> io::Result<PathBuf> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let file = self.dir.join(format!("{tool}-{nanos}.ldif"));
        std::fs::write(&file, content)?;
        Ok(file)
    }
}

/// The DC's `smb.conf` from the template's: the template's `[global]` settings with its
/// directory rewritten to `dc`, every run-time path under `dc`, only the LDAP and CLDAP services,
/// and TLS with `ca`'s certificate. Shares are dropped. `ldap server require strong auth` keeps
/// its default (simple binds need TLS).
fn dc_conf(template: &str, dc: &Path, ca: &TestCa) -> io::Result<String> {
    let key_of = |line: &str| {
        line.split_once('=')
            .map(|(k, _)| k.trim().to_ascii_lowercase())
    };
    let old_root = template
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("private dir")).then(|| v.trim())
        })
        .next()
        .and_then(|p| p.strip_suffix("/private"))
        .ok_or_else(|| io::Error::other("the template's smb.conf has no `private dir`"))?;
    let d = dc.display();
    let overrides: Vec<(&str, String)> = vec![
        ("server services", "ldap, cldap".into()),
        ("interfaces", "lo".into()),
        ("bind interfaces only", "yes".into()),
        ("pid directory", format!("{d}/run")),
        ("ncalrpc dir", format!("{d}/run/ncalrpc")),
        ("winbindd socket directory", format!("{d}/run/winbindd")),
        ("ntp signd socket directory", format!("{d}/run/ntp_signd")),
        ("log file", format!("{d}/log/log.%m")),
        ("tls enabled", "yes".into()),
        ("tls keyfile", ca.key.display().to_string()),
        ("tls certfile", ca.cert.display().to_string()),
        ("tls cafile", ca.ca_cert.display().to_string()),
    ];
    let mut out = String::from("[global]\n");
    let mut in_global = false;
    for line in template.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_global = t.eq_ignore_ascii_case("[global]");
            continue;
        }
        if !in_global || t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(k) = key_of(t) {
            if overrides.iter().any(|(o, _)| *o == k) {
                continue;
            }
        }
        let _ = writeln!(out, "\t{}", t.replace(old_root, &d.to_string()));
    }
    for (k, v) in overrides {
        let _ = writeln!(out, "\t{k} = {v}");
    }
    Ok(out)
}

/// The given names the generators cycle through.
const GIVEN: [&str; 8] = [
    "Ada",
    "Grace",
    "Alan",
    "Katherine",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
];
/// The surnames the generators cycle through.
const SURNAMES: [&str; 7] = [
    "Lovelace", "Hopper", "Turing", "Johnson", "Dijkstra", "Liskov", "Knuth",
];
/// The departments the generators cycle through.
const DEPARTMENTS: [&str; 5] = ["Engineering", "Sales", "Finance", "Support", "Legal"];

/// The LDIF adding [`PEOPLE_OU`] and [`GROUPS_OU`].
pub fn ous_ldif() -> String {
    format!(
        "dn: {PEOPLE_OU}\nobjectClass: organizationalUnit\nou: People\n\n\
         dn: {GROUPS_OU}\nobjectClass: organizationalUnit\nou: Groups\n\n"
    )
}

/// The `sAMAccountName` of generated user `i` (`user000042`).
pub fn user_sam(i: usize) -> String {
    format!("user{i:06}")
}

/// The DN of generated user `i` (`CN=User 000042,OU=People,DC=contoso,DC=test`).
pub fn user_dn(i: usize) -> String {
    format!("CN=User {i:06},{PEOPLE_OU}")
}

/// The LDIF adding generated users `range` (objectClass `user`, no password) in [`PEOPLE_OU`]:
/// sAMAccountName, userPrincipalName, givenName, sn, displayName, mail, department, title,
/// employeeID, telephoneNumber.
pub fn users_ldif(range: std::ops::Range<usize>) -> String {
    let mut out = String::with_capacity(range.len() * 420);
    for i in range {
        let given = GIVEN[i % GIVEN.len()];
        let sn = SURNAMES[i % SURNAMES.len()];
        let sam = user_sam(i);
        let _ = write!(
            out,
            "dn: {dn}\nobjectClass: user\nsAMAccountName: {sam}\n\
             userPrincipalName: {sam}@contoso.test\ngivenName: {given}\nsn: {sn}\n\
             displayName: {given} {sn} {i}\nmail: {sam}@contoso.test\ndepartment: {dept}\n\
             title: Engineer\nemployeeID: {i:06}\ntelephoneNumber: +1 425 555 {tel:04}\n\n",
            dn = user_dn(i),
            dept = DEPARTMENTS[i % DEPARTMENTS.len()],
            tel = i % 10_000,
        );
    }
    out
}

/// The DN of the group named `name` in [`GROUPS_OU`].
pub fn group_dn(name: &str) -> String {
    format!("CN={name},{GROUPS_OU}")
}

/// The LDIF adding a global security group `name` in [`GROUPS_OU`] whose members are the
/// generated users `members` (they must exist first).
pub fn group_ldif(name: &str, members: std::ops::Range<usize>) -> String {
    let mut out = String::with_capacity(members.len() * 48 + 128);
    let _ = write!(
        out,
        "dn: {}\nobjectClass: group\nsAMAccountName: {name}\ndescription: generated group\n",
        group_dn(name)
    );
    for i in members {
        let _ = writeln!(out, "member: {}", user_dn(i));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dc_conf_rewrites_paths_and_sets_services_and_tls() {
        let template = "# Global parameters\n[global]\n\tbinddns dir = /tmp/t.tmp-1/bind-dns\n\
            \tlock directory = /tmp/t.tmp-1\n\tprivate dir = /tmp/t.tmp-1/private\n\
            \trealm = CONTOSO.TEST\n\tserver services = s3fs, rpc, nbt, ldap\n\
            \tlog file = /var/log/samba/log.%m\n\n[sysvol]\n\tpath = /tmp/t.tmp-1/state/sysvol\n";
        let ca = TestCa {
            ca_cert: "/x/ca/ca.pem".into(),
            cert: "/x/ca/server.pem".into(),
            key: "/x/ca/server.key".into(),
        };
        let conf = dc_conf(template, Path::new("/x/dc"), &ca).unwrap();
        assert!(conf.contains("binddns dir = /x/dc/bind-dns"), "{conf}");
        assert!(conf.contains("lock directory = /x/dc\n"), "{conf}");
        assert!(conf.contains("private dir = /x/dc/private"), "{conf}");
        assert!(conf.contains("realm = CONTOSO.TEST"), "{conf}");
        assert!(conf.contains("server services = ldap, cldap"), "{conf}");
        assert!(!conf.contains("s3fs"), "{conf}");
        assert!(conf.contains("log file = /x/dc/log/log.%m"), "{conf}");
        assert!(conf.contains("pid directory = /x/dc/run"), "{conf}");
        assert!(conf.contains("tls keyfile = /x/ca/server.key"), "{conf}");
        assert!(!conf.contains("sysvol"), "{conf}");
        assert!(!conf.contains("/tmp/t.tmp-1"), "{conf}");
        assert!(!conf.contains("strong auth"), "{conf}");
        assert!(dc_conf("[global]\n", Path::new("/x"), &ca).is_err());
    }

    #[test]
    fn generators_make_ldif_records() {
        let users = users_ldif(3..5);
        assert_eq!(users.matches("objectClass: user\n").count(), 2);
        assert!(users.contains("dn: CN=User 000003,OU=People,DC=contoso,DC=test\n"));
        assert!(users.contains("sAMAccountName: user000004\n"));
        assert!(users.contains("userPrincipalName: user000004@contoso.test\n"));
        assert!(users.ends_with("\n\n"));
        let group = group_ldif("Big", 0..3);
        assert!(group.starts_with("dn: CN=Big,OU=Groups,DC=contoso,DC=test\n"));
        assert_eq!(group.matches("member: ").count(), 3);
        assert!(group.contains("member: CN=User 000002,OU=People,DC=contoso,DC=test\n"));
        assert!(ous_ldif().contains("dn: OU=Groups,DC=contoso,DC=test\n"));
    }

    #[test]
    fn lock_file_is_exclusive_and_released() {
        let dir = std::env::temp_dir().join(format!("dirsync-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lock");
        let held = LockFile::acquire(&path, Duration::from_secs(1)).unwrap();
        let e = LockFile::acquire(&path, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(held);
        assert!(!path.exists());
        drop(LockFile::acquire(&path, Duration::from_millis(200)).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
