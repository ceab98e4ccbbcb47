//! Real servers for tests: free ports, a throwaway certificate authority, and child processes
//! that are stopped when dropped.
//!
//! The LDAP tests of this crate start OpenLDAP `slapd` and Samba (as an Active Directory domain
//! controller) through these pieces; downstream crates may do the same. Everything listens on
//! `127.0.0.1` only and lives in a temp dir owned by the test.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that makes a missing server binary an error instead of a skip.
/// `scripts/test.sh` (the README's test command, run by CI) sets it after installing the servers.
pub const REQUIRE_SERVERS_ENV: &str = "DIRSYNC_REQUIRE_SERVERS";

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Finds a server binary in `PATH`, `/usr/sbin` or `/usr/bin`.
///
/// `Ok(None)` when it is not installed and [`REQUIRE_SERVERS_ENV`] is unset (the caller skips
/// its test and says why); an error when it is missing but required.
pub fn find_binary(name: &str) -> io::Result<Option<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/bin".into());
    if let Some(found) = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Ok(Some(found));
    }
    if std::env::var_os(REQUIRE_SERVERS_ENV).is_some() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name} is not installed but {REQUIRE_SERVERS_ENV} is set (scripts/test.sh installs it)"),
        ));
    }
    Ok(None)
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A throwaway certificate authority and one server certificate it signed, made with the
/// `openssl` command line tool.
///
/// The server certificate is a leaf (`CA:FALSE`) for `127.0.0.1`, `localhost` and any extra
/// names given — rustls refuses a self-signed certificate that is its own CA, so clients are
/// given [`TestCa::ca_cert`] as their trust anchor.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (PEM): what clients trust.
    pub ca_cert: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM, unencrypted).
    pub key: PathBuf,
}

impl TestCa {
    /// Makes a CA and a server certificate in `dir`, valid for `127.0.0.1`, `localhost` and
    /// `extra_names` (DNS names).
    pub fn generate(dir: &Path, extra_names: &[&str]) -> io::Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let ca_key = dir.join("ca.key");
        let ca_cert = dir.join("ca.pem");
        let key = dir.join("server.key");
        let csr = dir.join("server.csr");
        let cert = dir.join("server.pem");
        let ext = dir.join("server.ext");
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=dirsync test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_cert))?;
        run(Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:2048", "-nodes"])
            .args(["-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr))?;
        let mut san = String::from("IP:127.0.0.1,DNS:localhost");
        for name in extra_names {
            san.push_str(",DNS:");
            san.push_str(name);
        }
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
            ),
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert))?;
        Ok(TestCa { ca_cert, cert, key })
    }
}

/// A server child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    child: Child,
}

impl ServerProcess {
    /// Spawns `cmd` (stdin closed; stdout and stderr to `log`).
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> io::Result<ServerProcess> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(ServerProcess {
            name: name.to_string(),
            child,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `ready` returns true, failing if the process exits first or `timeout`
    /// passes; the error carries the tail of `log`.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        log: &Path,
        mut ready: impl FnMut() -> bool,
    ) -> io::Result<()> {
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before it was ready: {}",
                    self.name,
                    log_tail(log)
                )));
            }
            if start.elapsed() > timeout {
                return Err(io::Error::other(format!(
                    "{} not ready after {timeout:?}: {}",
                    self.name,
                    log_tail(log)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn test_ca_makes_a_leaf_signed_by_the_ca() {
        if find_binary("openssl").unwrap().is_none() {
            eprintln!("skipped: openssl is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::generate(dir.path(), &["dc1.contoso.test"]).unwrap();
        let out = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca.ca_cert)
            .arg(&ca.cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&ca.cert)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(text.contains("IP Address:127.0.0.1"), "{text}");
        assert!(text.contains("DNS:dc1.contoso.test"), "{text}");
    }
}
