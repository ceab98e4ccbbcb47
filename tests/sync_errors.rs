//! The `sync` example's errors as a person and a program see them: bad rule and configuration
//! files make the tool exit 78 with every problem on stderr — its file, line and column, the line
//! itself and a caret under the value (multi-line, as written), or with `--json` one JSON object
//! per problem and line. The expected stderr is compared exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::build_sync;

const RULES: &str = r#"[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["userName"], ["mail"]]

[rule.scope]
family = "provisioning"
groups = [[{ attribute = "userAccountControl", operator = "ISNOTBITSET", value = 2 }]]

[[rule.flow]]
target = "userName"
expression = 'ToLower([mail]'
"#;

const GOOD_RULES: &str = r#"[[rule]]
name = "users"
source_type = "user"
target_type = "User"
[[rule.flow]]
target = "userName"
expression = '[cn]'
"#;

const CONFIG: &str = r#"rules = "rules.toml"
state = "state.sqlite"

[source]
type = "ldif"
path = "source.ldif"

[target]
type = "ldif"
path = "target.ldif"
"#;

/// Runs `sync <args>` in `dir`; returns the exit code and stderr.
fn sync(dir: &Path, args: &[&str]) -> (i32, String) {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let out = Command::new(EXE.get_or_init(build_sync))
        .args(args)
        .current_dir(dir)
        .env_remove("DIRSYNC_UNSET_PASSWORD")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setup(config: &str, rules: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sync.toml"), config).unwrap();
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    std::fs::write(
        dir.path().join("source.ldif"),
        "dn: cn=ann,dc=x\nobjectClass: user\nentryUUID: 11111111-1111-1111-1111-111111111111\ncn: ann\n",
    )
    .unwrap();
    dir
}

#[test]
fn rule_errors_keep_their_lines_and_carets() {
    let dir = setup(CONFIG, RULES);
    let (code, stderr) = sync(dir.path(), &["--config", "sync.toml", "run"]);
    assert_eq!(code, 78, "{stderr}");
    assert_eq!(
        stderr,
        r#"error[E0403]: scope group 1, clause 1 (userAccountControl ISNOTBITSET): "ISNOTBITSET" is a Connect Sync operator, but this filter's family is provisioning; it has no provisioning equivalent; set the family to "connect-sync" to use it
 --> rules.toml:9:59 (rule "users")
  |
9 | groups = [[{ attribute = "userAccountControl", operator = "ISNOTBITSET", value = 2 }]]
  |                                                           ^^^^^^^^^^^^^

error[E0113]: unexpected end of expression: expected `,` or `)`
  --> rules.toml:13:29 (rule "users", attribute "userName")
   |
13 | ToLower([mail]
   |               ^
13 | ToLower([mail]
   |        - to close this call

error[E0502]: join attribute mail is not the target of any flow of this rule; join groups name target attributes
 --> rules.toml:5:24 (rule "users", attribute "mail")
  |
5 | join = [["userName"], ["mail"]]
  |                        ^^^^^^
sync: the rules rules.toml have 3 errors
"#
    );

    // For programs: one JSON object per problem and line.
    let (code, stderr) = sync(dir.path(), &["--json", "--config", "sync.toml", "run"]);
    assert_eq!(code, 78, "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert_eq!(
        lines[0],
        serde_json::json!({
            "exit": 78, "code": "E0403", "file": "rules.toml", "line": 9, "column": 59,
            "rule": "users",
            "message": "scope group 1, clause 1 (userAccountControl ISNOTBITSET): \"ISNOTBITSET\" is a Connect Sync operator, but this filter's family is provisioning; it has no provisioning equivalent; set the family to \"connect-sync\" to use it",
        })
    );
    assert_eq!(
        (
            &lines[1]["code"],
            &lines[1]["line"],
            &lines[1]["column"],
            &lines[1]["attribute"]
        ),
        (&"E0113".into(), &13.into(), &29.into(), &"userName".into())
    );
    assert_eq!(
        (&lines[2]["code"], &lines[2]["line"], &lines[2]["column"]),
        (&"E0502".into(), &5.into(), &24.into())
    );
}

/// Runs `sync run` over `config` (with rules that compile): it must exit 78 and print exactly
/// `expected` on stderr. Returns the directory it ran in.
fn refused(config: &str, expected: &str) -> tempfile::TempDir {
    let dir = setup(config, GOOD_RULES);
    let (code, stderr) = sync(dir.path(), &["--config", "sync.toml", "run"]);
    assert_eq!((code, stderr.as_str()), (78, expected));
    dir
}

#[test]
fn configuration_errors_point_at_the_value() {
    // A bad value inside a connector's section: at the value, not at `[source]`.
    let config = CONFIG.replace(
        "type = \"ldif\"\npath = \"source.ldif\"",
        "type = \"ldap\"\nbase_dn = \"dc=x\"\ndelta = \"usn\"\n\n[source.connection]\nurl = \"ldap://127.0.0.1:1\"",
    );
    let dir = refused(
        &config,
        r#"error: unknown variant `usn`, expected one of `none`, `dirsync`, `usn_changed`, `syncrepl`
 --> sync.toml:7:9
  |
7 | delta = "usn"
  |         ^^^^^
sync: the configuration sync.toml has an error
"#,
    );
    let (_, stderr) = sync(dir.path(), &["--json", "--config", "sync.toml", "run"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(stderr.trim_end()).unwrap(),
        serde_json::json!({
            "exit": 78, "file": "sync.toml", "line": 7, "column": 9,
            "message": "unknown variant `usn`, expected one of `none`, `dirsync`, `usn_changed`, `syncrepl`",
        })
    );

    // A key the connector does not know is an error, not ignored.
    let config = CONFIG.replace(
        "path = \"source.ldif\"",
        "path = \"source.ldif\"\nanchor_atribute = \"objectGUID\"",
    );
    refused(
        &config,
        r#"error: unknown field `anchor_atribute`, expected one of `anchor_attribute`, `object_type_map`, `unmapped`, `reference_attributes`, `binary_attributes`, `changes_dir`
 --> sync.toml:7:1
  |
7 | anchor_atribute = "objectGUID"
  | ^^^^^^^^^^^^^^^
sync: the configuration sync.toml has an error
"#,
    );

    // Checks made after reading: a missing file, a password variable that is not set.
    let config = CONFIG.replace("source.ldif", "missing.ldif");
    refused(
        &config,
        r#"error: [source] path: no file missing.ldif
 --> sync.toml:6:8
  |
6 | path = "missing.ldif"
  |        ^^^^^^^^^^^^^^
sync: the configuration sync.toml has an error
"#,
    );
    let config = CONFIG.replace(
        "type = \"ldif\"\npath = \"source.ldif\"",
        "type = \"ldap\"\nbase_dn = \"dc=x\"\nbind_dn = \"cn=sync,dc=x\"\npassword_env = \"DIRSYNC_UNSET_PASSWORD\"\n\n[source.connection]\nurl = \"ldap://127.0.0.1:1\"",
    );
    refused(
        &config,
        r#"error: [source] password_env: the variable DIRSYNC_UNSET_PASSWORD is not set
 --> sync.toml:8:16
  |
8 | password_env = "DIRSYNC_UNSET_PASSWORD"
  |                ^^^^^^^^^^^^^^^^^^^^^^^^
sync: the configuration sync.toml has an error
"#,
    );
}

#[test]
fn usage_errors_follow_json_too() {
    let dir = setup(CONFIG, GOOD_RULES);
    let (code, stderr) = sync(dir.path(), &["--config", "sync.toml", "fly"]);
    assert_eq!(code, 64);
    assert!(
        stderr.starts_with("sync: unknown command \"fly\"\nusage: sync --config"),
        "{stderr}"
    );
    let (code, stderr) = sync(dir.path(), &["--json", "--config", "sync.toml", "fly"]);
    assert_eq!(code, 64);
    assert_eq!(
        stderr,
        "{\"exit\":64,\"message\":\"unknown command \\\"fly\\\"\"}\n"
    );
}
