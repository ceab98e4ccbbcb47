//! [`Slapd`]: an OpenLDAP server for tests, started from a generated `slapd.conf` in a temp dir
//! on free ports of 127.0.0.1 (plain and TLS), with the mdb backend and the `syncprov` overlay,
//! and stopped when dropped; plus deterministic LDIF generators for users and groups.
//!
//! It runs the `slapd`, `slapadd`, `ldapadd` and `ldapmodify` programs; it never touches a
//! system slapd, its configuration or its ports.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::servers::{find_binary, free_port, port_open, run, ServerProcess, TestCa};

/// Options for [`Slapd::start`].
#[derive(Debug, Clone)]
pub struct SlapdOptions {
    /// The suffix (default `dc=example,dc=test`).
    pub suffix: String,
    /// The root password (default `secret`).
    pub root_password: String,
    /// LDIF loaded with `slapadd -q` before the server starts (the suffix entry is added
    /// first, so this holds what goes below it).
    pub ldif: Option<String>,
    /// Extra `slapd.conf` lines for the database section (after the defaults).
    pub extra_database_config: String,
}

impl Default for SlapdOptions {
    fn default() -> Self {
        SlapdOptions {
            suffix: "dc=example,dc=test".to_owned(),
            root_password: "secret".to_owned(),
            ldif: None,
            extra_database_config: String::new(),
        }
    }
}

/// A running slapd. Dropping it kills the server; the temp dir goes with it.
#[derive(Debug)]
pub struct Slapd {
    dir: TempDir,
    slapd: PathBuf,
    ca: TestCa,
    opts: SlapdOptions,
    port: u16,
    tls_port: u16,
    process: Option<ServerProcess>,
}

const MODULE_DIR: &str = "/usr/lib/ldap";
const SCHEMA_DIR: &str = "/etc/ldap/schema";

impl Slapd {
    /// Starts a server. `Ok(None)` when slapd is not installed and
    /// [`REQUIRE_SERVERS_ENV`](super::servers::REQUIRE_SERVERS_ENV) is unset (the caller skips
    /// its test and says why).
    pub fn start(opts: SlapdOptions) -> io::Result<Option<Slapd>> {
        let Some(slapd) = find_binary("slapd")? else {
            return Ok(None);
        };
        let dir = TempDir::new()?;
        let ca = TestCa::generate(&dir.path().join("tls"), &[])?;
        let mut s = Slapd {
            dir,
            slapd,
            ca,
            opts,
            port: free_port()?,
            tls_port: free_port()?,
            process: None,
        };
        std::fs::create_dir_all(s.dir.path().join("db"))?;
        std::fs::write(s.conf_path(), s.config_text())?;
        let mut base = s.suffix_ldif();
        // Taken, not kept: a bulk load can be large, and the server holds it from now on.
        if let Some(extra) = s.opts.ldif.take() {
            base.push('\n');
            base.push_str(&extra);
        }
        s.slapadd(&base)?;
        s.launch()?;
        Ok(Some(s))
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("slapd.conf")
    }

    fn config_text(&self) -> String {
        let mut c = String::new();
        for schema in ["core", "cosine", "inetorgperson", "nis"] {
            let _ = writeln!(c, "include {SCHEMA_DIR}/{schema}.schema");
        }
        let d = self.dir.path();
        let _ = write!(
            c,
            "pidfile {pid}\nargsfile {args}\nmodulepath {MODULE_DIR}\nmoduleload back_mdb\n\
             moduleload syncprov\n\
             TLSCACertificateFile {ca}\nTLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\n\
             sizelimit unlimited\n\
             database mdb\nmaxsize 1073741824\nsuffix \"{suffix}\"\nrootdn \"{rootdn}\"\n\
             rootpw {pw}\ndirectory {db}\ndbnosync\n\
             index objectClass eq\nindex entryUUID eq\nindex entryCSN eq\n\
             access to * by * read\n\
             overlay syncprov\nsyncprov-checkpoint 100 10\nsyncprov-sessionlog 10000\n{extra}\n",
            pid = d.join("slapd.pid").display(),
            args = d.join("slapd.args").display(),
            ca = self.ca.ca_cert.display(),
            cert = self.ca.cert.display(),
            key = self.ca.key.display(),
            suffix = self.opts.suffix,
            rootdn = self.root_dn(),
            pw = self.opts.root_password,
            db = d.join("db").display(),
            extra = self.opts.extra_database_config,
        );
        c
    }

    fn suffix_ldif(&self) -> String {
        let first = self
            .opts
            .suffix
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        let (attr, value) = first.split_once('=').unwrap_or(("dc", "example"));
        let class = if attr.eq_ignore_ascii_case("dc") {
            "dcObject\nobjectClass: organization\no: test"
        } else {
            "organization"
        };
        format!(
            "dn: {}\nobjectClass: {class}\n{attr}: {value}\n",
            self.opts.suffix
        )
    }

    fn slapadd(&self, ldif: &str) -> io::Result<()> {
        let path = self.dir.path().join("load.ldif");
        std::fs::write(&path, ldif)?;
        let slapadd = self.slapd.with_file_name("slapadd");
        let slapadd = if slapadd.is_file() {
            slapadd
        } else {
            find_binary("slapadd")?.ok_or_else(|| io::Error::other("slapadd is not installed"))?
        };
        run(Command::new(slapadd)
            .arg("-q")
            .arg("-f")
            .arg(self.conf_path())
            .arg("-l")
            .arg(&path))
    }

    fn launch(&mut self) -> io::Result<()> {
        let log = self.dir.path().join("slapd.log");
        let urls = format!("{} {} {}", self.url(), self.ldaps_url(), self.ldapi_url());
        let mut p = ServerProcess::spawn(
            "slapd",
            Command::new(&self.slapd)
                .arg("-f")
                .arg(self.conf_path())
                .arg("-h")
                .arg(urls)
                .args(["-d", "0"]),
            &log,
        )?;
        let (port, tls_port) = (self.port, self.tls_port);
        p.wait_ready(Duration::from_secs(10), &log, || {
            port_open(port) && port_open(tls_port)
        })?;
        self.process = Some(p);
        Ok(())
    }

    /// Kills the server (as a crash would) and starts it again on the same ports and data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.launch()
    }

    /// Kills the server and waits for it to exit (its ports close).
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Whether the server process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.tls_port)
    }

    /// `ldapi://<socket>`: a Unix socket in the temp dir, where SASL EXTERNAL binds as the
    /// peer's uid and gid.
    pub fn ldapi_url(&self) -> String {
        let path = self.dir.path().join("ldapi").display().to_string();
        format!("ldapi://{}", path.replace('%', "%25").replace('/', "%2F"))
    }

    /// The plain port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS port.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca.ca_cert
    }

    /// The suffix.
    pub fn suffix(&self) -> &str {
        &self.opts.suffix
    }

    /// The root DN, `cn=admin,<suffix>`.
    pub fn root_dn(&self) -> String {
        format!("cn=admin,{}", self.opts.suffix)
    }

    /// The root password.
    pub fn root_password(&self) -> &str {
        &self.opts.root_password
    }

    /// The temp dir holding the configuration, database and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds entries online with `ldapadd` as the root DN.
    pub fn ldapadd(&self, ldif: &str) -> io::Result<()> {
        self.ldap_tool("ldapadd", ldif)
    }

    /// Applies LDIF change records online with `ldapmodify` as the root DN.
    pub fn ldapmodify(&self, ldif: &str) -> io::Result<()> {
        self.ldap_tool("ldapmodify", ldif)
    }

    /// Searches anonymously (`ldapsearch -x -LLL`, lines unwrapped) the subtree of `base` for
    /// `filter`, returning `attrs`: the LDIF text.
    pub fn ldapsearch(&self, base: &str, filter: &str, attrs: &[&str]) -> io::Result<String> {
        let bin = find_binary("ldapsearch")?
            .ok_or_else(|| io::Error::other("ldapsearch is not installed (ldap-utils)"))?;
        let out = Command::new(bin)
            .args([
                "-x",
                "-LLL",
                "-o",
                "ldif-wrap=no",
                "-H",
                &self.url(),
                "-b",
                base,
                filter,
            ])
            .args(attrs)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ldapsearch -b {base} {filter} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ldap_tool(&self, tool: &str, ldif: &str) -> io::Result<()> {
        let bin = find_binary(tool)?
            .ok_or_else(|| io::Error::other(format!("{tool} is not installed (ldap-utils)")))?;
        let mut child = Command::new(bin)
            .args(["-x", "-H", &self.url(), "-D", &self.root_dn(), "-w"])
            .arg(&self.opts.root_password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(ldif.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{tool} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A directory under the system temp dir, removed when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<TempDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "dirsync-slapd-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The DN of generated user `i` under `suffix`.
pub fn user_dn(i: usize, suffix: &str) -> String {
    format!("uid=user{i:06},ou=People,{suffix}")
}

/// Deterministic LDIF: `ou=People` and `ou=Groups` under `suffix`, `users` inetOrgPerson
/// entries (`uid=user000000` …, with cn, sn, givenName, mail, employeeNumber) and `groups`
/// groupOfNames groups (`cn=group0000` …) where group `g` has the users `i` with
/// `i % groups == g` as members — or, for group 0, when `big_group` is set, every user.
pub fn users_and_groups_ldif(suffix: &str, users: usize, groups: usize, big_group: bool) -> String {
    let mut s = String::with_capacity(users * 260 + groups * 64);
    let _ = write!(
        s,
        "dn: ou=People,{suffix}\nobjectClass: organizationalUnit\nou: People\n\n\
         dn: ou=Groups,{suffix}\nobjectClass: organizationalUnit\nou: Groups\n\n"
    );
    for i in 0..users {
        let _ = write!(
            s,
            "dn: {dn}\nobjectClass: inetOrgPerson\nuid: user{i:06}\ncn: User {i:06}\n\
             sn: Number{i}\ngivenName: User\nmail: user{i}@example.test\n\
             employeeNumber: E{i:06}\n\n",
            dn = user_dn(i, suffix)
        );
    }
    for g in 0..groups {
        let _ = write!(
            s,
            "dn: cn=group{g:04},ou=Groups,{suffix}\nobjectClass: groupOfNames\ncn: group{g:04}\n"
        );
        let mut any = false;
        for i in 0..users {
            if (big_group && g == 0) || i % groups == g {
                let _ = writeln!(s, "member: {}", user_dn(i, suffix));
                any = true;
            }
        }
        if !any {
            // groupOfNames requires a member.
            let _ = writeln!(s, "member: {}", user_dn(0, suffix));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ldif_is_deterministic_and_complete() {
        let a = users_and_groups_ldif("dc=example,dc=test", 10, 3, true);
        assert_eq!(a, users_and_groups_ldif("dc=example,dc=test", 10, 3, true));
        assert_eq!(a.matches("objectClass: inetOrgPerson").count(), 10);
        assert_eq!(a.matches("objectClass: groupOfNames").count(), 3);
        // group0 has all 10; group1 has 1,4,7; group2 has 2,5,8.
        assert_eq!(a.matches("member: ").count(), 16);
    }

    #[test]
    fn starts_serves_and_restarts() {
        let Some(mut s) = Slapd::start(SlapdOptions {
            ldif: Some(users_and_groups_ldif("dc=example,dc=test", 3, 1, false)),
            ..SlapdOptions::default()
        })
        .unwrap() else {
            eprintln!("skipped: slapd is not installed");
            return;
        };
        assert!(port_open(s.port()) && port_open(s.tls_port()));
        s.ldapadd("dn: uid=extra,ou=People,dc=example,dc=test\nobjectClass: inetOrgPerson\nuid: extra\ncn: x\nsn: y\n")
            .unwrap();
        s.ldapmodify(
            "dn: uid=extra,ou=People,dc=example,dc=test\nchangetype: modify\nreplace: sn\nsn: z\n",
        )
        .unwrap();
        assert!(s.ldapadd("not ldif").is_err());
        s.restart().unwrap();
        assert!(s.is_running() && port_open(s.port()));
        s.kill();
        assert!(!s.is_running());
    }
}
