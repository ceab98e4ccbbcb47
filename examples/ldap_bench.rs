//! `ldap_bench`: dirsync's LDAP full import next to `ldapsearch`, against one local slapd
//! holding N generated inetOrgPerson entries (bulk-loaded with `slapadd`), in the same run.
//!
//! ```text
//! scripts/bench-ldap.sh                        # 100,000 entries, 5 rounds (release build)
//! cargo run --release --features ldap,testkit --example ldap_bench -- [N] [ROUNDS] [options]
//!   --ldaps             also run both sides over ldaps:// (TLS, the test CA verified)
//!   --runtime=current   the tokio runtime for dirsync: current (default) or multi (2 workers)
//!   --groups=G          also G groupOfNames groups (each user a member of one), default 0
//!   --only=dirsync      skip ldapsearch (for profiling)
//!   --max-reconnects=R  the source's max_reconnects (default 2: it then keeps a 16-byte key
//!                       per yielded anchor to skip duplicates after a restart; 0 keeps none)
//! ```
//!
//! Rounds alternate: `ldapsearch -x -LLL -E pr=1000/noprompt` with stdout to /dev/null (writing
//! LDIF is its processing), then `LdapSource::full_import` consumed entry by entry (each entry
//! is counted and dropped, not collected). Both use the same filter `(objectClass=*)`, the same
//! attribute list (all user attributes plus the anchor `entryUUID`), page size 1000, a simple
//! bind as the root DN, and the same connection type. Prints per-round figures, the medians of
//! entries per second, their ratio, the load average, and the peak resident memory of this
//! process during each import (VmHWM, reset before each import through
//! `/proc/self/clear_refs`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use dirsync::connector::ldap::{
    AnchorAttribute, LdapBind, LdapConnection, LdapSource, LdapSourceConfig,
};
use dirsync::connector::{ImportItem, Secret, Source};
use dirsync::testkit::slapd::{users_and_groups_ldif, Slapd, SlapdOptions};
use futures::StreamExt;

struct Args {
    n: usize,
    rounds: usize,
    ldaps: bool,
    multi: bool,
    groups: usize,
    only_dirsync: bool,
    max_reconnects: Option<u32>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        n: 100_000,
        rounds: 5,
        ldaps: false,
        multi: false,
        groups: 0,
        only_dirsync: false,
        max_reconnects: None,
    };
    let mut positional = 0;
    for arg in std::env::args().skip(1) {
        if arg == "--ldaps" {
            a.ldaps = true;
        } else if let Some(r) = arg.strip_prefix("--runtime=") {
            a.multi = match r {
                "current" => false,
                "multi" => true,
                other => return Err(format!("--runtime={other}: current or multi")),
            };
        } else if let Some(g) = arg.strip_prefix("--groups=") {
            a.groups = g.parse().map_err(|_| format!("--groups={g}: a number"))?;
        } else if let Some(r) = arg.strip_prefix("--max-reconnects=") {
            a.max_reconnects = Some(
                r.parse()
                    .map_err(|_| format!("--max-reconnects={r}: a number"))?,
            );
        } else if arg == "--only=dirsync" {
            a.only_dirsync = true;
        } else {
            let v: usize = arg
                .replace('_', "")
                .parse()
                .map_err(|_| format!("{arg}: expected [N] [ROUNDS] [--ldaps] [--runtime=current|multi] [--groups=G] [--only=dirsync]"))?;
            match positional {
                0 => a.n = v,
                1 => a.rounds = v.max(1),
                _ => return Err(format!("{arg}: too many numbers")),
            }
            positional += 1;
        }
    }
    Ok(a)
}

/// A `/proc/self/status` field in kB.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); false when that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU seconds (user + system) of this process and of its waited-for children.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14–17 of stat, 12–15 of `rest` (1-based after ')').
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    (get(11) + get(12), get(13) + get(14))
}

struct Target {
    label: &'static str,
    url: String,
    ca: Option<std::path::PathBuf>,
}

fn source(slapd: &Slapd, t: &Target, max_reconnects: Option<u32>) -> LdapSource {
    let mut conn = LdapConnection::new(t.url.clone());
    conn.bind = LdapBind::Simple {
        dn: slapd.root_dn(),
        password: Secret::new(slapd.root_password()),
    };
    conn.allow_cleartext_bind = t.ca.is_none();
    conn.tls.ca_file = t.ca.clone();
    conn.page_size = 1000;
    let mut c = LdapSourceConfig::new(conn, slapd.suffix());
    c.filter = "(objectClass=*)".into();
    c.anchor = AnchorAttribute::EntryUuid;
    if let Some(r) = max_reconnects {
        c.max_reconnects = r;
    }
    LdapSource::new(c)
}

/// Runs ldapsearch; returns (seconds, entries counted when `count` is set, else 0).
fn ldapsearch(
    slapd: &Slapd,
    t: &Target,
    attrs: &[String],
    count: bool,
) -> Result<(f64, usize), String> {
    let mut cmd = Command::new("ldapsearch");
    cmd.args(["-x", "-LLL", "-H", &t.url, "-D", &slapd.root_dn(), "-w"])
        .arg(slapd.root_password())
        .args([
            "-b",
            slapd.suffix(),
            "-E",
            "pr=1000/noprompt",
            "(objectClass=*)",
        ])
        .args(attrs)
        .stderr(Stdio::inherit());
    if let Some(ca) = &t.ca {
        cmd.env("LDAPTLS_CACERT", ca);
    }
    cmd.stdout(if count { Stdio::piped() } else { Stdio::null() });
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("ldapsearch: {e}"))?;
    // Counted as it streams: holding the whole LDIF here would inflate this process's memory.
    let mut n = 0;
    if let Some(out) = child.stdout.take() {
        let mut r = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => n += usize::from(line.starts_with(b"dn:")),
                Err(e) => return Err(format!("reading ldapsearch's output: {e}")),
            }
        }
    }
    let status = child.wait().map_err(|e| format!("ldapsearch: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("ldapsearch failed: {status}"));
    }
    Ok((secs, n))
}

/// One full import consumed entry by entry: (seconds, entries yielded, entries skipped).
async fn dirsync(src: &LdapSource) -> Result<(f64, usize, u64), String> {
    let skipped0 = src.skipped();
    let t0 = Instant::now();
    let mut stream = src.full_import().await.map_err(|e| e.to_string())?;
    let mut n = 0usize;
    while let Some(item) = stream.next().await {
        match item.map_err(|e| e.to_string())? {
            ImportItem::Item(e) => {
                // Touch the entry so the conversion cannot be optimised away, then drop it.
                n += usize::from(!e.anchor.as_str().is_empty());
            }
            ImportItem::Checkpoint(_) | ImportItem::Present(_) => {}
        }
    }
    Ok((t0.elapsed().as_secs_f64(), n, src.skipped() - skipped0))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() -> Result<(), String> {
    let a = args()?;
    println!(
        "ldap_bench: {} users + {} groups, {} rounds, max_reconnects {}, runtime {}, load average {}",
        a.n,
        a.groups,
        a.rounds,
        a.max_reconnects.map_or("default".to_owned(), |r| r.to_string()),
        if a.multi {
            "multi-thread (2 workers)"
        } else {
            "current-thread"
        },
        loadavg()
    );
    let t0 = Instant::now();
    let suffix = "dc=example,dc=test";
    let ldif = users_and_groups_ldif(suffix, a.n, a.groups, false);
    let slapd = Slapd::start(SlapdOptions {
        suffix: suffix.into(),
        ldif: Some(ldif),
        ..SlapdOptions::default()
    })
    .map_err(|e| format!("starting slapd: {e}"))?
    .ok_or("slapd is not installed (apt-get install slapd ldap-utils)")?;
    println!(
        "slapd loaded and started in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let rt = if a.multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .map_err(|e| e.to_string())?;

    let mut targets = vec![Target {
        label: "ldap",
        url: slapd.url(),
        ca: None,
    }];
    if a.ldaps {
        targets.push(Target {
            label: "ldaps",
            url: slapd.ldaps_url(),
            ca: Some(slapd.ca_file().to_path_buf()),
        });
    }
    let mut summary = Vec::new();
    for t in &targets {
        let src = source(&slapd, t, a.max_reconnects);
        let attrs = src.config().requested_attributes();
        // Warm-up (not timed): both sides read everything once; the counts must agree.
        let (_, yielded, skipped) = rt.block_on(dirsync(&src))?;
        let total = yielded + skipped as usize;
        if !a.only_dirsync {
            let (_, listed) = ldapsearch(&slapd, t, &attrs, true)?;
            if listed != total {
                return Err(format!(
                    "{}: ldapsearch listed {listed} entries, dirsync read {total}",
                    t.label
                ));
            }
        }
        println!(
            "[{}] {total} entries ({yielded} yielded, {skipped} skipped as unmapped); attributes {attrs:?}",
            t.label
        );
        let (mut ls, mut ds, mut hwm) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=a.rounds {
            let mut line = format!("[{}] round {round}:", t.label);
            if !a.only_dirsync {
                let (_, child0) = cpu_seconds();
                let (secs, _) = ldapsearch(&slapd, t, &attrs, false)?;
                let (_, child1) = cpu_seconds();
                let rate = total as f64 / secs;
                ls.push(rate);
                line += &format!(
                    " ldapsearch {:>7.0}/s ({secs:.3} s, cpu {:.2} s)",
                    rate,
                    child1 - child0
                );
            }
            let rss0 = status_kb("VmRSS:");
            let reset = reset_peak_rss();
            let (own0, _) = cpu_seconds();
            let (secs, yielded, skipped) = rt.block_on(dirsync(&src))?;
            let (own1, _) = cpu_seconds();
            let peak = status_kb("VmHWM:");
            if yielded + skipped as usize != total {
                return Err(format!(
                    "round {round}: dirsync read {} of {total}",
                    yielded + skipped as usize
                ));
            }
            let rate = total as f64 / secs;
            ds.push(rate);
            if reset {
                hwm.push(peak as f64);
            }
            line += &format!(
                " | dirsync {:>7.0}/s ({secs:.3} s, cpu {:.2} s) | RSS before {} kB, peak {} kB{} | load {}",
                rate,
                own1 - own0,
                rss0,
                peak,
                if reset { "" } else { " (not reset)" },
                loadavg()
            );
            println!("{line}");
        }
        let dm = median(&mut ds);
        let peak = hwm.iter().copied().fold(0.0, f64::max);
        if a.only_dirsync {
            println!(
                "[{}] median: dirsync {dm:.0} entries/s; peak RSS {peak:.0} kB",
                t.label
            );
        } else {
            let lm = median(&mut ls);
            println!(
                "[{}] median: ldapsearch {lm:.0} entries/s, dirsync {dm:.0} entries/s, ratio {:.2}; peak RSS during an import {peak:.0} kB",
                t.label,
                dm / lm
            );
            summary.push(format!(
                "{}: ldapsearch {lm:.0}/s, dirsync {dm:.0}/s, ratio {:.2}, peak RSS {peak:.0} kB",
                t.label,
                dm / lm
            ));
        }
    }
    println!("load average at the end: {}", loadavg());
    for s in summary {
        println!("SUMMARY {} entries: {s}", a.n);
    }
    Ok(())
}
