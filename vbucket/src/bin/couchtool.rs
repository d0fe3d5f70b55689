//! `couchtool`: inspects, checks and compacts couchstore files. See the `vbucket`
//! crate's documentation and `couchtool --help`; the work is done by
//! [`vbucket::tool`].

use clap::{Args, Parser, Subcommand};
use couchfile::OpenMode;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use vbucket::tool::{self, AsOf, OpenOptions, Outcome};

/// The binary's allocator: glibc's malloc and free of every body copied
/// had been 6% of `couchtool compact`'s samples.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Inspects, checks and compacts couchstore files.
#[derive(Debug, Parser)]
#[command(
    name = "couchtool",
    version,
    about,
    after_help = "Examples:\n  \
                  couchtool info 0.couch.1\n  \
                  couchtool dump --jsonl 0.couch.1 > listing.jsonl\n  \
                  couchtool verify 0.couch.1\n  \
                  couchtool compact 0.couch.1 /tmp/0.couch.2\n\n\
                  Exit status: 0 when all is well, 1 on an error or a problem found."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which header to open.
#[derive(Debug, Args)]
struct Open {
    /// Skip a corrupt last header and fall back to an older one.
    #[arg(long)]
    recovery: bool,
    /// Open at the header whose block starts at this offset.
    #[arg(long, value_name = "OFFSET", conflicts_with_all = ["as_of_seq", "as_of_time"])]
    header_offset: Option<u64>,
    /// Open at the newest header whose update seq is at or below N (a
    /// binary search over the file's headers).
    #[arg(long, value_name = "N", conflicts_with = "as_of_time")]
    as_of_seq: Option<u64>,
    /// Open at the newest header committed at or before T, given in
    /// nanoseconds since the UNIX epoch (the headers' own unit; version 13
    /// and 14 headers have timestamps).
    #[arg(long, value_name = "UNIX_NANOS")]
    as_of_time: Option<u64>,
}

impl Open {
    fn options(&self) -> OpenOptions {
        OpenOptions {
            mode: mode(self.recovery),
            header_offset: self.header_offset,
            as_of: match (self.as_of_seq, self.as_of_time) {
                (Some(seq), _) => Some(AsOf::Seqno(seq)),
                (None, Some(t)) => Some(AsOf::Time(t)),
                (None, None) => None,
            },
        }
    }
}

fn mode(recovery: bool) -> OpenMode {
    if recovery {
        OpenMode::Recovery
    } else {
        OpenMode::Normal
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the header, every document in seq order and the local documents.
    #[command(after_help = "Examples:\n  \
                            couchtool dump 0.couch.1\n  \
                            couchtool dump --jsonl 0.couch.1\n  \
                            couchtool dump --jsonl --recovery --header-offset 172032 0.couch.1\n  \
                            couchtool dump --jsonl --as-of-seq 1200 0.couch.1\n  \
                            couchtool dump --jsonl --as-of-time 1764979200000000000 0.couch.1")]
    Dump {
        /// Print couchstore's JSON Lines listing (one object a line).
        #[arg(long)]
        jsonl: bool,
        #[command(flatten)]
        open: Open,
        /// The couchstore file.
        file: PathBuf,
    },
    /// Lists every header from the one opened back to the oldest.
    #[command(after_help = "Examples:\n  \
                            couchtool headers 0.couch.1\n  \
                            couchtool headers --jsonl --recovery 0.couch.1")]
    Headers {
        /// Print JSON Lines.
        #[arg(long)]
        jsonl: bool,
        /// Skip a corrupt last header and fall back to an older one.
        #[arg(long)]
        recovery: bool,
        /// The couchstore file.
        file: PathBuf,
    },
    /// Summarizes a header: counts, space used, file size, fragmentation.
    #[command(after_help = "Examples:\n  \
                            couchtool info 0.couch.1\n  \
                            couchtool info --header-offset 110592 0.couch.1")]
    Info {
        #[command(flatten)]
        open: Open,
        /// The couchstore file.
        file: PathBuf,
    },
    /// Checks the trees and bodies of a header; exits 1 on any problem.
    #[command(after_help = "Examples:\n  \
                            couchtool verify 0.couch.1\n  \
                            couchtool verify --recovery 0.couch.1")]
    Verify {
        #[command(flatten)]
        open: Open,
        /// The couchstore file.
        file: PathBuf,
    },
    /// Copies a header's documents into a new file, without the old
    /// versions; prints a one-line summary. A version 11 file stays version
    /// 11 (CRC-32) unless --upgrade is given; any other is written as
    /// version 14, as couchstore's couch_compact does.
    #[command(after_help = "Examples:\n  \
                            couchtool compact 0.couch.1 0.couch.2\n  \
                            couchtool compact --drop-deletes 0.couch.1 0.couch.2\n  \
                            couchtool compact --upgrade legacy_v11.couch upgraded.couch\n  \
                            couchtool compact --history-age 1h --history-granularity 5m 0.couch.1 0.couch.2")]
    Compact {
        /// Drop every tombstone (the purge seqno becomes the source's plus
        /// one, as couchstore's DROP_DELETES flag counts purges).
        #[arg(long, conflicts_with = "purge_before_seq")]
        drop_deletes: bool,
        /// Drop the tombstones whose seqno is below N (the purge seqno
        /// becomes the highest seqno dropped).
        #[arg(long, value_name = "N")]
        purge_before_seq: Option<u64>,
        /// Write disk version 14 (CRC-32C) whatever the source's version,
        /// as couchstore's `couch_compact --upgrade` does.
        #[arg(long)]
        upgrade: bool,
        /// Keep the headers of this last stretch of time (before --now),
        /// one per --history-granularity, each listing what the source
        /// header it stands for lists (nothing they see is purged).
        /// DURATION: a number and a unit (ns, us, ms, s, m, h, d).
        #[arg(long, value_name = "DURATION", value_parser = tool::parse_duration, requires = "history_granularity")]
        history_age: Option<std::time::Duration>,
        /// With --history-age: one header (the newest) per period of this
        /// length, periods aligned to the UNIX epoch.
        #[arg(long, value_name = "DURATION", value_parser = tool::parse_duration, requires = "history_age")]
        history_granularity: Option<std::time::Duration>,
        /// With --history-age: the end of the window, in nanoseconds since
        /// the UNIX epoch (default: the clock). The header timestamps come
        /// from the file, so this makes the result reproducible.
        #[arg(long, value_name = "UNIX_NANOS", requires = "history_age")]
        now: Option<u64>,
        #[command(flatten)]
        open: Open,
        /// The couchstore file to compact (opened read-only).
        src: PathBuf,
        /// The new file (must not exist; removed if the compaction fails).
        dst: PathBuf,
    },
    /// Rolls a file back to a seqno: appends the newest header whose
    /// update seq is at or below it again as the newest header (as
    /// couchstore's rewind and commit do) and prints the seqno rolled back
    /// to, or "to zero" (then nothing is written: no header can serve, or
    /// the purge seqno is above N). No store may have the file open.
    #[command(after_help = "Examples:\n  \
                            couchtool rollback 0.couch.3 --to-seq 1200")]
    Rollback {
        /// The couchstore file (rewritten in place: one header appended).
        file: PathBuf,
        /// The seqno to roll back to.
        #[arg(long, value_name = "N")]
        to_seq: u64,
    },
}

fn run(command: &Command, out: &mut dyn Write) -> tool::Result<Outcome> {
    match command {
        Command::Dump { jsonl, open, file } => {
            if *jsonl {
                tool::dump_jsonl(file, &open.options(), out)
            } else {
                tool::dump_text(file, &open.options(), out)
            }
        }
        Command::Headers {
            jsonl,
            recovery,
            file,
        } => {
            if *jsonl {
                tool::headers_jsonl(file, mode(*recovery), out)
            } else {
                tool::headers_text(file, mode(*recovery), out)
            }
        }
        Command::Info { open, file } => tool::info(file, &open.options(), out),
        Command::Verify { open, file } => tool::verify_command(file, &open.options(), out),
        Command::Compact {
            drop_deletes,
            purge_before_seq,
            upgrade,
            history_age,
            history_granularity,
            now,
            open,
            src,
            dst,
        } => {
            let options = tool::CompactOptions {
                open: open.options(),
                drop_deletes: *drop_deletes,
                purge_before_seq: purge_before_seq.unwrap_or(0),
                upgrade: *upgrade,
                history: history_age.map(|max_age| vbucket::History {
                    max_age,
                    granularity: history_granularity.unwrap_or_default(),
                    now: *now,
                }),
            };
            let summary = tool::compact(src, dst, &options)?;
            writeln!(out, "{summary}").map_err(tool::Error::Output)?;
            Ok(Outcome::default())
        }
        Command::Rollback { file, to_seq } => {
            let summary = tool::rollback(file, *to_seq)?;
            writeln!(out, "{summary}").map_err(tool::Error::Output)?;
            Ok(Outcome::default())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = run(&cli.command, &mut out).and_then(|outcome| {
        out.flush().map_err(tool::Error::Output)?;
        Ok(outcome)
    });
    match result {
        Ok(outcome) => {
            for problem in &outcome.problems {
                eprintln!("couchtool: {problem}");
            }
            if outcome.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        // The reader went away (`couchtool dump f | head`): nothing to say.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            // What was listed before the error comes first.
            let _ = out.flush();
            eprintln!("couchtool: {e}");
            ExitCode::FAILURE
        }
    }
}
