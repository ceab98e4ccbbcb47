//! Quickstart: an Active Directory export in LDIF, synchronized by the engine into a durable
//! LDIF target with the example rule set `examples/rules/ad-to-scim.toml`.
//!
//! `cargo run --example quickstart` — no server needed; it works in a temporary directory and
//! takes a few seconds. It
//!
//! 1. imports `examples/data/corp.ldif` (about fifty users, nested groups), shows the plan of the
//!    initial load as a table (with a progress bar drawn from the engine's progress events),
//!    applies that staged plan, and shows the target file;
//! 2. runs again: nothing to do;
//! 3. replaces the export with `examples/data/corp-edits.ldif` (a rename, a user moved to
//!    "Service Accounts" and so out of scope — deactivated, still linked — a user deleted in AD —
//!    deleted — a membership change, a group deleted), shows the operations with their reasons
//!    (the cause of each deprovision), applies them — the deletion guard lets a few deletions
//!    through (its 10 % applies above a floor of ten; a held plan would be allowed explicitly
//!    here, as an administrator would after review) — and prints a summary.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{encode_name, LdifNames};
use dirsync::connector::ldif::{
    default_binary_attributes, LdifSource, LdifSourceConfig, LdifTarget, LdifTargetConfig,
};
use dirsync::engine::{EngineConfig, EngineError, Progress, Stage, Synchronizer};
use dirsync::model::{AttrName, Dn, ObjectType};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::SqliteStore;

type Error = Box<dyn std::error::Error>;

const MANAGER: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager";

/// A directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Draws a textual progress bar on stderr.
fn draw(p: Progress) {
    let stage = match p.stage {
        Stage::Import => "import",
        Stage::Plan => "plan",
        Stage::Export => "export",
        Stage::Reconcile => "reconcile",
        Stage::Recover => "recover",
    };
    if p.total == Some(0) {
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = match p.total {
        Some(total) if total > 0 => {
            const WIDTH: u64 = 30;
            let filled = (p.done.min(total) * WIDTH / total) as usize;
            write!(
                err,
                "\r  {stage:<8} [{}{}] {}/{total}",
                "#".repeat(filled),
                " ".repeat(WIDTH as usize - filled),
                p.done
            )
        }
        _ => write!(err, "\r  {stage:<8} {} objects", p.done),
    };
    if p.total.is_some_and(|t| p.done >= t) {
        let _ = writeln!(err);
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn dn(s: &str) -> Result<Dn, Error> {
    Dn::parse(s).map_err(|e| format!("example DN {s:?}: {e}").into())
}

/// The LDIF target: SCIM users and groups under `o=scim-app`, named by userName and
/// displayName; the rules' SCIM attribute paths are carried by [`LdifNames`].
fn target_config() -> Result<LdifTargetConfig, Error> {
    let mut config = LdifTargetConfig::default()
        .with_object_type(
            "User",
            "userName",
            dn("ou=Users,o=scim-app")?,
            ["top", "scimUser"],
        )
        .with_object_type(
            "Group",
            "displayName",
            dn("ou=Groups,o=scim-app")?,
            ["top", "scimGroup"],
        );
    config.object_type_map = [("scimUser", "User"), ("scimGroup", "Group")]
        .into_iter()
        .map(|(c, t)| (AttrName::new(c), ObjectType::new(t)))
        .collect();
    config.reference_attributes = vec![
        AttrName::new("members"),
        encode_name(&AttrName::new(MANAGER)),
    ];
    Ok(config)
}

/// The AD export: anchored on objectGUID, which the file holds as GUID text (so it is not a
/// binary attribute: the rules' `[objectGUID]` reads the text for externalId).
fn source_config() -> LdifSourceConfig {
    LdifSourceConfig {
        anchor_attribute: AttrName::new("objectGUID"),
        binary_attributes: default_binary_attributes()
            .into_iter()
            .filter(|a| !a.is("objectGUID"))
            .collect(),
        ..LdifSourceConfig::default()
    }
}

fn show_target(path: &Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(path)?;
    let users = text.matches("objectClass: scimUser").count();
    let groups = text.matches("objectClass: scimGroup").count();
    let inactive = text.matches("active: FALSE").count() + text.matches("active: false").count();
    println!(
        "the target file {} holds {users} users ({inactive} inactive) and {groups} groups",
        path.display()
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let tmp = TempDir::new("dirsync-quickstart")?;
    let content = tmp.0.join("corp.ldif");
    std::fs::copy(examples_dir().join("data/corp.ldif"), &content)?;
    let rules_path = examples_dir().join("rules/ad-to-scim.toml");
    let rules_text = std::fs::read_to_string(&rules_path)?;
    let rules = RuleSet::from_toml(&rules_text, Some("examples/rules/ad-to-scim.toml"))
        .map_err(|e| format!("the example rules do not load:\n{e}"))?;
    let target_path = tmp.0.join("scim-app.ldif");

    let source = LdifSource::new(&content, source_config());
    let target = LdifNames::new(LdifTarget::open(&target_path, target_config()?)?);
    let store = SqliteStore::open(tmp.0.join("state.sqlite"))?;
    let mut sync = Synchronizer::new(
        Box::new(source),
        Box::new(target),
        Box::new(store),
        Arc::new(rules),
        EngineConfig {
            seed: 42,
            ..EngineConfig::default()
        },
    );
    sync.on_progress(draw);

    println!("== 1. initial load of {}", content.display());
    let report = sync.delta_import().await?;
    println!("imported {} objects", report.imported);
    let staged = sync.plan(false)?;
    // The table of an initial load is long: its first rows, then a count.
    let table = staged.plan.to_string();
    let lines: Vec<&str> = table.lines().collect();
    for l in lines.iter().take(36) {
        println!("{l}");
    }
    if lines.len() > 36 {
        println!(
            "… {} more lines: {} operations in all",
            lines.len() - 36,
            staged.plan.operations.len()
        );
    }
    let report = sync.apply(staged).await?;
    print!("{report}");
    show_target(&target_path)?;

    println!("\n== 2. run again");
    let report = sync.run_cycle().await?;
    print!("{report}");
    print!("{}", sync.plan(false)?.plan);

    println!("\n== 3. a new export: corp-edits.ldif");
    std::fs::copy(examples_dir().join("data/corp-edits.ldif"), &content)?;
    let report = sync.delta_import().await?;
    println!("imported {} objects", report.imported);
    let staged = sync.plan(false)?;
    print!("{}", staged.plan);
    let report = sync.apply(staged.clone()).await?;
    print!("{report}");
    if report.held {
        println!(
            "(the deletion guard holds deletions beyond 10 % of a type's linked objects, above \
             a floor of ten. The plan above has been reviewed: allowing its deletions once.)"
        );
        sync.allow_deletions_once();
        let report = match sync.apply(staged).await {
            Err(EngineError::StalePlan { .. }) => {
                let staged = sync.plan(false)?;
                sync.apply(staged).await?
            }
            other => other?,
        };
        print!("{report}");
    }

    println!("\n== 4. summary");
    show_target(&target_path)?;
    let print_runs = sync.with_store(|s| s.runs(10))?;
    println!("runs recorded in the state store:");
    for r in print_runs.iter().rev() {
        println!(
            "  #{:<3} {:<12} {}",
            r.id.0,
            r.profile,
            r.outcome.as_deref().unwrap_or("unfinished")
        );
    }
    let again = sync.run_cycle().await?;
    println!(
        "a further run planned {} operations; the target is in sync",
        again.planned
    );
    Ok(())
}
