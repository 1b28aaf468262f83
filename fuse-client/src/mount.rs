//! `ferry mount` and `ferry umount`: checks, the background daemon, the FUSE session.
//!
//! Like sshfs, `ferry mount` returns 0 only once the mount answers: it starts itself again
//! as a detached daemon (`--foreground` plus a hidden readiness flag), and the daemon
//! reports `ready` or a one-line error on a pipe after connecting to the server and
//! completing the kernel's INIT. The daemon lives until the filesystem is unmounted
//! (`ferry umount`, `umount`, SIGINT/SIGTERM).
//!
//! Must never leave a mount behind on a failed start, and never report success before the
//! kernel would route a `stat` of the mountpoint to us.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fuser::{Config, INodeNo, MountOption, SessionACL};

use crate::cache::DataCache;
use crate::conn::Client;
use crate::fs::{Core, Invalidation};
use crate::fuse::FerryFuse;

/// The line the daemon prints on its readiness pipe when the mount is usable.
const READY: &str = "ferry-ready";

#[derive(Debug, Clone)]
pub struct MountOpts {
    pub remote: String,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub timeout: Duration,
    pub log: Option<PathBuf>,
    pub threads: usize,
    /// `None`: no data cache.
    pub cache_dir: Option<PathBuf>,
    pub cache_size: u64,
    /// Free space the data cache leaves on its filesystem.
    pub cache_min_free: u64,
    /// Forward extended attributes (see `FerryFuse`).
    pub xattrs: bool,
    /// When the kernel may read fully cached files from the data cache (FUSE
    /// passthrough; needs root, see `crate::passthrough`).
    pub passthrough: Passthrough,
    /// Every unlink waits for the server (see `Core::unlink`).
    pub sync_unlink: bool,
    /// Uncommitted writes past what memory keeps go to spool files (see
    /// `Core::spool_writes`).
    pub spool_writes: bool,
}

/// `ferry mount --passthrough`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Passthrough {
    /// On wherever the kernel offers it to this process (root, Linux 6.9+, a data cache;
    /// on a writable export, a cache directory whose filesystem dates stores through
    /// memory maps, which tmpfs does not).
    Auto,
    /// As `auto`, and says so (a warning) where it cannot be on.
    On,
    Off,
}

impl std::fmt::Display for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Passthrough::Auto => "auto",
            Passthrough::On => "on",
            Passthrough::Off => "off",
        })
    }
}

/// Default cache location: `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("ferry");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache").join("ferry"),
        None => PathBuf::from("/var/cache/ferry"),
    }
}

/// `10G`, `512M`, `4096` (bytes) → bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    if n < 0.0 {
        return Err(format!("negative size: {s:?}"));
    }
    Ok((n * mult as f64) as u64)
}

/// Check everything that can be checked before touching the server or the kernel.
fn preflight(mp: &Path) -> Result<PathBuf> {
    let abs = match std::fs::canonicalize(mp) {
        Ok(abs) => abs,
        // The mountpoint itself cannot be resolved: its parent is, so that the path
        // matches the one mountinfo lists.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let abs = std::path::absolute(mp)?;
            match (abs.parent(), abs.file_name()) {
                (Some(parent), Some(name)) => std::fs::canonicalize(parent)
                    .map_err(|e| anyhow!("mountpoint {}: {e}", mp.display()))?
                    .join(name),
                _ => abs,
            }
        }
        Err(e) => bail!("mountpoint {}: {e}", mp.display()),
    };
    // A dead mount's attributes may still be cached by the kernel (a ferry mount's root
    // for minutes): its listing is what fails.
    if let Some(e) = dead_mount_error(&abs) {
        remove_dead_mount(&abs, &e)?;
    }
    if !abs.is_dir() {
        bail!("mountpoint {} is not a directory", abs.display());
    }
    let mut entries =
        std::fs::read_dir(&abs).map_err(|e| anyhow!("mountpoint {}: {e}", abs.display()))?;
    if entries.next().is_some() {
        bail!("mountpoint {} is not empty", abs.display());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available"
        );
    }
    Ok(abs)
}

/// The `ENOTCONN` of a mount at `abs` whose connection is gone, if it is one.
fn dead_mount_error(abs: &Path) -> Option<std::io::Error> {
    let dead = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    match std::fs::metadata(abs) {
        Err(e) if dead(&e) => Some(e),
        Ok(md) if md.is_dir() => std::fs::read_dir(abs).err().filter(dead),
        _ => None,
    }
}

/// A mount at `abs` whose connection is gone (`ENOTCONN`: its daemon crashed or was
/// killed). A ferry mount is unmounted, with a line saying so: nothing can serve it
/// again, and mounting anew is what its user is after. Any other is the user's to
/// remove, and the error says how. (A live ferry mount never answers `ENOTCONN`: the
/// client maps a server's to `EIO`.) Never detached: a busy one stays, and the error
/// says so.
fn remove_dead_mount(abs: &Path, e: &std::io::Error) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let line = mount_line(&info, abs);
    let dev = line.and_then(|line| line.split(' ').nth(2));
    let source = line
        .and_then(|line| line.split_once(" - "))
        .and_then(|(_, rest)| rest.split(' ').nth(1));
    match source {
        Some(source) if source.starts_with("ferry:") => {
            // Still the same mount, still dead: not one mounted there since the check.
            let still_dead = dead_mount_error(abs).is_some() && top_dev(abs).as_deref() == dev;
            if !still_dead {
                bail!(
                    "mountpoint {} changed while it was checked; try again",
                    abs.display()
                );
            }
            eprintln!(
                "ferry: unmounting the ferry mount left at {} by a daemon that is gone ({e})",
                abs.display()
            );
            unmount(abs)
        }
        _ => bail!(
            "mountpoint {} is a mount whose server is gone ({e}): unmount it first \
             (`umount`, or `fusermount3 -u` as its owner)",
            abs.display()
        ),
    }
}

/// `ferry mount` without `--foreground`: start the daemon, wait for its verdict.
pub fn mount_background(opts: &MountOpts, args: &[std::ffi::OsString]) -> Result<()> {
    let abs = preflight(&opts.mountpoint)?;
    let exe = std::env::current_exe().context("cannot find the ferry executable")?;
    let stderr = match &opts.log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open log file {}", p.display()))?,
        ),
        // Keep complaints visible when stderr is a log file (scripts, tests); a terminal
        // is left alone, as the daemon outlives the command. A pipe gets the complaints
        // up to the mount's verdict, then the daemon lets go of it (`serve`).
        // SAFETY: isatty only inspects the descriptor.
        None if unsafe { libc::isatty(2) } == 1 => Stdio::null(),
        None => Stdio::inherit(),
    };
    let mut child = Command::new(exe)
        .args(args)
        .arg("--foreground")
        .arg("--ready-pipe")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        // Its own process group: a Ctrl-C meant for the shell does not unmount.
        .process_group(0)
        // Never keep the caller's cwd busy.
        .current_dir("/")
        .env("FERRY_MOUNTPOINT", &abs)
        .spawn()
        .context("cannot start the mount daemon")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no pipe to the mount daemon"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let wait = opts.timeout * 2 + Duration::from_secs(20);
    match rx.recv_timeout(wait) {
        Ok(line) if line.trim() == READY => Ok(()),
        Ok(line) if !line.trim().is_empty() => {
            let _ = child.wait();
            bail!("{}", line.trim().trim_start_matches("error: "))
        }
        Ok(_) => {
            let status = child.wait()?;
            bail!(
                "mount daemon exited ({status}) before the mount was ready; rerun with --foreground to see why"
            )
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            // The daemon's mount, if it made one, is dead now; nothing else is touched.
            if dead_mount_error(&abs).is_some() {
                let _ = unmount(&abs);
            }
            bail!("mount did not become ready within {wait:?}")
        }
    }
}

/// Whether fd 2 is a pipe or a socket: a reader there (a shell's `| cat`, `$(…)`, a
/// script capturing output) waits until every writer closed it, and the daemon would
/// otherwise hold it until the unmount. (libfuse's `fuse_daemonize`, so sshfs, detaches too.)
/// Not the journal's socket (a systemd unit's stderr, named by `JOURNAL_STREAM`): nobody
/// waits for that one to close, and it is where the daemon's log belongs.
fn stderr_is_a_pipe() -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat on a plain fd number with a valid out pointer.
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: initialized by the successful call above.
    let st = unsafe { st.assume_init() };
    match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => true,
        libc::S_IFSOCK => {
            let journal = std::env::var("JOURNAL_STREAM").unwrap_or_default();
            journal != format!("{}:{}", st.st_dev, st.st_ino)
        }
        _ => false,
    }
}

/// Run the filesystem in this process until it is unmounted. With `ready_pipe`, the
/// verdict goes to stdout (read by [`mount_background`]) and stdout is closed after.
pub fn mount_foreground(opts: &MountOpts, ready_pipe: bool) -> Result<()> {
    let result = serve(opts, ready_pipe);
    if let Err(e) = &result
        && ready_pipe
    {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "error: {e:#}");
        let _ = out.flush();
    }
    result
}

/// The daemon's memory stays flat over a long copy: glibc gives every thread that
/// allocates its own arena and keeps freed request buffers (1 MiB each) in them; two
/// arenas are plenty here. (Measured with `bench/run.sh --only mem --big-mib 4096`: peak
/// RSS 106 MiB before, 91 MiB with this alone; forcing large buffers to `mmap` brought it
/// to 61 MiB but cost about a third of the sequential throughput.)
fn limit_allocator_retention() {
    // SAFETY: mallopt only changes allocator tuning; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn serve(opts: &MountOpts, ready_pipe: bool) -> Result<()> {
    limit_allocator_retention();
    let abs = match std::env::var_os("FERRY_MOUNTPOINT") {
        Some(p) => PathBuf::from(p),
        None => preflight(&opts.mountpoint)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads.max(1))
        .thread_name("ferry-io")
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;
    let client = Client::new(opts.remote.clone(), opts.timeout);
    // Whether a file has xattrs matters only to a mount that forwards them.
    client.want_xattr_hints(opts.xattrs);
    rt.block_on(client.connect()).map_err(|e| anyhow!("{e}"))?;
    let welcome = client.welcome().ok_or_else(|| anyhow!("no handshake"))?;
    let cache = opts
        .cache_dir
        .as_deref()
        .and_then(|dir| open_cache(dir, welcome.export_id, opts))
        .map(Arc::new);
    let core = Core::new(client.clone(), &welcome.root, welcome.max_io, cache.clone());
    core.subscribe();
    core.set_unlink_behind(!opts.sync_unlink);
    if opts.spool_writes {
        core.spool_writes();
    }
    let fs = FerryFuse::new(
        core.clone(),
        rt.handle().clone(),
        welcome.read_only,
        opts.xattrs,
        passthrough_wanted(opts.passthrough, cache.as_deref(), welcome.read_only),
    );

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("ferry:{}", opts.remote)),
        MountOption::Subtype("ferry".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if welcome.read_only {
        config.mount_options.push(MountOption::RO);
    }
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(1);

    // Handled from before the mount exists (a signal meanwhile waits for the handler):
    // a signal while it is set up, or right after `ferry mount` returned, must not kill
    // the daemon and leave its mount dead. (Before this, one still ends a slow connect.)
    let (mut int, mut term) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _in_rt = rt.enter();
        (
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        )
    };
    let dev = mount_fuse(&abs, &config)?;
    let ours = OurMount::new(&abs);
    if ours.dev.is_none() {
        let _ = unmount(&abs);
        bail!(
            "mounted on {}, but the mount is not in /proc/self/mountinfo under that path",
            abs.display()
        );
    }
    // Until the session serves it, a failure must not leave the mount behind, dead.
    let undo_mount = |e: anyhow::Error| {
        let _ = unmount(&abs).or_else(|_| detach(&abs));
        e.context(format!("cannot mount on {}", abs.display()))
    };
    let probe_fd = dev
        .try_clone()
        .context("cannot dup /dev/fuse")
        .map_err(undo_mount)?;
    let acl = config.acl;
    let session = fuser::Session::from_fd(fs, dev, acl, config)
        .map_err(|e| undo_mount(anyhow::Error::from(e)))?;
    tracing::info!(remote = %opts.remote, mountpoint = %abs.display(), "mounted");
    // Set by whichever ends the daemon first: the session loop returning, or a signal
    // for a mount that is no longer on top at its path.
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Kernel invalidations go through one thread of their own (see fs/events.rs).
    let (inv_tx, inv_rx) = std::sync::mpsc::channel::<Invalidation>();
    let notifier = session.notifier();
    let now = notifier.clone();
    core.set_invalidator(
        inv_tx,
        Box::new(move |ino| {
            let _ = now.inval_inode(INodeNo(ino), -1, 0);
        }),
    );
    core.set_runtime(rt.handle().clone());
    let acker = core.clone();
    std::thread::Builder::new()
        .name("ferry-inval".into())
        .spawn(move || {
            for inv in inv_rx {
                // ENOENT just means the kernel has nothing cached for it.
                let _ = match inv {
                    Invalidation::Entry { parent, name } => {
                        notifier.inval_entry(INodeNo(parent), std::ffi::OsStr::from_bytes(&name))
                    }
                    Invalidation::Inode { ino, data } => {
                        notifier.inval_inode(INodeNo(ino), if data { 0 } else { -1 }, 0)
                    }
                    Invalidation::Ack(id) => {
                        acker.ack_barrier(id);
                        Ok(())
                    }
                };
            }
        })
        .context("cannot start the invalidation thread")
        .map_err(undo_mount)?;
    raise_readahead(&ours);
    let _guard = rt.enter();
    let stats_socket = match crate::stats::serve(core.clone(), &abs) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("ferry stats unavailable: {e:#}");
            None
        }
    };
    let ending = Arc::new(Ending {
        core: core.clone(),
        client: client.clone(),
        cache: cache.clone(),
        stats_socket,
        timeout: opts.timeout,
    });
    let alive = Arc::new(move || superblock_alive(&probe_fd));

    // SIGINT/SIGTERM unmount cleanly; the session loop then ends by itself. A mount
    // still in use is detached (it goes once its users let go) and served until then;
    // a signal for a mount no longer on top at its path (detached, or another one
    // mounted over it) ends the session here: unmounting the path would take down
    // what is there now.
    let mp = abs.clone();
    let (signal_over, signal_ending, signal_alive) = (over.clone(), ending.clone(), alive.clone());
    let signal_ours = ours.clone();
    rt.spawn(async move {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if signal_over.load(SeqCst) {
                return;
            }
            if signal_ours.on_top(&*signal_alive) {
                tracing::info!("signal received; unmounting {}", mp.display());
                if let Err(e) = unmount(&mp) {
                    tracing::warn!(
                        "{e:#}; detaching it instead: it goes once its users let go, and \
                         another signal ends the session now"
                    );
                    let _ = detach(&mp);
                }
                continue;
            }
            if signal_over.swap(true, SeqCst) {
                return;
            }
            tracing::info!(
                "signal received; the mount at {} is not on top there any more (detached, \
                 or mounted over): ending the session, without touching the path",
                mp.display()
            );
            // Unlinks from now on wait for the server: none is answered and then lost.
            signal_ending.core.set_unlink_behind(false);
            signal_ending.finish().await;
            signal_ending.save();
            std::process::exit(0);
        }
    });

    if ready_pipe {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY}");
        let _ = out.flush();
        // Nothing else may go to the pipe; the parent has exited by now.
        let detach_stderr = stderr_is_a_pipe();
        if detach_stderr {
            tracing::info!(
                "the daemon's log ends here: its stderr is a pipe whose reader waits for \
                 everyone to close it (`ferry mount … 2>&1 | cat`, `$(…)`); --log FILE keeps it"
            );
        }
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let null = std::os::fd::AsRawFd::as_raw_fd(&null);
            // SAFETY: dup2 onto fds 1 and 2 with a valid fd; each replaces its target
            // atomically (the log writer opens nothing: it writes to fd 2).
            unsafe {
                libc::dup2(null, 1);
                if detach_stderr {
                    libc::dup2(null, 2);
                }
            }
        }
    }

    let run = session.run();
    if over.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // A signal is ending the daemon: it exits once done, in about `--timeout`.
        std::thread::sleep(opts.timeout * 2 + Duration::from_secs(10));
        tracing::warn!("the daemon's ending took too long; exiting");
        std::process::exit(1);
    }
    // Ended with the mount still there (an error, or its connection aborted): a dead
    // mount helps nobody.
    if ours.on_top(&*alive) {
        tracing::info!("the session ended; unmounting {}", abs.display());
        let _ = unmount(&abs).or_else(|_| detach(&abs));
    }
    rt.block_on(ending.finish());
    // Lets background cache writes finish first, so the metadata saved next covers them.
    rt.shutdown_timeout(Duration::from_secs(2));
    ending.save();
    run.map_err(|e| anyhow!("FUSE session ended with an error: {e}"))
}

/// What a daemon does on its way out, however it ends.
struct Ending {
    core: Arc<Core>,
    client: Arc<Client>,
    cache: Option<Arc<DataCache>>,
    stats_socket: Option<crate::stats::Socket>,
    timeout: Duration,
}

impl Ending {
    async fn finish(&self) {
        if let Some(s) = &self.stats_socket {
            s.remove();
        }
        // Unlinks answered ahead of the server reach it before the connection closes.
        self.core.settle_unlinks(self.timeout).await;
        self.client.close().await;
    }

    fn save(&self) {
        if let Some(cache) = &self.cache
            && let Err(e) = cache.close()
        {
            tracing::warn!("cannot save cache metadata: {e}");
        }
    }
}

/// This daemon's mount, told apart from whatever else is or comes to be mounted at its
/// path (the next mount there after an unmount, one mounted over it).
#[derive(Clone)]
struct OurMount {
    path: PathBuf,
    /// `major:minor` of its superblock in mountinfo, read right after mounting.
    dev: Option<String>,
}

impl OurMount {
    fn new(path: &Path) -> OurMount {
        OurMount {
            path: path.to_path_buf(),
            dev: top_dev(path),
        }
    }

    /// Whether the mount on top at the path is this daemon's. The device number names
    /// our superblock only while it lives (the next mount may get the number once it
    /// is gone), so `alive` asks the kernel too: it fails once our superblock is gone.
    /// Unmounting by path leaves a gap between this check and the `umount2` (or
    /// fusermount3's): a mount made exactly then could be hit; none can be made exact.
    /// (Read first, asked after: alive after the read, the number was ours during it.)
    fn on_top(&self, alive: &dyn Fn() -> bool) -> bool {
        self.dev.is_some() && top_dev(&self.path) == self.dev && alive()
    }
}

/// Whether the kernel still has the superblock of the connection on `dev`: an
/// invalidation of the root's attributes (harmless) fails with ENOENT once it is gone.
/// Written here, as fuser's `Notifier` reports ENOENT as success.
fn superblock_alive(dev: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
    const ROOT: u64 = 1;
    let mut msg = Vec::with_capacity(40);
    // fuse_out_header: len, error (the notification's code), unique (0: a notification).
    msg.extend_from_slice(&40u32.to_ne_bytes());
    msg.extend_from_slice(&FUSE_NOTIFY_INVAL_INODE.to_ne_bytes());
    msg.extend_from_slice(&0u64.to_ne_bytes());
    // fuse_notify_inval_inode_out: ino, off (negative: attributes only), len.
    msg.extend_from_slice(&ROOT.to_ne_bytes());
    msg.extend_from_slice(&(-1i64).to_ne_bytes());
    msg.extend_from_slice(&0i64.to_ne_bytes());
    // SAFETY: a write of an owned buffer to a valid descriptor.
    let n = unsafe { libc::write(dev.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    n == msg.len() as isize
}

/// The device of the mount on top at `path`, from this process's mountinfo (a `stat`
/// would wait for the filesystem there).
fn top_dev(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_line(&info, path)
        .and_then(|line| line.split(' ').nth(2))
        .map(str::to_string)
}

/// Mounts of one export at a time that may share a cache dir: more take none.
const CACHE_DIRS_PER_EXPORT: u32 = 8;

/// How long a mount waits (for all its cache dirs together) for the cache dir of a
/// mount that was unmounted but whose daemon is still finishing (its last writes, its
/// metadata, the sync).
const CACHE_HANDOVER: Duration = Duration::from_secs(10);

/// The data cache of export `id` under `opts.cache_dir`: `<id>`, or while another
/// mount of the same export uses that, `<id>-2`, `<id>-3`… (each mount keeps a cache
/// of its own across remounts). A dir whose user is no longer mounted (unmounted, its
/// daemon still finishing) is waited for. `None` (with a warning) when none can be used.
fn open_cache(base: &Path, id: u64, opts: &MountOpts) -> Option<DataCache> {
    let me = std::fs::canonicalize(&opts.mountpoint).unwrap_or(opts.mountpoint.clone());
    let until = std::time::Instant::now() + CACHE_HANDOVER;
    for n in 1..=CACHE_DIRS_PER_EXPORT {
        let dir = match n {
            1 => base.join(format!("{id:016x}")),
            n => base.join(format!("{id:016x}-{n}")),
        };
        let mut retried = false;
        loop {
            match DataCache::open_for(&dir, opts.cache_size, opts.cache_min_free, &me) {
                Ok(c) => return Some(c),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let owner = DataCache::user_of(&dir).map(|(pid, point)| owner(pid, &point));
                    match owner {
                        Some(Owner::Leaving) if std::time::Instant::now() < until => {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                        // Its lock went with it (unless the pid is another namespace's).
                        Some(Owner::Gone) if !retried => {
                            retried = true;
                            continue;
                        }
                        _ => {}
                    }
                    tracing::debug!("{e}; trying the next");
                    break;
                }
                Err(e) => {
                    tracing::warn!("data cache disabled: cannot use {}: {e}", dir.display());
                    return None;
                }
            }
        }
    }
    tracing::warn!(
        "data cache disabled: {CACHE_DIRS_PER_EXPORT} mounts of this export already use the \
         cache dirs under {}",
        base.display()
    );
    None
}

/// What became of the process that uses a cache dir, mounted on `path`.
enum Owner {
    /// Still mounted, or it cannot be told.
    Mounted,
    /// Unmounted (as it sees its mounts: its namespace may not be this one) or exiting
    /// (its namespaces already released: `EINVAL`): it lets go of the dir soon.
    Leaving,
    /// No such process here: gone already, or one of another PID namespace.
    Gone,
}

fn owner(pid: u32, path: &Path) -> Owner {
    match std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
        Ok(info) if mount_line(&info, path).is_some() => Owner::Mounted,
        Ok(_) => Owner::Leaving,
        Err(e) => match e.raw_os_error() {
            Some(libc::EINVAL | libc::ESRCH) => Owner::Leaving,
            Some(libc::ENOENT) => Owner::Gone,
            _ => Owner::Mounted,
        },
    }
}

/// The line of a mountinfo text for the mount on top at `path`: of the mounts there, the
/// one no other mount there sits on (its ID is no other's parent ID). Not simply the
/// last of them: mountinfo lists mounts by age, and an older mount moved there
/// (`mount --move`) is on top of a newer one.
fn mount_line<'a>(info: &'a str, path: &Path) -> Option<&'a str> {
    let want = path.as_os_str().as_bytes();
    let here: Vec<&str> = info
        .lines()
        .filter(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|point| unescape_mountinfo(point).as_slice() == want)
        })
        .collect();
    fn ids(line: &str) -> (Option<&str>, Option<&str>) {
        let mut fields = line.split(' ');
        (fields.next(), fields.next())
    }
    let below = |line: &&str| {
        let (id, _) = ids(line);
        here.iter().any(|other| ids(other).1 == id)
    };
    here.iter()
        .rev()
        .find(|line| !below(line))
        .or(here.last())
        .copied()
}

/// Let the kernel read ahead up to one full request (1 MiB) instead of 128 KiB: the
/// mount's backing device info is created with the default. Best effort (root only).
fn raise_readahead(ours: &OurMount) {
    let Some(dev) = &ours.dev else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        tracing::debug!("cannot raise readahead ({path}): {e}");
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn c_path(p: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("path contains NUL"))
}

/// Mounts the FUSE filesystem at `abs` with the options `config` names and returns the
/// `/dev/fuse` descriptor for `Session::from_fd`: with the mount syscall where this
/// process may (root), else through fusermount3 (setuid root), as libfuse does.
///
/// Why not fuser's own mount: at the end of a session fuser 0.18 unmounts the path again
/// unless its connection is gone, and its check (`poll` of the device) takes a dead
/// connection for a live one. After `ferry umount X` it so unmounted whatever was
/// mounted at X by the time this daemon got there: the next `ferry mount … X` when this
/// daemon was slow to finish (fixed upstream after 0.18.0). A mount made here is
/// unmounted by this daemon only on SIGINT/SIGTERM, while its session runs.
fn mount_fuse(abs: &Path, config: &Config) -> Result<std::os::fd::OwnedFd> {
    match running_as_root() {
        true => match mount_syscall(abs, config)? {
            Some(dev) => Ok(dev),
            // No CAP_SYS_ADMIN after all (a container's root).
            None => mount_fusermount(abs, config),
        },
        false => mount_fusermount(abs, config),
    }
}

/// What [`mount_fuse`] asks of the kernel, from the options `config` names.
struct FuseOptions {
    /// The mount's source (`ferry:REMOTE`, as mountinfo shows it).
    source: String,
    /// The type's second part (`fuse.ferry`), as libfuse's `subtype=` makes it.
    subtype: Option<String>,
    read_only: bool,
    default_permissions: bool,
    allow_other: bool,
}

impl FuseOptions {
    fn of(config: &Config) -> Result<FuseOptions> {
        let mut o = FuseOptions {
            source: "ferry".to_string(),
            subtype: None,
            read_only: false,
            default_permissions: false,
            allow_other: config.acl != SessionACL::Owner,
        };
        for m in &config.mount_options {
            match m {
                MountOption::DefaultPermissions => o.default_permissions = true,
                MountOption::RO => o.read_only = true,
                MountOption::FSName(name) => o.source.clone_from(name),
                MountOption::Subtype(sub) => o.subtype = Some(sub.clone()),
                // Always nosuid and nodev.
                MountOption::NoDev | MountOption::NoSuid => {}
                other => bail!("mount option {other:?} is not handled here"),
            }
        }
        Ok(o)
    }

    /// The options both ways of mounting take alike.
    fn common(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.default_permissions {
            v.push("default_permissions");
        }
        if self.allow_other {
            v.push("allow_other");
        }
        v
    }
}

/// [`mount_fuse`] by the mount syscall; `None` if it is not permitted.
fn mount_syscall(abs: &Path, config: &Config) -> Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let o = FuseOptions::of(config)?;
    let rootmode = std::fs::metadata(abs)?.mode();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("cannot open /dev/fuse")?;
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={rootmode:o},user_id={uid},group_id={gid}",
        dev.as_raw_fd()
    );
    for opt in o.common() {
        data.push(',');
        data.push_str(opt);
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if o.read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = std::ffi::CString::new(o.source).map_err(|_| anyhow!("name contains NUL"))?;
    let fstype = match &o.subtype {
        Some(sub) => format!("fuse.{sub}"),
        None => "fuse".to_string(),
    };
    let fstype = std::ffi::CString::new(fstype).map_err(|_| anyhow!("type contains NUL"))?;
    let target = c_path(abs)?;
    let data = std::ffi::CString::new(data).map_err(|_| anyhow!("options contain NUL"))?;
    // SAFETY: valid NUL-terminated strings; `data` is the option string fuse parses.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(None);
        }
        return Err(e.into());
    }
    Ok(Some(dev.into()))
}

/// [`mount_fuse`] through the setuid helper: it mounts (checking the user may) and sends
/// the opened `/dev/fuse` back over a socket pair (`_FUSE_COMMFD`, `SCM_RIGHTS`).
fn mount_fusermount(abs: &Path, config: &Config) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let o = FuseOptions::of(config)?;
    // fsname's own commas and backslashes are escaped, as fusermount3 unescapes them.
    let fsname = o.source.replace('\\', "\\\\").replace(',', "\\,");
    let mut opts = vec![format!("fsname={fsname}"), "nosuid".into(), "nodev".into()];
    if let Some(sub) = &o.subtype {
        opts.push(format!(
            "subtype={}",
            sub.replace('\\', "\\\\").replace(',', "\\,")
        ));
    }
    opts.extend(o.common().into_iter().map(String::from));
    if o.read_only {
        opts.push("ro".into());
    }
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().context("cannot make a socket pair")?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-o")
        .arg(opts.join(","))
        .arg("--")
        .arg(abs)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only fcntl between fork and exec (async-signal-safe): the helper's end of
    // the pair is to survive the exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(theirs_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow!("fusermount3 not found: a mount without root needs it (package fuse3)")
        }
        _ => anyhow!("cannot run fusermount3: {e}"),
    })?;
    // Ours closed: once the helper exits, a receive that got nothing ends.
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child.wait_with_output().context("fusermount3")?;
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match received {
        Ok(Some(dev)) if out.status.success() => Ok(dev),
        Ok(Some(_)) | Ok(None) => bail!("fusermount3 failed ({}): {said}", out.status),
        Err(e) => bail!("no descriptor from fusermount3 ({e}): {said}"),
    }
}

/// One descriptor sent over `sock` with `SCM_RIGHTS`; `None` if the peer closed first.
fn receive_fd(
    sock: &std::os::unix::net::UnixStream,
) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // u64s: aligned for a cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: msg points at live buffers of the lengths it gives.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: msg was filled in by recvmsg; the CMSG macros walk its control buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return Ok(Some(std::os::fd::OwnedFd::from_raw_fd(fd)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(None)
}

/// Detaches the mount at `mp` now; it goes once its users let go (`umount -l`).
fn detach(mp: &Path) -> Result<()> {
    let c = c_path(mp)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) && fusermount(&["-u", "-z"], mp).is_ok() {
        return Ok(());
    }
    Err(err.into())
}

/// `fusermount3 ARGS MP` (setuid: unmounts a mount of the calling user); what it said
/// when it did not.
fn fusermount(args: &[&str], mp: &Path) -> std::result::Result<(), String> {
    match Command::new("fusermount3")
        .args(args)
        .arg(mp)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// `ferry umount MOUNTPOINT`.
pub fn unmount(mp: &Path) -> Result<()> {
    let c = c_path(mp)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let mut err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: the setuid helper may do it for us.
        match fusermount(&["-u"], mp) {
            Ok(()) => return Ok(()),
            Err(said) if said.contains("busy") => {
                err = std::io::Error::from_raw_os_error(libc::EBUSY);
            }
            Err(_) => {}
        }
    }
    if err.raw_os_error() == Some(libc::EBUSY) {
        let how = if running_as_root() {
            "umount -l"
        } else {
            "fusermount3 -u -z"
        };
        bail!(
            "cannot unmount {}: {err}: a process has a file or its working directory in \
             it; end those, or `{how} {}` detaches the mount now and unmounts it once \
             they let go",
            mp.display(),
            mp.display()
        );
    }
    Err(anyhow!("cannot unmount {}: {err}", mp.display()))
}

/// Whether to offer passthrough opens: the kernel reads the data cache's files, and
/// registering one needs CAP_SYS_ADMIN. On a writable export the cache's filesystem
/// must date stores through memory maps: a writer's map beside passthrough readers
/// writes the cache's file itself, and only its mtime tells (see `crate::passthrough`).
fn passthrough_wanted(want: Passthrough, cache: Option<&DataCache>, read_only: bool) -> bool {
    let why_not = if !running_as_root() {
        Some("not root")
    } else if cache.is_none() {
        Some("no data cache")
    } else if !read_only && !cache.is_some_and(DataCache::dates_map_stores) {
        Some("the cache directory's filesystem does not date stores through memory maps")
    } else {
        None
    };
    match (want, why_not) {
        (Passthrough::Off, _) => false,
        (_, None) => true,
        (Passthrough::On, Some(why)) => {
            tracing::warn!("--passthrough on: unavailable ({why}), reads go through ferry");
            false
        }
        (Passthrough::Auto, Some(why)) => {
            tracing::info!("no FUSE passthrough ({why}): reads go through ferry");
            false
        }
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_on_top_is_the_one_nothing_there_sits_on() {
        let info = "\
22 1 0:20 / /tmp rw - tmpfs tmpfs rw
42 45 0:39 / /tmp/m rw,relatime - tmpfs tmpfs rw
45 22 0:41 / /tmp/m rw,relatime - fuse.ferry ferry rw
50 22 0:43 / /tmp/other rw - tmpfs tmpfs rw
";
        // 42 was mounted first and moved over 45 (`mount --move`): listed first, on top.
        let top = mount_line(info, Path::new("/tmp/m")).expect("a mount at /tmp/m");
        assert!(top.starts_with("42 "), "{top}");
        assert!(mount_line(info, Path::new("/tmp/other")).is_some_and(|l| l.starts_with("50 ")));
        assert!(mount_line(info, Path::new("/tmp/none")).is_none());
        // Mounted in order, the last is on top.
        let stacked = "22 1 0:20 / /m rw - tmpfs t rw\n30 22 0:30 / /m rw - tmpfs t rw\n";
        assert!(mount_line(stacked, Path::new("/m")).is_some_and(|l| l.starts_with("30 ")));
        // Escaped names are matched unescaped.
        let spaced = "60 22 0:50 / /tmp/a\\040b rw - tmpfs t rw\n";
        assert!(mount_line(spaced, Path::new("/tmp/a b")).is_some());
    }
}
