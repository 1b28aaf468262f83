//! `ferry` command line: parses arguments and dispatches; the work is in the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ferry_client::mount::{
    MountOpts, Passthrough, default_cache_dir, mount_background, mount_foreground, parse_size,
    unmount,
};
use ferry_client::{cli, conn::Client, remote_addr};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Mount and use a ferryd export")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount REMOTE (host[:port]) on MOUNTPOINT; returns once the mount is usable.
    Mount {
        remote: String,
        mountpoint: PathBuf,
        /// Stay attached; Ctrl-C unmounts.
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Let other local users use the mount (permissions are checked as on a local disk).
        #[arg(long)]
        allow_other: bool,
        /// Seconds without any answer from the server before its operations fail with EIO.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Append the daemon's log to this file (background mode).
        #[arg(long)]
        log: Option<PathBuf>,
        /// I/O worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Where file data is cached (default: ~/.cache/ferry); one folder per export.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Hard cap on cached file data (K, M, G, T suffixes).
        #[arg(long, default_value = "10G", value_parser = parse_size)]
        cache_size: u64,
        /// Free space the data cache leaves on its filesystem: below it, the cache gives
        /// space back (least recently used first), whatever its size (K, M, G, T).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        cache_min_free: u64,
        /// Do not cache file data on disk.
        #[arg(long)]
        no_cache: bool,
        /// Forward extended attributes (getfattr/setfattr). Off by default: `ls -l` probes
        /// two xattrs per file and the kernel never caches the answers.
        #[arg(long)]
        xattrs: bool,
        /// Let the kernel read fully cached files (1 MiB and up) straight from the data
        /// cache, at local-disk speed (FUSE passthrough; needs root and Linux 6.9+).
        /// `auto`: wherever available; `on`: the same, with a warning where it is not.
        #[arg(long, value_enum, default_value_t = Passthrough::Auto)]
        passthrough: Passthrough,
        /// Wait for the server before `unlink` returns. By default an unlink this mount
        /// can tell will succeed returns at once and the server applies it in order with
        /// everything after it (`rm -rf` does not wait one round trip per file); if the
        /// server refuses it after all, the file reappears and the next `fsync` of its
        /// directory reports the error.
        #[arg(long)]
        sync_unlink: bool,
        /// Keep a file's uncommitted writes past 8 MiB in the cache directory (up to
        /// --cache-size), so that its close still succeeds after a server restart during
        /// a large copy. Costs a local copy of those bytes (CPU, page cache).
        #[arg(long)]
        spool_writes: bool,
        #[arg(long, hide = true)]
        ready_pipe: bool,
    },
    /// Unmount a ferry mount.
    Umount { mountpoint: PathBuf },
    /// List a remote directory (the seed's `dir`).
    Ls {
        remote: String,
        path: Option<String>,
    },
    /// Download a remote file.
    Get {
        remote: String,
        path: String,
        local: Option<PathBuf>,
    },
    /// Upload a local file (atomically replaces the remote one).
    Put {
        remote: String,
        local: PathBuf,
        path: Option<String>,
    },
    /// Interactive session: dir / get / put / help / close.
    Shell { remote: String },
    /// Counters of a mount: requests, bytes, cache hits and misses, events.
    Stats {
        mountpoint: PathBuf,
        /// Print JSON instead of aligned text.
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ferry_client=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::Mount {
            remote,
            mountpoint,
            foreground,
            allow_other,
            timeout,
            log,
            threads,
            cache_dir,
            cache_size,
            cache_min_free,
            no_cache,
            xattrs,
            passthrough,
            sync_unlink,
            spool_writes,
            ready_pipe,
        } => {
            let cache_dir = if no_cache {
                None
            } else {
                Some(cache_dir.unwrap_or_else(default_cache_dir))
            };
            let opts = MountOpts {
                remote: remote_addr(&remote),
                mountpoint,
                allow_other,
                timeout: Duration::from_secs(timeout.max(1)),
                log,
                threads,
                cache_dir: cache_dir.clone(),
                cache_size,
                cache_min_free,
                xattrs,
                passthrough,
                sync_unlink,
                spool_writes,
            };
            if foreground {
                mount_foreground(&opts, ready_pipe)
            } else {
                let mut child: Vec<OsString> = vec!["mount".into(), opts.remote.clone().into()];
                child.push(
                    std::fs::canonicalize(&opts.mountpoint)
                        .unwrap_or(opts.mountpoint.clone())
                        .into(),
                );
                child.extend([
                    "--timeout".into(),
                    timeout.to_string().into(),
                    "--threads".into(),
                    threads.to_string().into(),
                ]);
                if allow_other {
                    child.push("--allow-other".into());
                }
                if xattrs {
                    child.push("--xattrs".into());
                }
                if sync_unlink {
                    child.push("--sync-unlink".into());
                }
                if spool_writes {
                    child.push("--spool-writes".into());
                }
                child.extend(["--passthrough".into(), passthrough.to_string().into()]);
                match &cache_dir {
                    Some(d) => {
                        let d = std::path::absolute(d).unwrap_or(d.clone());
                        child.extend([
                            "--cache-dir".into(),
                            d.into(),
                            "--cache-size".into(),
                            cache_size.to_string().into(),
                            "--cache-min-free".into(),
                            cache_min_free.to_string().into(),
                        ]);
                    }
                    None => child.push("--no-cache".into()),
                }
                mount_background(&opts, &child)
            }
        }
        Cmd::Umount { mountpoint } => unmount(&mountpoint),
        Cmd::Stats { mountpoint, json } => {
            let stats = ferry_client::stats::query(&mountpoint)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                for (k, v) in stats {
                    println!("{k:<28} {v}");
                }
            }
            Ok(())
        }
        Cmd::Ls { remote, path } => {
            let client = Client::new(remote_addr(&remote), Duration::from_secs(10));
            let mut out = std::io::stdout().lock();
            runtime()?.block_on(cli::ls(&client, path.as_deref().unwrap_or(""), &mut out))
        }
        Cmd::Get {
            remote,
            path,
            local,
        } => {
            let client = Client::new(remote_addr(&remote), Duration::from_secs(10));
            let (p, n) = runtime()?.block_on(cli::get(&client, &path, local.as_deref()))?;
            eprintln!("got {path} -> {} ({n} bytes)", p.display());
            Ok(())
        }
        Cmd::Put {
            remote,
            local,
            path,
        } => {
            let client = Client::new(remote_addr(&remote), Duration::from_secs(10));
            let (p, n) = runtime()?.block_on(cli::put(&client, &local, path.as_deref()))?;
            eprintln!("put {} -> {p:?} ({n} bytes)", local.display());
            Ok(())
        }
        Cmd::Shell { remote } => {
            let client = Client::new(remote_addr(&remote), Duration::from_secs(10));
            let rt = runtime()?;
            rt.block_on(client.connect())?;
            let stdin = std::io::stdin().lock();
            let mut out = std::io::stdout().lock();
            rt.block_on(cli::shell(&client, stdin, &mut out))
        }
    }
}

/// glibc's malloc raises its mmap threshold to the size of each large block freed, up
/// to 32 MiB: the 1 MiB buffers of FUSE requests and server frames then come from the
/// heap, where they fragment it and the daemon's memory grows with the data that
/// passed (60 to 108 MiB peak while copying 1 GiB inside the mount, 40 to 55 MiB with
/// a fixed threshold). A fixed threshold keeps those buffers on the heap, reused.
///
/// It is twice the largest frame: a `Data` frame is `MAX_IO` (4 MiB) of bytes plus its
/// header, read into a buffer that grows by doubling. At 4 MiB each such buffer was a
/// fresh map of its own, faulted in and zeroed page by page and unmapped again: a
/// third of the daemon's CPU in a cold sequential read (session 26: 1 GiB cold in
/// 2.98-3.33 s at 4 MiB, 2.39-2.96 s at 16 MiB; peak memory copying 4 GiB inside the
/// mount 56.6 -> 73.7 MiB).
fn fix_malloc_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        // (glibc refuses more than 32 MiB: `MAX_FRAME` must stay at 16 MiB or less.)
        let threshold = 2 * ferry_common::proto::MAX_FRAME;
        let set = libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            i32::try_from(threshold).unwrap_or(i32::MAX),
        );
        if set != 1 {
            eprintln!("ferry: warning: malloc refused an mmap threshold of {threshold} bytes");
        }
    }
}

fn main() -> ExitCode {
    fix_malloc_threshold();
    let args = Args::parse();
    // A daemon reporting through its readiness pipe: the parent prints the reason.
    let quiet = matches!(
        args.cmd,
        Cmd::Mount {
            ready_pipe: true,
            ..
        }
    );
    init_tracing();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !quiet {
                eprintln!("ferry: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
