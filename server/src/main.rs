//! `ferryd [--listen ADDR] [--read-only] [--threads N] DIR`: parse arguments, set up the
//! process, bind, announce the address on stdout, and hand over to [`ferry_server::run`].
//! Nothing else belongs here; in particular no request handling.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_server::{Export, sys};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Export a directory over the ferry protocol.
#[derive(Debug, Parser)]
#[command(name = "ferryd", version)]
struct Args {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// Refuse every change with EROFS.
    #[arg(long)]
    read_only: bool,
    /// Threads that route requests and run the quick ones (metadata); file I/O, listings
    /// and commits run on a separate pool. Default: half the CPUs, at least one.
    #[arg(long)]
    threads: Option<usize>,
    /// Where undo records of commits in progress are kept, so that a commit a crash
    /// interrupts is rolled back at the next start, and the answers of recent changes,
    /// so that a client repeating one after a restart is answered instead of running it
    /// twice (one folder per export; default: /run/ferryd as root, else
    /// $XDG_RUNTIME_DIR/ferryd or /tmp/ferryd-UID).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// For tests: die (SIGKILL) at the first keyed change of KIND, before or after it
    /// runs: `before-rename`, `after-create`, ... (see `failpoint.rs`).
    #[arg(long, hide = true, value_name = "POINT")]
    die_at: Option<String>,
    /// Watch at most N directories for changes (default: as many as the kernel allows,
    /// `fs.inotify.max_user_watches`). Past the limit, clients are told which of what
    /// they hold may change unreported (older clients: that anything may) and
    /// revalidate that within a second instead of trusting events: correct, but more
    /// round trips.
    #[arg(long, value_name = "N")]
    max_watches: Option<usize>,
    /// For tests: offer no change events, as a server without inotify.
    #[arg(long, hide = true)]
    no_events: bool,
    /// The directory to export.
    dir: PathBuf,
}

/// `--state-dir`'s default: a runtime directory (records guard against the process
/// dying, not the machine, so they need not outlive a reboot).
fn default_state_dir() -> PathBuf {
    if sys::geteuid() == 0 {
        return PathBuf::from("/run/ferryd");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("ferryd"),
        None => std::env::temp_dir().join(format!("ferryd-{}", sys::geteuid())),
    }
}

/// Half the CPUs: the request threads' work is microseconds long, and on a machine as
/// small as 2 CPUs a second one mostly hands tasks back and forth (bench tree, 2 CPUs:
/// one thread cut ferryd's CPU for `rm -rf` by a quarter and untar's by a tenth).
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn main() -> ExitCode {
    // clap exits with status 2 on bad usage.
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.unwrap_or_else(default_threads).max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferryd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(args));
    // A system call stuck in the server's filesystem must not keep the process alive
    // after the drain: blocking tasks cannot be cancelled, only abandoned.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // Modes arrive already masked with the caller's umask; ours must not apply on top.
    sys::clear_umask();
    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!("open file limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
    if let Some(point) = args.die_at.clone() {
        ferry_server::failpoint::set(point).map_err(anyhow::Error::msg)?;
    }
    let export = Arc::new(Export::open(&args.dir, args.read_only)?);
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("local address")?;
    // After the bind: a second start that cannot serve must not touch the records.
    if !args.read_only {
        let base = args.state_dir.clone().unwrap_or_else(default_state_dir);
        match ferry_server::undo::UndoDir::open(&base, export.id()) {
            Ok(undo) => {
                let rolled = undo.recover(&export);
                if rolled > 0 {
                    tracing::warn!(
                        "rolled back or finished {rolled} commit(s) a crash interrupted"
                    );
                }
                // Before serving: the first `Welcome` names the table's instance.
                // A change the last process died in is looked at again where it can be.
                let judge = |p: &_| ferry_server::ops::judge(&export, p);
                match export.answers().keep_in(undo.dir(), &judge) {
                    Ok(r) => {
                        if r.answers > 0 {
                            tracing::info!(
                                torn = r.torn,
                                "took over {} answer(s) of keyed changes from the last run",
                                r.answers
                            );
                        }
                        let d = r.died_in;
                        if d != Default::default() {
                            tracing::info!(
                                "of the changes the last run died in, {} had run, {} had not \
                                 run, {} cannot be told",
                                d.ran,
                                d.not_run,
                                d.unknown
                            );
                        }
                    }
                    Err(e) => tracing::warn!(
                        "cannot keep the answers of keyed changes in {}: {e}; a restart \
                         will forget them",
                        undo.dir().display()
                    ),
                }
                export.set_undo(undo);
            }
            Err(e) => tracing::warn!(
                "no undo records in {}: {e}; a crash during a commit can leave a file torn",
                base.display()
            ),
        }
    }
    // Handlers first: a SIGTERM sent right after the address line must find them.
    let shutdown = shutdown_signal()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ferryd: serving {} on {addr}", export.path().display())
        .and_then(|()| out.flush())
        .context("writing to stdout")?;
    drop(out);
    tracing::info!(
        read_only = args.read_only,
        "serving {} on {addr}",
        export.path().display()
    );
    let options = ferry_server::Options {
        max_watches: args.max_watches,
        no_events: args.no_events,
    };
    ferry_server::run_with(listener, Arc::clone(&export), options, shutdown).await;
    if let Some(undo) = export.undo() {
        undo.close();
    }
    Ok(())
}

/// Installs the SIGINT/SIGTERM handlers now; the future completes on either signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
