//! Where the independent Python reader of the format is, for the test
//! crates that cross-check files with it (btree's `couchread` test and
//! vbucket's `support`, which includes this file by path).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The reader to cross-check files with: `$COUCHREAD` when set (the check is
/// then required: a missing reader or `python3` fails the test), else
/// `shared/tools/couchread.py` beside the repository. `None` when it or
/// `python3` is missing, in which case this test binary says once, on its
/// stderr, that the cross-check was skipped and why.
pub fn couchread() -> Option<&'static Path> {
    static READER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    READER
        .get_or_init(|| {
            let (path, required) = match std::env::var_os("COUCHREAD") {
                Some(path) => (PathBuf::from(path), true),
                None => {
                    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
                    let beside = manifest.ancestors().nth(2).unwrap_or(manifest);
                    (beside.join("shared/tools/couchread.py"), false)
                }
            };
            let mut missing = Vec::new();
            if !path.is_file() {
                missing.push(format!("{} not found", path.display()));
            }
            match Command::new("python3").arg("--version").output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => missing.push(format!("`python3 --version` failed ({})", out.status)),
                Err(e) => missing.push(format!("python3 cannot be run ({e})")),
            }
            if missing.is_empty() {
                return Ok(path);
            }
            let reason = missing.join("; ");
            assert!(
                !required,
                "COUCHREAD is set but the cross-check cannot run: {reason}"
            );
            // Straight to stderr: the harness hides `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: the couchread.py cross-check in `{}` did not run: {reason} \
                 (set COUCHREAD to the reader's path to require it)",
                env!("CARGO_CRATE_NAME")
            );
            Err(reason)
        })
        .as_deref()
        .ok()
}
