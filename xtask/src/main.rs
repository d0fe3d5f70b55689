//! `xtask`: the project's task runner, invoked as `cargo xtask <command>`
//! through the alias in `.cargo/config.toml`. It runs the CI checks, the fuzz
//! targets, the benchmarks and the full crash sweep with the right flags, so
//! that developers and CI run exactly the same commands. It depends on the
//! standard library only, so that it builds in seconds; it is not part of the
//! storage engine and nothing depends on it.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// What `cargo xtask help` prints.
const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  ci                         rustfmt check, clippy (-D warnings), all tests, doc tests,
                             the API docs (rustdoc -D warnings)
  fuzz [--seconds N] [T...]  build the fuzz targets (stable toolchain, libFuzzer) and run
                             each (or only the targets T) for N seconds (default 30)
  bench [ARGS...]            cargo bench --workspace, passing ARGS through
  crash                      the full crash sweep: ignored `crash` tests with CRASH_SWEEP=full
  stress [--schedules N]     the vbucket lifecycle races (open, close and delete against
                             writers and compaction) for N seeded schedules each (default 200)
  help                       this message
";

/// Seconds each fuzz target runs for when `--seconds` is not given.
const DEFAULT_FUZZ_SECONDS: u64 = 30;

/// The instrumentation `cargo fuzz` would add on nightly, spelled with flags that
/// the stable compiler accepts: SanitizerCoverage (the feedback libFuzzer needs)
/// through the LLVM pass, `cfg(fuzzing)`, and debug assertions and overflow
/// checks so that they are found as crashes. No AddressSanitizer: that needs
/// `-Zsanitizer`, which stable refuses; the code denies `unsafe` but for two
/// isolated blocks in couchfile's backend (the memory map and a prefetch
/// hint), so panics (checked indexing, overflow, failed assertions) are what
/// we look for.
const FUZZ_RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// The couchstore test vectors, relative to the workspace root.
const VECTORS_DIR: &str = "testdata/couchstore";

/// Fuzz targets that take a whole file image, and so get the binary couchstore
/// test vectors as seeds.
const FILE_IMAGE_TARGETS: [&str; 4] = ["read_chunks", "find_header", "read_db", "open_vbucket"];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        "ci" => no_args("ci", rest).and_then(|()| ci()),
        "fuzz" => fuzz(rest),
        "bench" => bench(rest),
        "crash" => no_args("crash", rest).and_then(|()| crash()),
        "stress" => stress(rest),
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Fails if a command that takes no arguments was given some.
fn no_args(command: &str, rest: &[String]) -> Result<(), String> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`{command}` takes no arguments, got: {}",
            rest.join(" ")
        ))
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> Result<PathBuf, String> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "xtask's manifest directory has no parent".to_string())
}

/// A `cargo` command run from the workspace root. Uses the `cargo` that
/// launched us (`$CARGO`) when there is one, so toolchain overrides carry over.
fn cargo(root: &Path) -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root);
    cmd
}

/// Renders a command (with the environment variables it sets) for messages.
fn describe(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            value.map(|v| format!("{}={}", key.to_string_lossy(), v.to_string_lossy()))
        })
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs a command to completion with inherited stdio; an error if it cannot be
/// started or exits unsuccessfully.
fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = describe(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})"))
    }
}

/// Runs one named step, printing its name and how long it took.
fn step(name: &str, cmd: &mut Command) -> Result<(), String> {
    println!("==> {name}");
    let start = Instant::now();
    let result = run(cmd);
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!("<== {name}: ok in {secs:.1}s");
            Ok(())
        }
        Err(e) => Err(format!("step `{name}` failed after {secs:.1}s: {e}")),
    }
}

/// `cargo xtask ci`: formatting, lints, tests and doc tests, stopping at the
/// first failure. Says before and after whether the tests' extra
/// cross-check against `couchread.py` runs (see [`couchread_status`]).
fn ci() -> Result<(), String> {
    let root = workspace_root()?;
    let start = Instant::now();
    let couchread = match couchread_status(&root) {
        Ok(reader) => format!("the couchread.py cross-check ran ({})", reader.display()),
        Err(reason) => format!("the couchread.py cross-check was SKIPPED: {reason}"),
    };
    println!("ci: {couchread}");
    step("fmt", cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
    step(
        "clippy",
        cargo(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "test",
        cargo(&root).args(["test", "--workspace", "--all-targets", "--locked"]),
    )?;
    step(
        "doc tests",
        cargo(&root).args(["test", "--workspace", "--doc", "--locked"]),
    )?;
    // The API docs build without a warning (a broken or private link).
    step(
        "docs",
        cargo(&root)
            .args(["doc", "--workspace", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    println!(
        "ci: all steps passed in {:.1}s; {couchread}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether the tests can cross-check the files they write with the
/// independent Python reader, as they decide it: the reader is
/// `$COUCHREAD` when set, else `shared/tools/couchread.py` beside the
/// workspace, and it needs `python3`. `Err` gives what is missing.
fn couchread_status(root: &Path) -> Result<PathBuf, String> {
    let reader = match env::var_os("COUCHREAD") {
        Some(path) => PathBuf::from(path),
        None => root
            .parent()
            .unwrap_or(root)
            .join("shared/tools/couchread.py"),
    };
    let mut missing = Vec::new();
    if !reader.is_file() {
        missing.push(format!("{} not found", reader.display()));
    }
    match Command::new("python3").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => missing.push(format!("`python3 --version` failed ({})", out.status)),
        Err(e) => missing.push(format!("python3 cannot be run ({e})")),
    }
    if missing.is_empty() {
        Ok(reader)
    } else {
        Err(missing.join("; "))
    }
}

/// `cargo xtask bench [ARGS...]`: the workspace's benchmarks.
fn bench(args: &[String]) -> Result<(), String> {
    let root = workspace_root()?;
    step(
        "bench",
        cargo(&root).args(["bench", "--workspace"]).args(args),
    )
}

/// `cargo xtask crash`: the full crash sweep, i.e. the ignored tests whose
/// names contain `crash`, with `CRASH_SWEEP=full` (the tests read it to try
/// every crash point instead of a sample).
fn crash() -> Result<(), String> {
    let root = workspace_root()?;
    step(
        "crash sweep",
        cargo(&root).env("CRASH_SWEEP", "full").args([
            "test",
            "--release",
            "--workspace",
            "--",
            "--ignored",
            "crash",
        ]),
    )
}

/// Schedules each lifecycle race runs under `cargo xtask stress` by default
/// (CI runs 3).
const DEFAULT_STRESS_SCHEDULES: u64 = 200;

/// `cargo xtask stress [--schedules N]`: the lifecycle race tests of
/// `vbucket/tests/lifecycle.rs`, in release mode, each for N seeded random
/// schedules (a failure prints the seed; `LIFECYCLE_SEED=<hex>` replays it).
fn stress(args: &[String]) -> Result<(), String> {
    let schedules = match args {
        [] => DEFAULT_STRESS_SCHEDULES,
        [flag, n] if flag == "--schedules" => {
            n.parse().map_err(|e| format!("--schedules {n}: {e}"))?
        }
        _ => {
            return Err(format!(
                "usage: cargo xtask stress [--schedules N]\n\n{USAGE}"
            ))
        }
    };
    let root = workspace_root()?;
    step(
        "lifecycle stress",
        cargo(&root)
            .env("LIFECYCLE_SCHEDULES", schedules.to_string())
            .args([
                "test",
                "--release",
                "-p",
                "vbucket",
                "--test",
                "lifecycle",
                "--",
                "racing",
                "--nocapture",
            ]),
    )
}

/// `cargo xtask fuzz [--seconds N] [TARGET...]`.
///
/// `fuzz/` is a standalone cargo package (its own `[workspace]`, excluded from
/// ours) using `libfuzzer-sys`. It is built on the stable toolchain with
/// [`FUZZ_RUSTFLAGS`]; `--target <host>` is passed so those flags reach only
/// the fuzz binaries and not build scripts (which would fail to link without
/// the libFuzzer runtime), which is also why the binaries land in
/// `fuzz/target/<host>/release/`. Each target then runs as
/// `<binary> -max_total_time=N -artifact_prefix=fuzz/artifacts/<name>/
/// fuzz/corpus/<name> [fuzz/seeds/<name>]`; crash inputs are written to
/// `fuzz/artifacts/<name>/`.
fn fuzz(args: &[String]) -> Result<(), String> {
    let (seconds, wanted) = parse_fuzz_args(args)?;
    let root = workspace_root()?;
    let fuzz_dir = root.join("fuzz");
    let manifest = fuzz_dir.join("Cargo.toml");
    let all = fuzz_targets(&manifest)?;
    if all.is_empty() {
        return Err(format!("no [[bin]] targets in {}", manifest.display()));
    }
    let targets: Vec<String> = if wanted.is_empty() {
        all.clone()
    } else {
        for name in &wanted {
            if !all.contains(name) {
                return Err(format!(
                    "no fuzz target `{name}`; the targets are: {}",
                    all.join(", ")
                ));
            }
        }
        wanted
    };

    for name in &targets {
        create_dir(&fuzz_dir.join("corpus").join(name))?;
        create_dir(&fuzz_dir.join("artifacts").join(name))?;
    }
    copy_vector_seeds(&root, &fuzz_dir, &targets)?;

    let host = host_triple()?;
    step(
        "build fuzz targets",
        cargo(&root)
            .env("RUSTFLAGS", FUZZ_RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(["build", "--release", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(fuzz_dir.join("target"))
            .args(["--target", &host, "--bins"]),
    )?;

    let bin_dir = fuzz_dir.join("target").join(&host).join("release");
    let mut failed = Vec::new();
    for name in &targets {
        let mut cmd = Command::new(bin_dir.join(name));
        cmd.current_dir(&root)
            .arg(format!("-max_total_time={seconds}"))
            .arg(prefixed_path(
                "-artifact_prefix=",
                &fuzz_dir.join("artifacts").join(name),
                true,
            ))
            .arg(fuzz_dir.join("corpus").join(name));
        let seeds = fuzz_dir.join("seeds").join(name);
        if seeds.is_dir() {
            cmd.arg(seeds);
        }
        if let Err(e) = step(&format!("fuzz {name} ({seconds}s)"), &mut cmd) {
            eprintln!("xtask: fuzz target `{name}` failed: {e}");
            eprintln!(
                "xtask: the crashing input is in {}",
                fuzz_dir.join("artifacts").join(name).display()
            );
            failed.push(name.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz targets failed: {}", failed.join(", ")))
    }
}

/// Parses `[--seconds N | --seconds=N] [TARGET...]`.
fn parse_fuzz_args(args: &[String]) -> Result<(u64, Vec<String>), String> {
    let mut seconds = DEFAULT_FUZZ_SECONDS;
    let mut targets = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let value = if arg == "--seconds" {
            Some(
                iter.next()
                    .ok_or_else(|| "`--seconds` needs a value".to_string())?
                    .as_str(),
            )
        } else {
            arg.strip_prefix("--seconds=")
        };
        match value {
            Some(v) => {
                seconds =
                    v.parse().ok().filter(|&n: &u64| n > 0).ok_or_else(|| {
                        format!("`--seconds` wants a positive integer, got `{v}`")
                    })?;
            }
            None if arg.starts_with('-') => {
                return Err(format!("unknown option `{arg}` for `fuzz`\n\n{USAGE}"));
            }
            None => targets.push(arg.clone()),
        }
    }
    Ok((seconds, targets))
}

/// The names of the `[[bin]]` entries of the fuzz package's manifest.
///
/// A deliberately small reader, to keep xtask free of dependencies: it takes
/// the first quoted string of each `name = "..."` line inside a `[[bin]]`
/// table, which is how `fuzz/Cargo.toml` is written.
fn fuzz_targets(manifest: &Path) -> Result<Vec<String>, String> {
    let text = fs::read_to_string(manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if !in_bin {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() != "name" {
            continue;
        }
        let name = value
            .split('"')
            .nth(1)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("cannot read the bin name in `{line}`"))?;
        names.push(name.to_string());
    }
    Ok(names)
}

/// The host's target triple, as `rustc -vV` reports it.
fn host_triple() -> Result<String, String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("could not run `rustc -vV`: {e}"))?;
    if !output.status.success() {
        return Err(format!("`rustc -vV` failed ({})", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(|host| host.trim().to_string())
        .ok_or_else(|| "`rustc -vV` did not report a host triple".to_string())
}

/// Whether a file in the couchstore vectors directory is a binary file image:
/// `*.couch` or `*.couch.<rev>`, not the `.txt`/`.jsonl` files describing them.
fn is_binary_vector(file_name: &str) -> bool {
    if file_name.ends_with(".couch") {
        return true;
    }
    match file_name.rsplit_once(".couch.") {
        Some((_, rev)) => !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Copies the binary couchstore test vectors (`testdata/couchstore` in the
/// repository) into the corpus of the file-image targets being run, leaving
/// files already there alone.
fn copy_vector_seeds(root: &Path, fuzz_dir: &Path, targets: &[String]) -> Result<(), String> {
    let vectors = root.join(VECTORS_DIR);
    let entries = fs::read_dir(&vectors).map_err(|e| {
        format!(
            "cannot read the couchstore vectors in {}: {e}",
            vectors.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", vectors.display()))?;
        let name = entry.file_name();
        if entry.path().is_file() && name.to_str().is_some_and(is_binary_vector) {
            files.push((entry.path(), name));
        }
    }
    for target in targets
        .iter()
        .filter(|t| FILE_IMAGE_TARGETS.contains(&t.as_str()))
    {
        let corpus = fuzz_dir.join("corpus").join(target);
        for (source, name) in &files {
            let dest = corpus.join(name);
            if !dest.exists() {
                copy_seed(source, &dest)?;
            }
        }
    }
    Ok(())
}

/// Copies one seed file. Written afresh rather than with `fs::copy`, which
/// would carry over the vectors' read-only mode into a corpus that libFuzzer
/// manages (it replaces inputs with smaller ones that cover the same).
fn copy_seed(source: &Path, dest: &Path) -> Result<(), String> {
    let fail =
        |e: std::io::Error| format!("copying {} to {}: {e}", source.display(), dest.display());
    let bytes = fs::read(source).map_err(fail)?;
    fs::write(dest, bytes).map_err(fail)
}

/// `fs::create_dir_all` with the path in the error.
fn create_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// `prefix` followed by `path` (and a trailing `/` if `dir`), as one argument.
fn prefixed_path(prefix: &str, path: &Path, dir: bool) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(prefix);
    arg.push(path.as_os_str());
    if dir {
        arg.push(OsStr::new("/"));
    }
    arg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_vectors_are_recognised() {
        for name in [
            "0.couch.1",
            "0.couch.2",
            "0.couch.3",
            "torn_tail.couch",
            "legacy_v11.couch",
        ] {
            assert!(is_binary_vector(name), "{name}");
        }
        for name in [
            "0.couch.1.dump.txt",
            "0.couch.1.expect.jsonl",
            "torn_tail.couch.probe.jsonl",
            "README.md",
            "expected.txt",
            "0.couch.",
        ] {
            assert!(!is_binary_vector(name), "{name}");
        }
    }

    #[test]
    fn the_vectors_are_in_the_repository() -> Result<(), String> {
        let dir = workspace_root()?.join(VECTORS_DIR);
        let mut binary: Vec<String> = fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| is_binary_vector(name))
            .collect();
        binary.sort();
        assert_eq!(
            binary,
            [
                "0.couch.1",
                "0.couch.2",
                "0.couch.3",
                "flipped_body_bit.couch",
                "flipped_header_bit.couch",
                "legacy_v11.couch",
                "torn_tail.couch",
                "unfinished_header.couch",
            ]
        );
        Ok(())
    }

    #[test]
    fn fuzz_args() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_fuzz_args(&args(&[])),
            Ok((DEFAULT_FUZZ_SECONDS, vec![]))
        );
        assert_eq!(
            parse_fuzz_args(&args(&["--seconds", "5", "read_chunks"])),
            Ok((5, vec!["read_chunks".to_string()]))
        );
        assert_eq!(parse_fuzz_args(&args(&["--seconds=7"])), Ok((7, vec![])));
        assert!(parse_fuzz_args(&args(&["--seconds"])).is_err());
        assert!(parse_fuzz_args(&args(&["--seconds", "0"])).is_err());
        assert!(parse_fuzz_args(&args(&["--seconds", "x"])).is_err());
        assert!(parse_fuzz_args(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn bins_are_read_from_the_manifest() -> Result<(), String> {
        let dir = env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        create_dir(&dir)?;
        let manifest = dir.join("Cargo.toml");
        fs::write(
            &manifest,
            "[package]\nname = \"fuzz\"\n\n[[bin]]\nname = \"a\" # x\npath = \"a.rs\"\n\n\
             [dependencies]\nname = \"nope\"\n\n[[bin]]\npath = \"b.rs\"\nname=\"b\"\n",
        )
        .map_err(|e| e.to_string())?;
        let names = fuzz_targets(&manifest);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(names?, vec!["a".to_string(), "b".to_string()]);
        Ok(())
    }
}
