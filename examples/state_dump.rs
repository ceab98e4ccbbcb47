//! `state_dump`: a state file's mirrors as JSON lines, for an administrator.
//!
//! Since schema version 6 the mirrors' attributes are stored in a compact binary form (names
//! by id from the `attr_names` table), which the `sqlite3` shell shows as blobs. This prints
//! every source object and target object with its attributes in the compact JSON of
//! `dirsync::state` (see [`SqliteStore::dump`]); pipe it to `jq` or `grep`. The other tables
//! (links, journal, runs, watermarks) stay plain text for the shell.
//!
//! ```text
//! cargo run --release --example state_dump -- state.sqlite | grep '"source":"5f0c'
//! ```
//!
//! The file is opened (and migrated, if older) like the engine opens it: work on a copy of a
//! file another process is using.

use std::io::Write;

use dirsync::state::SqliteStore;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: state_dump STATE_FILE");
        return std::process::ExitCode::from(2);
    };
    let store = match SqliteStore::open(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{path}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if let Err(e) = store.dump(&mut out) {
        eprintln!("{path}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if out.flush().is_err() {
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
