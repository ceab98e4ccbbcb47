//! `sync`: a small command-line tool over a TOML configuration — the engine's run profiles,
//! staging and on-demand synchronization, as an administrator uses them.
//!
//! ```text
//! cargo run --example sync -- --config examples/config/ldif-to-ldif.toml <command>
//!
//!   plan [--full] [--full-import] [--out plan.json]
//!                                      import, then print the plan (and save it as JSON)
//!   apply --plan plan.json [--allow-deletions]
//!                                      apply a saved plan (refused when the state has moved)
//!   run [--full] [--full-import] [--allow-deletions]
//!                                      import and export: the usual cycle (--full: full sync;
//!                                      --full-import: read every source object again)
//!   explain <anchor|dn>                synchronize one object now and explain the decision
//!   reconcile [--allow-deletions]      read the target, correct drift
//!   status                             the last runs, the escrow, the pending work
//! ```
//!
//! `--progress` prints the engine's progress events on stderr, one a line
//! (`progress Export 12 40`).
//!
//! Errors go to stderr as a person reads them: a problem in the configuration or the rules is
//! shown with its file, line and column, the line itself and a caret under the value. `--json`
//! prints each problem instead as one JSON object a line (`exit`, `message`, and where known
//! `code`, `file`, `line`, `column`, `rule`, `attribute`), for programs.
//!
//! Exit codes: 0 done; 1 a run failed (connector, state store); 2 the deletion guard held the
//! export (nothing was written; review, then pass `--allow-deletions`); 3 a saved plan is stale;
//! 4 some operations failed (they are in escrow and will be retried); 64 bad usage; 78 a bad
//! configuration or rule file. The configuration format is documented in README.md ("The sync
//! example") and `examples/config/ldif-to-ldif.toml` is a commented example.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use common::{encode_name, LdifNames};
use dirsync::connector::ldif::{
    LdifObjectTypeConfig, LdifSource, LdifSourceConfig, LdifTarget, LdifTargetConfig,
};
use dirsync::connector::{Source, Target};
use dirsync::delta::DeletionGuard;
use dirsync::engine::{EngineConfig, EngineError, JoinLookup, RunReport, StagedPlan, Synchronizer};
use dirsync::model::{AttrName, ObjectType};
use dirsync::rules::diagnostic::{render_report, Origin, Span, TomlSpans, TomlStep, TomlStep::Key};
use dirsync::rules::ruleset::{RuleError, RuleSet};
use dirsync::state::SqliteStore;
use serde::{Deserialize, Serialize};

/// The configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The rule file, relative to the configuration file.
    rules: PathBuf,
    /// The SQLite state file, relative to the configuration file.
    state: PathBuf,
    source: SourceConfig,
    target: TargetConfig,
    #[serde(default)]
    guard: GuardConfig,
    #[serde(default)]
    engine: EngineSection,
    #[serde(default)]
    journal: JournalSection,
}

/// `[journal]`: how long the state file keeps runs and their journal.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JournalSection {
    /// The newest runs always kept.
    keep_runs: u64,
    /// Runs finished within this many days are kept.
    keep_days: u32,
}

impl Default for JournalSection {
    fn default() -> Self {
        let r = dirsync::state::Retention::default();
        JournalSection {
            keep_runs: r.runs,
            keep_days: r.days,
        }
    }
}

/// `[source]`, tagged by `type`. Other connectors add variants here.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum SourceConfig {
    /// An LDIF content file (and optional change files).
    Ldif {
        /// The content file.
        path: PathBuf,
        /// The connector's name in the state store (default `ldif`).
        #[serde(default)]
        name: Option<String>,
        /// `anchor_attribute`, `changes_dir`, `object_type_map`, `unmapped`,
        /// `reference_attributes`, `binary_attributes`.
        #[serde(flatten)]
        config: LdifSourceConfig,
    },
    /// An LDAP directory (cargo feature `ldap`): `connection`, `base_dn`, `scope`, `filter`,
    /// `attributes`, `anchor`, `object_types`, `reference_attributes`, `binary_attributes`,
    /// `range_retrieval`, `max_reconnects`, `delta` — see README.md, "LDAP source and target".
    #[cfg(feature = "ldap")]
    Ldap {
        /// With `password_env`: the DN (or AD user principal name) of a simple bind.
        #[serde(default)]
        bind_dn: Option<String>,
        /// Read the bind password from this environment variable (keeps it out of the file).
        #[serde(default)]
        password_env: Option<String>,
        #[serde(flatten)]
        config: Box<dirsync::connector::ldap::LdapSourceConfig>,
    },
}

/// `[target]`, tagged by `type`. Other connectors add variants here.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum TargetConfig {
    /// A directory kept in one LDIF file.
    Ldif(LdifTargetSection),
    /// Microsoft Entra ID through Microsoft Graph (cargo feature `graph`): `tenant`,
    /// `client_id`, `client_secret` or `certificate_path` (+ `private_key_path`), `authority`,
    /// `graph_url`, `writes_per_second`, … — see README.md, "The Graph target".
    #[cfg(feature = "graph")]
    Graph(dirsync::connector::graph::GraphConfig),
    /// A SCIM 2.0 service (needs the `scim` feature).
    #[cfg(feature = "scim")]
    Scim {
        /// The connector's name in logs (default `scim`).
        #[serde(default)]
        name: Option<String>,
        /// Read a bearer token from this environment variable (keeps it out of the file).
        #[serde(default)]
        bearer_token_env: Option<String>,
        /// `base_url`, `auth`, `dialect`, `page_size`, `member_chunk`, `bulk`, `max_batch`,
        /// `etags`, `read_members`, `timeout_secs`, `max_connections`, `ca_file`,
        /// `unknown_extensions`.
        #[serde(flatten)]
        config: dirsync::connector::scim::ScimConfig,
    },
    /// An LDAP directory (cargo feature `ldap`): `connection`, `directory`, `base_dn`,
    /// `object_types`, `object_type_map`, `reference_attributes`, `binary_attributes`,
    /// `secret_attributes`, `read_attributes`, `max_batch` — see README.md, "LDAP source and
    /// target".
    #[cfg(feature = "ldap")]
    Ldap {
        /// With `password_env`: the DN (or AD user principal name) of a simple bind.
        #[serde(default)]
        bind_dn: Option<String>,
        /// Read the bind password from this environment variable (keeps it out of the file).
        #[serde(default)]
        password_env: Option<String>,
        #[serde(flatten)]
        config: Box<dirsync::connector::ldap::LdapTargetConfig>,
    },
}

/// `[target]` of `type = "ldif"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LdifTargetSection {
    /// The file.
    path: PathBuf,
    /// The connector's name in logs (default `ldif`).
    #[serde(default)]
    name: Option<String>,
    /// Per object type: `rdn_attribute`, `parent`, `object_classes`.
    #[serde(default)]
    object_types: BTreeMap<ObjectType, LdifObjectTypeConfig>,
    /// `objectClass` → object type (default: the connector's).
    #[serde(default)]
    object_type_map: Option<BTreeMap<AttrName, ObjectType>>,
    /// Attributes holding DNs, in the rules' spelling (default: the connector's).
    #[serde(default)]
    reference_attributes: Option<Vec<AttrName>>,
    /// Attributes whose values are bytes (default: the connector's).
    #[serde(default)]
    binary_attributes: Option<Vec<AttrName>>,
    /// Operations per apply call.
    #[serde(default)]
    max_batch: Option<usize>,
}

/// The connection of an `ldap` section with the password from the environment (when
/// `password_env` is given) and the CA file relative to the configuration file.
#[cfg(feature = "ldap")]
fn ldap_connection(
    section: &'static str,
    file: &ConfigFile,
    mut conn: dirsync::connector::ldap::LdapConnection,
    bind_dn: Option<String>,
    password_env: Option<String>,
) -> Result<dirsync::connector::ldap::LdapConnection, Fail> {
    use dirsync::connector::ldap::LdapBind;
    use dirsync::connector::Secret;
    match (bind_dn, password_env) {
        (Some(dn), Some(var)) => {
            let pw = std::env::var(&var).map_err(|_| {
                file.fail(
                    EXIT_CONFIG,
                    &[Key(section), Key("password_env")],
                    format!("[{section}] password_env: the variable {var} is not set"),
                )
            })?;
            conn.bind = LdapBind::Simple {
                dn,
                password: Secret::new(pw),
            };
        }
        (None, None) => {}
        (given, _) => {
            let key = if given.is_some() {
                "bind_dn"
            } else {
                "password_env"
            };
            return Err(file.fail(
                EXIT_CONFIG,
                &[Key(section), Key(key)],
                format!("[{section}] bind_dn and password_env go together: give both or neither"),
            ));
        }
    }
    let base = &file.base;
    conn.tls.ca_file = conn.tls.ca_file.map(|f| relative(base, &f));
    conn.tls.client_cert_file = conn.tls.client_cert_file.map(|f| relative(base, &f));
    conn.tls.client_key_file = conn.tls.client_key_file.map(|f| relative(base, &f));
    Ok(conn)
}

/// `[guard]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GuardConfig {
    enabled: bool,
    max_count: usize,
    max_ratio: f64,
    floor: usize,
    max_container_wave: usize,
    min_import_share: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        let g = DeletionGuard::default();
        GuardConfig {
            enabled: g.enabled,
            max_count: g.max_count,
            max_ratio: g.max_ratio,
            floor: g.floor,
            max_container_wave: g.max_container_wave,
            min_import_share: EngineConfig::default().min_import_share,
        }
    }
}

/// `[engine]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct EngineSection {
    concurrency: usize,
    seed: u64,
    import_batch: usize,
    join_lookup: JoinLookup,
    target_read_max_age_secs: Option<u64>,
}

impl Default for EngineSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        EngineSection {
            concurrency: e.concurrency,
            seed: e.seed,
            import_batch: e.import_batch,
            join_lookup: e.join_lookup,
            target_read_max_age_secs: e.target_read_max_age.map(|d| d.as_secs()),
        }
    }
}

/// One problem, as a person reads it (`report`, several lines) and as a program does (the
/// fields, printed as JSON by `--json`).
#[derive(Debug, Serialize)]
struct Problem {
    /// One line saying what is wrong.
    message: String,
    /// The stable code of a rule error (`E0403`).
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    /// The file it is in.
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    /// 1-based line in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    /// 1-based column (characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<usize>,
    /// The rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    /// The target attribute.
    #[serde(skip_serializing_if = "Option::is_none")]
    attribute: Option<String>,
    /// What a person sees: the message with the file position, the line and a caret; `None`:
    /// `sync: <message>`.
    #[serde(skip)]
    report: Option<String>,
}

impl Problem {
    fn plain(message: impl Into<String>) -> Problem {
        Problem {
            message: message.into(),
            code: None,
            file: None,
            line: None,
            column: None,
            rule: None,
            attribute: None,
            report: None,
        }
    }

    /// A problem at `span` of `text`, the content of the file shown as `file`.
    fn at(file: &str, text: &str, span: Span, message: impl Into<String>) -> Problem {
        let message = message.into();
        let (line, column) = span.line_col(text);
        let origin = Origin {
            file: Some(file.to_owned()),
            ..Origin::default()
        };
        let report = render_report(&format!("error: {message}"), text, &origin, span, &[], None);
        Problem {
            file: Some(file.to_owned()),
            line: Some(line),
            column: Some(column),
            report: Some(report),
            ..Problem::plain(message)
        }
    }

    fn rule(e: &RuleError, file: &str) -> Problem {
        Problem {
            message: e.message.clone(),
            code: Some(e.code.clone()),
            file: Some(file.to_owned()),
            line: e.line,
            column: e.column,
            rule: e.rule.clone(),
            attribute: e.attribute.clone(),
            report: Some(e.rendered.clone()),
        }
    }
}

/// A failure: the exit code it maps to, its problems and, after located problems, a last line
/// saying what failed.
struct Fail {
    code: u8,
    problems: Vec<Problem>,
    summary: Option<String>,
}

impl Fail {
    fn new(code: u8, message: impl Into<String>) -> Fail {
        Fail {
            code,
            problems: vec![Problem::plain(message)],
            summary: None,
        }
    }

    /// The message of a failure with one problem (`--help`'s text).
    fn message(&self) -> String {
        self.problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Writes the failure to stderr: for a person, each problem's report (or `sync: message`),
    /// a blank line between located ones, then the summary; for a program (`json`), one JSON
    /// object per problem and line.
    fn print(&self, json: bool) {
        if json {
            for p in &self.problems {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["exit"] = self.code.into();
                eprintln!("{v}");
            }
            return;
        }
        for (i, p) in self.problems.iter().enumerate() {
            match &p.report {
                Some(report) => {
                    if i > 0 {
                        eprintln!();
                    }
                    eprintln!("{}", report.trim_end());
                }
                None => eprintln!("sync: {}", p.message),
            }
        }
        if let Some(summary) = &self.summary {
            eprintln!("sync: {summary}");
        }
    }
}

/// The configuration file as read: its name as given, its text and its directory (the base of
/// the paths in it).
struct ConfigFile {
    shown: String,
    text: String,
    base: PathBuf,
}

impl ConfigFile {
    /// A failure about the value at `path` (or, when the file does not write it, the section
    /// it belongs to), with its line and column.
    fn fail(&self, code: u8, path: &[TomlStep<'_>], message: impl Into<String>) -> Fail {
        let spans = TomlSpans::parse(&self.text);
        let problem = match spans.first_span(&[path, &path[..path.len().min(1)]]) {
            Some(span) if !path.is_empty() => Problem::at(&self.shown, &self.text, span, message),
            _ => Problem::plain(format!("{}: {}", self.shown, message.into())),
        };
        Fail {
            code,
            problems: vec![problem],
            summary: Some(format!("the configuration {} has an error", self.shown)),
        }
    }
}

const EXIT_ERROR: u8 = 1;
const EXIT_HELD: u8 = 2;
const EXIT_STALE: u8 = 3;
const EXIT_PARTIAL: u8 = 4;
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Fail {
        let code = match e {
            EngineError::StalePlan { .. } => EXIT_STALE,
            EngineError::GuardHeld(_) => EXIT_HELD,
            _ => EXIT_ERROR,
        };
        Fail::new(code, e.to_string())
    }
}

const USAGE: &str = "usage: sync --config <file.toml> [--progress] [--json] <command>
  --progress: print the engine's progress events on stderr, one per line
  --json: print errors on stderr as JSON objects, one per line
commands:
  plan [--full] [--full-import] [--out plan.json]
                                                import, then show the plan (and save it)
  apply --plan plan.json [--allow-deletions]    apply a saved plan
  run [--full] [--full-import] [--allow-deletions]
                                                import and export (the usual cycle);
                                                --full: plan every object; --full-import:
                                                read every source object, not the changes
  explain <anchor|dn>                           synchronize one object now, explaining why
  reconcile [--allow-deletions]                 read the target and correct drift
  status                                        last runs, escrow, pending work";

/// The parsed command line.
struct Args {
    config: PathBuf,
    command: String,
    operand: Option<String>,
    full: bool,
    full_import: bool,
    allow_deletions: bool,
    progress: bool,
    out: Option<PathBuf>,
    plan: Option<PathBuf>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, Fail> {
    let usage = |m: String| Fail {
        code: EXIT_USAGE,
        problems: vec![Problem {
            report: Some(format!("sync: {m}\n{USAGE}")),
            ..Problem::plain(m)
        }],
        summary: None,
    };
    let mut config = None;
    let mut command = None;
    let mut operand = None;
    let mut full = false;
    let mut full_import = false;
    let mut allow_deletions = false;
    let mut progress = false;
    let mut out = None;
    let mut plan = None;
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .ok_or_else(|| usage(format!("{flag} needs a value")))
        };
        match a.as_str() {
            "--config" | "-c" => config = Some(PathBuf::from(value("--config")?)),
            "--out" | "-o" => out = Some(PathBuf::from(value("--out")?)),
            "--plan" => plan = Some(PathBuf::from(value("--plan")?)),
            "--full" => full = true,
            "--full-import" => full_import = true,
            "--allow-deletions" => allow_deletions = true,
            "--progress" => progress = true,
            // Read by `main` before parsing, so that usage errors follow it too.
            "--json" => {}
            "--help" | "-h" => return Err(Fail::new(0, USAGE)),
            s if s.starts_with('-') => return Err(usage(format!("unknown option {s}"))),
            _ if command.is_none() => command = Some(a),
            _ if operand.is_none() => operand = Some(a),
            _ => return Err(usage(format!("unexpected argument {a:?}"))),
        }
    }
    let config = config.ok_or_else(|| usage("--config is required".into()))?;
    let command = command.ok_or_else(|| usage("no command given".into()))?;
    let known = ["plan", "apply", "run", "explain", "reconcile", "status"];
    if !known.contains(&command.as_str()) {
        return Err(usage(format!("unknown command {command:?}")));
    }
    if command == "explain" && operand.is_none() {
        return Err(usage("explain needs an anchor or a DN".into()));
    }
    if command != "explain" && operand.is_some() {
        return Err(usage(format!("unexpected argument {operand:?}")));
    }
    if command == "apply" && plan.is_none() {
        return Err(usage("apply needs --plan <file.json>".into()));
    }
    if full_import && command != "run" && command != "plan" {
        return Err(usage(format!(
            "--full-import goes with run or plan, not {command}"
        )));
    }
    Ok(Args {
        config,
        command,
        operand,
        full,
        full_import,
        allow_deletions,
        progress,
        out,
        plan,
    })
}

/// Creates the directory `path` is to be written in.
fn parent_dir(path: &Path, what: &str) -> Result<(), String> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::fs::create_dir_all(p)
            .map_err(|e| format!("{what}: cannot create the directory {}: {e}", p.display())),
        _ => Ok(()),
    }
}

/// `path` relative to the configuration file's directory (absolute paths unchanged).
fn relative(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn load_config(path: &Path) -> Result<(Config, ConfigFile), Fail> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Fail::new(
            EXIT_CONFIG,
            format!("cannot read the configuration {}: {e}", path.display()),
        )
    })?;
    let file = ConfigFile {
        shown: path.display().to_string(),
        base: path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        text,
    };
    const SECTIONS: [&str; 2] = ["source", "target"];
    let error = match toml::from_str::<Config>(&file.text) {
        Ok(config) => match SECTIONS.iter().find_map(|s| reread_section(&file.text, s)) {
            None => return Ok((config, file)),
            Some(e) => e,
        },
        Err(e) => {
            // An error inside a section points at the whole section: read it again.
            let spans = TomlSpans::parse(&file.text);
            let inside = |section: &str| match (spans.span(&[Key(section)]), e.span()) {
                (Some(s), Some(at)) => s.start <= at.start && at.end <= s.end,
                _ => false,
            };
            SECTIONS
                .iter()
                .find(|s| inside(s))
                .and_then(|s| reread_section(&file.text, s))
                .unwrap_or(e)
        }
    };
    let problem = match error.span() {
        Some(r) => Problem::at(
            &file.shown,
            &file.text,
            Span::new(r.start, r.end),
            error.message(),
        ),
        None => Problem::plain(format!("{}: {}", file.shown, error.message())),
    };
    Err(Fail {
        code: EXIT_CONFIG,
        problems: vec![problem],
        summary: Some(format!("the configuration {} has an error", file.shown)),
    })
}

/// serde reads `[source]` and `[target]` — tagged by `type`, with the connector's own
/// configuration flattened in — from a buffer without positions, so an error inside them
/// points at the whole section, and a key the connector does not know passes unnoticed. This
/// reads the connector configuration of `section` again on its own, with positions, and
/// returns its error (`None` when it reads without error, or is not there).
fn reread_section(text: &str, section: &str) -> Option<toml::de::Error> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let (_, value) = doc
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == section)?;
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    let kind = table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == "type")
        .and_then(|(_, v)| v.get_ref().as_str())?;
    let wrapper: &[&str] = match (section, kind) {
        ("source", "ldif") => &["type", "path", "name"],
        ("source", "ldap") | ("target", "ldap") => &["type", "bind_dn", "password_env"],
        ("target", "scim") => &["type", "name", "bearer_token_env"],
        _ => &["type"],
    };
    let mut value = value.clone();
    if let DeValue::Table(t) = value.get_mut() {
        for key in wrapper {
            t.remove(*key);
        }
    }
    let de = serde::de::IntoDeserializer::<toml::de::Error>::into_deserializer(value);
    let checked = match (section, kind) {
        ("source", "ldif") => LdifSourceConfig::deserialize(de).map(drop),
        #[cfg(feature = "ldap")]
        ("source", "ldap") => dirsync::connector::ldap::LdapSourceConfig::deserialize(de).map(drop),
        ("target", "ldif") => LdifTargetSection::deserialize(de).map(drop),
        #[cfg(feature = "graph")]
        ("target", "graph") => dirsync::connector::graph::GraphConfig::deserialize(de).map(drop),
        #[cfg(feature = "scim")]
        ("target", "scim") => dirsync::connector::scim::ScimConfig::deserialize(de).map(drop),
        #[cfg(feature = "ldap")]
        ("target", "ldap") => dirsync::connector::ldap::LdapTargetConfig::deserialize(de).map(drop),
        _ => Ok(()),
    };
    checked.err()
}

fn build(config: Config, file: &ConfigFile) -> Result<Synchronizer, Fail> {
    let base = file.base.as_path();
    let rules_path = relative(base, &config.rules);
    let rules_text = std::fs::read_to_string(&rules_path).map_err(|e| {
        file.fail(
            EXIT_CONFIG,
            &[Key("rules")],
            format!("cannot read the rules {}: {e}", rules_path.display()),
        )
    })?;
    let shown = rules_path.display().to_string();
    let rules = RuleSet::from_toml(&rules_text, Some(&shown)).map_err(|e| {
        let n = e.0.len();
        Fail {
            code: EXIT_CONFIG,
            problems: e.0.iter().map(|r| Problem::rule(r, &shown)).collect(),
            summary: Some(format!(
                "the rules {shown} have {n} error{}",
                if n == 1 { "" } else { "s" }
            )),
        }
    })?;
    let source: Box<dyn Source> = match config.source {
        SourceConfig::Ldif {
            path,
            name,
            mut config,
        } => {
            let path = relative(base, &path);
            if !path.is_file() {
                return Err(file.fail(
                    EXIT_CONFIG,
                    &[Key("source"), Key("path")],
                    format!("[source] path: no file {}", path.display()),
                ));
            }
            config.changes_dir = config.changes_dir.map(|d| relative(base, &d));
            let mut s = LdifSource::new(path, config);
            if let Some(n) = name {
                s = s.with_name(n);
            }
            Box::new(s)
        }
        #[cfg(feature = "ldap")]
        SourceConfig::Ldap {
            bind_dn,
            password_env,
            mut config,
        } => {
            config.connection =
                ldap_connection("source", file, config.connection, bind_dn, password_env)?;
            Box::new(dirsync::connector::ldap::LdapSource::new(*config))
        }
    };
    let target: Box<dyn Target> = match config.target {
        TargetConfig::Ldif(LdifTargetSection {
            path,
            name,
            object_types,
            object_type_map,
            reference_attributes,
            binary_attributes,
            max_batch,
        }) => {
            let mut c = LdifTargetConfig {
                object_types,
                ..LdifTargetConfig::default()
            };
            if let Some(m) = object_type_map {
                c.object_type_map = m;
            }
            if let Some(r) = reference_attributes {
                c.reference_attributes = r.iter().map(encode_name).collect();
            }
            if let Some(b) = binary_attributes {
                c.binary_attributes = b.iter().map(encode_name).collect();
            }
            if let Some(m) = max_batch {
                c.max_batch = m;
            }
            let path = relative(base, &path);
            let at = [Key("target"), Key("path")];
            parent_dir(&path, "[target] path").map_err(|m| file.fail(EXIT_ERROR, &at, m))?;
            let mut t = LdifTarget::open(&path, c).map_err(|e| {
                file.fail(EXIT_ERROR, &at, format!("[target] {}: {e}", path.display()))
            })?;
            if let Some(n) = name {
                t = t.with_name(n);
            }
            Box::new(LdifNames::new(t))
        }
        #[cfg(feature = "graph")]
        TargetConfig::Graph(mut c) => {
            c.certificate_path = c.certificate_path.map(|p| relative(base, &p));
            c.private_key_path = c.private_key_path.map(|p| relative(base, &p));
            Box::new(
                dirsync::connector::graph::GraphTarget::new("entra", c).map_err(|e| {
                    file.fail(
                        EXIT_CONFIG,
                        &[Key("target")],
                        format!("[target] graph: {e}"),
                    )
                })?,
            )
        }
        #[cfg(feature = "scim")]
        TargetConfig::Scim {
            name,
            bearer_token_env,
            mut config,
        } => {
            use dirsync::connector::scim::{ScimAuth, ScimTarget, Secret};
            if let Some(var) = bearer_token_env {
                let token = std::env::var(&var).map_err(|_| {
                    file.fail(
                        EXIT_CONFIG,
                        &[Key("target"), Key("bearer_token_env")],
                        format!("[target] bearer_token_env: the variable {var} is not set"),
                    )
                })?;
                config.auth = ScimAuth::Bearer {
                    token: Secret::new(token),
                };
            }
            config.ca_file = config.ca_file.map(|f| relative(base, &f));
            let mut t = ScimTarget::new(config)
                .map_err(|e| file.fail(EXIT_CONFIG, &[Key("target")], format!("[target] {e}")))?;
            if let Some(n) = name {
                t = t.with_name(n);
            }
            Box::new(t)
        }
        #[cfg(feature = "ldap")]
        TargetConfig::Ldap {
            bind_dn,
            password_env,
            mut config,
        } => {
            config.connection =
                ldap_connection("target", file, config.connection, bind_dn, password_env)?;
            Box::new(dirsync::connector::ldap::LdapTarget::new(*config))
        }
    };
    let state = relative(base, &config.state);
    parent_dir(&state, "state").map_err(|m| file.fail(EXIT_ERROR, &[Key("state")], m))?;
    let mut store = SqliteStore::open(&state).map_err(|e| {
        file.fail(
            EXIT_ERROR,
            &[Key("state")],
            format!("the state store {}: {e}", state.display()),
        )
    })?;
    store.set_retention(Some(dirsync::state::Retention {
        runs: config.journal.keep_runs,
        days: config.journal.keep_days,
    }));
    let engine = EngineConfig {
        guard: DeletionGuard {
            enabled: config.guard.enabled,
            max_count: config.guard.max_count,
            max_ratio: config.guard.max_ratio,
            floor: config.guard.floor,
            max_container_wave: config.guard.max_container_wave,
        },
        min_import_share: config.guard.min_import_share,
        concurrency: config.engine.concurrency.max(1),
        import_batch: config.engine.import_batch.max(1),
        seed: config.engine.seed,
        join_lookup: config.engine.join_lookup,
        target_read_max_age: config
            .engine
            .target_read_max_age_secs
            .map(std::time::Duration::from_secs),
        ..EngineConfig::default()
    };
    Ok(Synchronizer::new(
        source,
        target,
        Box::new(store),
        Arc::new(rules),
        engine,
    ))
}

/// Prints a run report; maps held and partial runs to their exit codes.
fn finish(report: &RunReport) -> Result<(), Fail> {
    print!("{report}");
    if report.held {
        return Err(Fail::new(
            EXIT_HELD,
            "the deletion guard held the export; nothing was written. Review the plan \
             (`sync plan`), then run again with --allow-deletions",
        ));
    }
    if let Some(why) = &report.stopped {
        return Err(Fail::new(
            EXIT_PARTIAL,
            format!("the run stopped early: {why}"),
        ));
    }
    if !report.failures.is_empty() {
        return Err(Fail::new(
            EXIT_PARTIAL,
            format!(
                "{} operations failed; they are in escrow and will be retried",
                report.failures.len()
            ),
        ));
    }
    Ok(())
}

async fn command(args: Args) -> Result<(), Fail> {
    let (config, file) = load_config(&args.config)?;
    let mut sync = build(config, &file)?;
    if args.allow_deletions {
        sync.allow_deletions_once();
    }
    if args.progress {
        // One line per event on stderr: `progress <stage> <done> <total or ?>`.
        sync.on_progress(|p| {
            let total = p.total.map_or_else(|| "?".to_owned(), |t| t.to_string());
            eprintln!("progress {:?} {} {total}", p.stage, p.done);
        });
    }
    match args.command.as_str() {
        "plan" => {
            let report = if args.full_import {
                sync.full_import().await?
            } else {
                sync.delta_import().await?
            };
            eprintln!("imported {} objects", report.imported);
            // The plan a run would make: creates the target may already hold are looked up.
            let staged = sync.plan_with_lookups(args.full).await?;
            print!("{}", staged.plan);
            if let Some(out) = &args.out {
                let json = serde_json::to_string_pretty(&staged).map_err(|e| {
                    Fail::new(EXIT_ERROR, format!("cannot serialize the plan: {e}"))
                })?;
                std::fs::write(out, json).map_err(|e| {
                    Fail::new(EXIT_ERROR, format!("cannot write {}: {e}", out.display()))
                })?;
                eprintln!(
                    "plan saved to {}; apply it with `sync apply --plan {}`",
                    out.display(),
                    out.display()
                );
            }
            Ok(())
        }
        "apply" => {
            let path = args.plan.unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Fail::new(
                    EXIT_ERROR,
                    format!("cannot read the plan {}: {e}", path.display()),
                )
            })?;
            let staged: StagedPlan = serde_json::from_str(&text).map_err(|e| {
                Fail::new(
                    EXIT_ERROR,
                    format!("{} is not a saved plan: {e}", path.display()),
                )
            })?;
            let report = sync.apply(staged).await?;
            finish(&report)
        }
        "run" => {
            let report = match (args.full_import, args.full) {
                // Every source object read again (what a delta cannot see), then the changes
                // planned.
                (true, false) => sync.full_import_cycle().await?,
                // A full sync re-plans every object (after a rule change), from a fresh import.
                (true, true) => {
                    print!("{}", sync.full_import().await?);
                    sync.full_sync().await?
                }
                (false, true) => {
                    print!("{}", sync.delta_import().await?);
                    sync.full_sync().await?
                }
                (false, false) => sync.run_cycle().await?,
            };
            finish(&report)
        }
        "explain" => {
            let object = args.operand.unwrap_or_default();
            let done = sync.sync_object(&object).await?;
            match &done.explanation {
                Some(e) => print!("{e}"),
                None => println!("(no explanation: the object is not in the source mirror)"),
            }
            println!();
            print!("{}", done.plan);
            finish(&done.report)
        }
        "reconcile" => {
            let report = sync.reconcile().await?;
            finish(&report)
        }
        "status" => status(&sync),
        other => Err(Fail::new(EXIT_USAGE, format!("unknown command {other:?}"))),
    }
}

fn status(sync: &Synchronizer) -> Result<(), Fail> {
    let (runs, escrow, dirty, links) = sync
        .with_store(|s| -> Result<_, dirsync::state::StateError> {
            Ok((s.runs(15)?, s.escrowed()?, s.dirty()?, s.link_counts()?))
        })
        .map_err(|e| Fail::new(EXIT_ERROR, format!("state store: {e}")))?;
    println!("last runs:");
    if runs.is_empty() {
        println!("  (none)");
    }
    for r in &runs {
        let took = match r.finished {
            Some(f) => format!(
                "{:.1} s",
                (f - r.started).num_milliseconds() as f64 / 1000.0
            ),
            None => "never finished".to_owned(),
        };
        println!(
            "  #{:<4} {:<13} {}  {:<10} {took}",
            r.id.0,
            r.profile,
            r.started.format("%Y-%m-%d %H:%M:%S"),
            r.outcome.as_deref().unwrap_or("-"),
        );
    }
    println!("linked objects:");
    for (ty, n) in &links {
        println!("  {ty}: {n}");
    }
    println!("pending (dirty) objects: {}", dirty.len());
    println!("escrow:");
    if escrow.is_empty() {
        println!("  (empty)");
    }
    for e in &escrow {
        println!(
            "  {}  {} attempts, next retry {}: {}",
            e.anchor,
            e.attempts,
            e.next_retry.format("%Y-%m-%d %H:%M:%S"),
            e.last_error
        );
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // `--json` is known before the command line is parsed, so usage errors follow it too.
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let result = match parse_args(std::env::args().skip(1)) {
        Ok(args) => command(args).await,
        Err(f) => Err(f),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.code == 0 => {
            println!("{}", f.message());
            ExitCode::SUCCESS
        }
        Err(f) => {
            f.print(json);
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "ldap")]
    #[test]
    fn shipped_ldap_configs_parse() {
        for file in ["ldap-to-ldap.toml", "ad-to-ldap.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/config")
                .join(file);
            let (c, _) = load_config(&path).unwrap_or_else(|f| panic!("{file}: {}", f.message()));
            assert!(matches!(c.source, SourceConfig::Ldap { .. }), "{file}");
            assert!(matches!(c.target, TargetConfig::Ldap { .. }), "{file}");
        }
    }

    fn args(s: &str) -> Result<Args, Fail> {
        parse_args(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn command_lines() {
        let a = args("--config c.toml run --allow-deletions").ok().unwrap();
        assert_eq!(a.command, "run");
        assert!(a.allow_deletions);
        let a = args("-c c.toml explain CN=x,DC=y").ok().unwrap();
        assert_eq!(a.operand.as_deref(), Some("CN=x,DC=y"));
        for bad in [
            "run",
            "--config c.toml",
            "--config c.toml fly",
            "--config c.toml apply",
            "--config c.toml explain",
            "--config c.toml run extra",
            "--config",
        ] {
            assert_eq!(args(bad).err().map(|f| f.code), Some(EXIT_USAGE), "{bad}");
        }
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/ldif-to-ldif.toml");
        let (config, _) = load_config(&path).ok().unwrap();
        assert!(matches!(config.source, SourceConfig::Ldif { .. }));
        #[allow(irrefutable_let_patterns)]
        let TargetConfig::Ldif(target) = &config.target
        else {
            panic!("not an LDIF target");
        };
        assert_eq!(target.object_types.len(), 2);
        assert_eq!(config.engine.seed, 42);
        assert_eq!((config.guard.max_count, config.guard.floor), (500, 10));
    }

    #[test]
    fn the_guard_floor_is_read_and_defaults_to_the_library_s() {
        let guard: GuardConfig = toml::from_str("floor = 0\nmax_count = 50").unwrap();
        assert_eq!((guard.floor, guard.max_count), (0, 50));
        let guard: GuardConfig = toml::from_str("max_ratio = 0.2").unwrap();
        assert_eq!(guard.floor, DeletionGuard::default().floor);
    }

    #[cfg(feature = "graph")]
    #[test]
    fn the_entra_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/ad-to-entra.toml");
        let (config, _) = load_config(&path).ok().unwrap();
        let TargetConfig::Graph(g) = &config.target else {
            panic!("a graph target");
        };
        assert_eq!(g.tenant, "contoso.onmicrosoft.com");
        assert!(g.client_secret.is_some());
    }

    #[cfg(feature = "scim")]
    #[test]
    fn the_scim_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/ad-to-scim.toml");
        let (config, _) = load_config(&path).ok().unwrap();
        let TargetConfig::Scim {
            config: scim,
            bearer_token_env,
            ..
        } = &config.target
        else {
            panic!("not a SCIM target");
        };
        assert_eq!(scim.base_url, "http://127.0.0.1:8080/v2");
        assert_eq!(bearer_token_env.as_deref(), Some("SCIM_TOKEN"));
    }

    #[test]
    fn bad_configs_name_the_line() {
        let dir = std::env::temp_dir().join(format!("dirsync-sync-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(
            &p,
            "rules = \"r.toml\"\nstate = \"s\"\n[source]\ntype = \"ftp\"\n",
        )
        .unwrap();
        let f = load_config(&p).err().unwrap();
        assert_eq!(f.code, EXIT_CONFIG);
        let p = &f.problems[0];
        assert!(matches!(p.line, Some(3 | 4)), "{p:?}");
        assert!(p.column.is_some(), "{p:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
