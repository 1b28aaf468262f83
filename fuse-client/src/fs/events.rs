//! Server change events → what this client must forget.
//!
//! The server reports every change in the directories this client has looked into, with
//! the entry's new attributes. A change this client made itself arrives with a version it
//! already knows and costs nothing; anything else drops the kernel's dentry, attributes
//! and pages for that entry (through the adapter's notifier thread), the cached listing of
//! the directory, and lets the data cache revalidate by version on the next open. When the
//! stream was interrupted (reconnect) or the server says events were lost, everything is
//! revalidated. A server that can no longer watch everything says so once
//! (`Event::Incomplete`): everything is revalidated, and from then on this client trusts
//! nothing for longer than it would without events.
//!
//! Kernel notifications are sent from one dedicated thread, never from a FUSE callback or
//! a runtime worker: a notification can wait on kernel locks held by requests that only a
//! runtime worker can complete.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_common::proto::{
    Attr, Caller, Event, FileKind, MAX_LOCATE, Name, RelPath, Request, Response,
};

use super::{Core, dirs::DIR_EPOCH};
use crate::nodes::ROOT;

/// A kernel cache invalidation, carried out by the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Drop the dentry `parent/name`.
    Entry { parent: u64, name: Vec<u8> },
    /// Drop attributes, and with `data` the cached pages too.
    Inode { ino: u64, data: bool },
    /// Everything queued before this is done: acknowledge server barrier `id`.
    Ack(u64),
}

/// Directories to ask the server about (`Core::locate_later`), asked one at a time:
/// kernel inode and the tries left.
#[derive(Debug, Default)]
pub(super) struct Locating {
    queue: VecDeque<(u64, u32)>,
    /// The directories in `queue`.
    queued: HashSet<u64>,
    running: bool,
}

/// Times a directory is asked for when the answer cannot be taken (something it rests
/// on moved meanwhile) or the connection is down.
const LOCATE_TRIES: u32 = 5;

/// Pause before asking again.
const LOCATE_PAUSE: Duration = Duration::from_millis(20);

/// Drops the kernel's cached attributes of an inode on the calling thread.
pub type AttrInvalidator = Box<dyn Fn(u64) + Send + Sync>;

impl Core {
    /// Where kernel invalidations go (set once, by the adapter, after mounting): `tx`
    /// queues them for the invalidation thread; `now` drops an inode's attributes at once.
    pub fn set_invalidator(&self, tx: std::sync::mpsc::Sender<Invalidation>, now: AttrInvalidator) {
        let _ = self.invalidator.set(tx);
        let _ = self.attrs_invalidator.set(now);
    }

    pub(super) fn invalidate(&self, inv: Invalidation) {
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = self.invalidator.get() {
            let _ = tx.send(inv);
        }
    }

    /// Drop the kernel's cached attributes of `ino` before returning, for an answer the
    /// kernel must not follow with attributes from before it. Not queued, and safe to
    /// do while the kernel waits for this daemon: unlike dropping an entry (which takes
    /// the directory's lock, possibly held by the very caller being answered), the
    /// kernel takes no inode lock for it.
    pub(super) fn invalidate_attrs_now(&self, ino: u64) {
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        if let Some(now) = self.attrs_invalidator.get() {
            now(ino);
        }
    }

    /// Drop the kernel's cached attributes of `ino` (not its pages).
    pub(super) fn invalidate_attrs(&self, ino: u64) {
        self.invalidate(Invalidation::Inode { ino, data: false });
    }

    fn forget_listing(&self, dir: u64) {
        DIR_EPOCH.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.dir_cache.lock() {
            c.remove(dir);
        }
    }

    /// Called for every event the server pushes.
    pub fn handle_event(&self, ev: Event) {
        match ev {
            // (The connection stopped calling events live before this.)
            Event::Resync | Event::Incomplete => self.resync(),
            Event::Unwatched { dirs } => self.unwatched(&dirs),
            Event::Changed {
                dir, name, attr, ..
            } => self.changed(dir, name.as_ref(), attr),
            Event::Barrier { id, attr } => {
                if let Some(a) = attr {
                    self.committed_elsewhere(a);
                }
                // Acknowledged once the kernel invalidations queued so far are done.
                match self.invalidator.get() {
                    Some(tx) => {
                        let _ = tx.send(Invalidation::Ack(id));
                    }
                    None => self.ack_barrier(id),
                }
            }
        }
    }

    /// Tell the server this client has applied everything up to barrier `id`.
    pub fn ack_barrier(&self, id: u64) {
        let client = self.client.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current()
            .or_else(|_| self.runtime.get().cloned().ok_or(()))
        else {
            return;
        };
        rt.spawn(async move {
            let _ = client
                .call(
                    ferry_common::proto::Caller::default(),
                    ferry_common::proto::Request::BarrierAck { id },
                )
                .await;
        });
    }

    /// Another client committed new content of a file: whatever we hold of it is old.
    fn committed_elsewhere(&self, attr: Attr) {
        let ino = match self.nodes.lock() {
            Ok(n) => n.to_kernel(attr.ino),
            Err(_) => return,
        };
        let known = match self.inodes.lock() {
            Ok(mut inodes) => match inodes.get_mut(&ino) {
                Some(st) if st.version != attr.version && st.is_current(&attr) => {
                    st.version = attr.version;
                    st.seen_ctime = Some(attr.ctime);
                    st.attr = None;
                    st.kernel_version = None;
                    true
                }
                _ => false,
            },
            Err(_) => false,
        };
        if known {
            self.changed_on_server(ino, &attr);
            let named = self.nodes.lock().ok().and_then(|n| n.name_of(ino));
            if let Some((parent, name)) = named {
                self.forget_listing(parent);
                self.listing_changed(parent, Some(&name));
            }
            self.invalidate(Invalidation::Inode { ino, data: true });
        }
    }

    /// A change in directory `dir` (server node id), of entry `name` or of the directory
    /// itself. Placed by the directory's inode, never by its path: a path this client
    /// holds may name another directory by now.
    fn changed(&self, dir: u64, name: Option<&Name>, attr: Option<Attr>) {
        if let Some(a) = attr.filter(|a| a.kind != FileKind::Dir && a.nlink > 1) {
            // A file with other names: a kept listing may show it under one of them
            // (a prefetch the kernel has not taken, say) with its old attributes, and
            // no event names that directory.
            self.link_count_changed(a.ino);
        }
        let Ok(nodes) = self.nodes.lock() else { return };
        let dir = nodes.to_kernel(dir);
        if !nodes.knows(dir) {
            // A directory the kernel does not hold: nothing is cached under it but a
            // listing prefetched ahead of the kernel taking its entry, and files the
            // kernel holds by another name (hard links).
            let other = attr.filter(|a| a.kind != FileKind::Dir).and_then(|mut a| {
                a.ino = nodes.to_kernel(a.ino);
                nodes.knows(a.ino).then_some(a)
            });
            drop(nodes);
            self.forget_listing(dir);
            if let Some(a) = other {
                self.linked_file_changed(&a);
            }
            return;
        }
        let Some(name) = name else {
            // The directory itself (its entries changed, or its attributes). The entries
            // come as events of their own; here only its attributes matter.
            let attr = attr.map(|mut a| {
                a.ino = nodes.to_kernel(a.ino);
                a
            });
            drop(nodes);
            if let Some(a) = attr
                && let Ok(mut inodes) = self.inodes.lock()
                && let Some(st) = inodes.get_mut(&dir)
            {
                let known = st.attr.map_or(st.version, |(k, _)| k.version);
                if a.ino == dir && known == a.version {
                    return; // our own change, whose reply carried these attributes
                }
                if !st.take_event_attr(&a) {
                    return; // older than what a reply already told us
                }
            } else {
                self.forget_attr(dir);
                self.forget_names(dir);
            }
            self.forget_listing(dir);
            self.invalidate(Invalidation::Inode {
                ino: dir,
                data: true,
            });
            return;
        };
        drop(nodes);
        // First: a stream of the directory opened before may hold the name as it was,
        // even for a name the kernel does not have yet (nothing else here would correct
        // it). Noted before the name is looked at, so that a reply filled meanwhile
        // either sees the note or gave the kernel a name found below.
        self.forget_listing(dir);
        self.listing_changed(dir, Some(&name.0));
        let Ok(nodes) = self.nodes.lock() else { return };
        let known = nodes.child(dir, &name.0);
        let attr = attr.map(|mut a| {
            a.ino = nodes.to_kernel(a.ino);
            a
        });
        drop(nodes);
        let writing = known.is_some_and(|ino| {
            self.inodes.lock().is_ok_and(|inodes| {
                inodes
                    .get(&ino)
                    .is_some_and(|s| s.writers > 0 || s.local_size.is_some())
            })
        });
        // (The directory's kept listing, which may hold older attributes of the entry,
        // went above.)
        match (known, attr) {
            // Same file: attributes and pages go, the entry stays.
            (Some(ino), Some(a)) if a.ino == ino => {
                self.file_changed(&a);
                // The kernel's cached listing may not show the name even so: this
                // client can learn a name before the kernel's listing does (a directory
                // moved here from where the kernel held it is placed by asking the
                // server, ahead of this event), and nothing else would drop it.
                self.invalidate(Invalidation::Inode {
                    ino: dir,
                    data: true,
                });
            }
            // Gone, replaced by another file, or new: the name must be looked up again.
            (known, a) => {
                // A file that lost this name (removed, or replaced by another) lost a
                // link: kept listings that show it under its other names carry its old
                // link count, and no event names their directories.
                let unlinked_file =
                    known.filter(|&ino| self.nodes.lock().is_ok_and(|n| !n.is_dir(ino)));
                if let Some(ino) = unlinked_file {
                    self.link_count_changed(self.server_ino(ino));
                }
                // An answer about where a directory went that rests on this name is out
                // of date. A directory the kernel holds (a process's working directory,
                // say) whose name went, or that shows up here under another name, may
                // have been renamed: requests through it go by path, so the server is
                // asked where it is. The name itself is not answered locally again
                // until the server confirms it (its inode may come back with attributes
                // of its own: a directory moved elsewhere, whose events follow it).
                let to_locate: Vec<u64> = match self.nodes.lock() {
                    Ok(mut nodes) => {
                        nodes.name_changed(dir, &name.0);
                        if known.is_some() {
                            nodes.unverify(dir, &name.0);
                        }
                        let gone = known.filter(|&ino| nodes.is_dir(ino));
                        let here = a
                            .filter(|a| nodes.elsewhere(a.ino, dir, &name.0))
                            .map(|a| a.ino);
                        gone.into_iter().chain(here).collect()
                    }
                    Err(_) => Vec::new(),
                };
                for ino in to_locate {
                    self.locate_later(ino);
                }
                // (The directory's own attributes come with its own event, which the
                // server sends with every entry change.)
                // A name that exists now joins the directory's known names (this also
                // covers our own new entries whose event overtook the reply). A name
                // reported gone is not trusted to be gone from *this* directory: the
                // event names it by path, stat'ed on the server maybe after a rename
                // this client has not applied yet (`d/inside` is gone once `d` was
                // exchanged with a file), so the directory's names are no longer known.
                if let Some(a) = a {
                    if known != Some(a.ino) && a.kind != FileKind::Dir {
                        // A file this client may hold by another name (a hard link).
                        self.linked_file_changed(&a);
                    }
                    self.names_changed(dir, &name.0, true);
                    // Known by another name, or from a reply: the newest state.
                    if let Ok(mut inodes) = self.inodes.lock()
                        && let Some(st) = inodes.get_mut(&a.ino)
                    {
                        st.take_event_attr(&a);
                    }
                } else {
                    self.forget_names(dir);
                }
                if let Some(ino) = known {
                    self.forget_attr(ino);
                }
                self.invalidate(Invalidation::Entry {
                    parent: dir,
                    name: name.0.clone(),
                });
                self.invalidate(Invalidation::Inode {
                    ino: dir,
                    data: true,
                });
                if let Some(ino) = known {
                    if let Ok(mut inodes) = self.inodes.lock()
                        && let Some(st) = inodes.get_mut(&ino)
                    {
                        st.kernel_version = None;
                    }
                    self.invalidate(Invalidation::Inode {
                        ino,
                        data: !writing,
                    });
                }
            }
        }
    }

    /// A change of file `a.ino` (kernel inode number) reported under a name this client
    /// does not hold it by: if the kernel holds it under another (a hard link), its
    /// attributes and pages go, as for a change under a known name.
    fn linked_file_changed(&self, a: &Attr) {
        let ino = a.ino;
        if !self.nodes.lock().is_ok_and(|n| n.knows(ino)) || !self.file_changed(a) {
            return;
        }
        // The listing of the directory it is held in shows its old attributes.
        let named = self.nodes.lock().ok().and_then(|n| n.name_of(ino));
        if let Some((parent, name)) = named {
            self.forget_listing(parent);
            self.listing_changed(parent, Some(&name));
        }
    }

    /// File `a.ino` (kernel inode number) changed on the server to `a`: its attributes
    /// and pages go. Not when this client has that version already (its own change
    /// echoed back), is writing it (close-to-open: its pages are the truth), or had a
    /// newer state from a reply (the event's attributes, if the newest, answer the
    /// kernel's next GETATTR). Returns whether anything went.
    fn file_changed(&self, a: &Attr) -> bool {
        let ino = a.ino;
        if let Ok(mut inodes) = self.inodes.lock()
            && let Some(st) = inodes.get_mut(&ino)
        {
            if st.version == a.version || st.writers > 0 || st.local_size.is_some() {
                return false;
            }
            if !st.take_event_attr(a) {
                return false;
            }
            st.version = a.version;
            st.kernel_version = None;
            st.xattrs = ferry_common::proto::XATTRS_UNKNOWN;
        }
        self.changed_on_server(ino, a);
        self.invalidate(Invalidation::Inode { ino, data: true });
        true
    }

    /// The path of directory `ino` leads to another one on the server (a request by path
    /// found out): its name is looked up again, by the kernel too (which retries a walk
    /// that met `ESTALE` once, revalidating), and the server is asked where it went.
    pub(super) fn path_went_stale(&self, ino: u64) {
        if ino == ROOT {
            return;
        }
        self.forget_attr(ino);
        let named = match self.nodes.lock() {
            Ok(mut nodes) => {
                let named = nodes.name_of(ino);
                if let Some((parent, name)) = &named {
                    nodes.unverify(*parent, name);
                }
                named
            }
            Err(_) => None,
        };
        if let Some((parent, name)) = named {
            self.invalidate(Invalidation::Entry { parent, name });
        }
        self.locate_later(ino);
    }

    /// Directory `ino`, which the kernel holds, lost the name this client knew it by (an
    /// event said so): ask the server where it is now, and move it there in the inode
    /// table, so that requests through it (its contents, for a process whose working
    /// directory it is) go to the new place. In the background, one at a time: answers
    /// are taken in the order they were given.
    fn locate_later(&self, ino: u64) {
        if !self.client.locates() {
            return;
        }
        let start = match self.locating.lock() {
            Ok(mut l) => {
                if l.queued.insert(ino) {
                    l.queue.push_back((ino, LOCATE_TRIES));
                }
                !std::mem::replace(&mut l.running, true)
            }
            Err(_) => false,
        };
        if !start {
            return;
        }
        let rt = tokio::runtime::Handle::try_current()
            .or_else(|_| self.runtime.get().cloned().ok_or(()));
        match (self.me.upgrade(), rt) {
            (Some(me), Ok(rt)) => {
                rt.spawn(async move { me.locate_queued().await });
            }
            _ => {
                if let Ok(mut l) = self.locating.lock() {
                    l.queue.clear();
                    l.queued.clear();
                    l.running = false;
                }
            }
        }
    }

    /// Ask for the queued directories, as many at a time as one request takes, until
    /// none is left.
    async fn locate_queued(&self) {
        loop {
            let batch: Vec<(u64, u32)> = match self.locating.lock() {
                Ok(mut l) => {
                    if l.queue.is_empty() || !self.client.locates() {
                        // (A server reached again after a reconnect may not answer.)
                        l.queue.clear();
                        l.queued.clear();
                        l.running = false;
                        return;
                    }
                    let n = l.queue.len().min(MAX_LOCATE);
                    let batch: Vec<_> = l.queue.drain(..n).collect();
                    for (ino, _) in &batch {
                        l.queued.remove(ino);
                    }
                    batch
                }
                Err(_) => return,
            };
            let tries: HashMap<u64, u32> = batch.iter().copied().collect();
            let (ticket, nodes) = match self.nodes.lock() {
                Ok(n) => (
                    n.ticket(),
                    batch.iter().map(|&(ino, _)| n.to_kernel(ino)).collect(),
                ),
                Err(_) => return,
            };
            let request = Request::Locate { nodes };
            let paths = match self.client.call(Caller::default(), request).await {
                Ok(Ok(Response::Located(paths))) => paths,
                Ok(_) => continue, // refused: nothing to be learnt
                Err(_) => {
                    // No connection (each call waited for one up to the timeout): asked
                    // again, a few times at most.
                    tokio::time::sleep(LOCATE_PAUSE).await;
                    self.locate_again(batch.iter().map(|&(ino, _)| ino), &tries, 1);
                    continue;
                }
            };
            let found: Vec<(u64, Option<RelPath>)> =
                batch.iter().map(|&(ino, _)| ino).zip(paths).collect();
            let Some(out) = self.nodes.lock().ok().map(|mut n| n.rehome(ticket, &found)) else {
                return;
            };
            self.stats
                .dirs_located
                .fetch_add(out.moved.len() as u64, Ordering::Relaxed);
            self.names_moved(&out.moved);
            for ino in out.unplaced {
                self.locate_later(ino);
            }
            if !out.again.is_empty() || !out.wait.is_empty() {
                // Something they rest on moved meanwhile, or a rename of ours touches
                // them: ask again once that has settled (a wait costs no try).
                tokio::time::sleep(LOCATE_PAUSE).await;
                self.locate_again(out.again.into_iter(), &tries, 1);
                self.locate_again(out.wait.into_iter(), &tries, 0);
            }
        }
    }

    /// Directories `dirs` (kernel inodes) moved in the inode table to where the server
    /// says they are: names looked up in them since they moved went to their old paths
    /// (another directory's entries, after an exchange), so the kernel's entries, the
    /// names known and the listings of them go. What is known of each inode stays (it
    /// is the inode's, wherever its name led).
    fn names_moved(&self, dirs: &[u64]) {
        let children = self.forget_names_in(&dirs.iter().copied().collect());
        for (dir, name, _) in children {
            self.invalidate(Invalidation::Entry { parent: dir, name });
        }
    }

    /// No name in directories `dirs` (kernel inodes the kernel holds) is vouched for
    /// any more: their known entries are looked up again (returned: directory, name,
    /// inode), their listings and known name sets go.
    fn forget_names_in(&self, dirs: &HashSet<u64>) -> Vec<(u64, Vec<u8>, u64)> {
        let Ok(mut n) = self.nodes.lock() else {
            return Vec::new();
        };
        let children = n.children_of(dirs);
        for (dir, name, _) in &children {
            n.unverify(*dir, name);
        }
        drop(n);
        for &dir in dirs {
            self.forget_names(dir);
            self.forget_listing(dir);
            self.listing_changed(dir, None);
        }
        children
    }

    /// Queue `inos` again, each with `cost` fewer tries (dropped at none left).
    fn locate_again(&self, inos: impl Iterator<Item = u64>, tries: &HashMap<u64, u32>, cost: u32) {
        if let Ok(mut l) = self.locating.lock() {
            for ino in inos {
                let left = tries.get(&ino).copied().unwrap_or(1).saturating_sub(cost);
                if left > 0 && l.queued.insert(ino) {
                    l.queue.push_back((ino, left));
                }
            }
        }
    }

    /// Directories `dirs` (server node ids) are not watched any more: nothing of them
    /// or of their entries is vouched for (their own watches reported those). One scan
    /// of the name table for all of them: a tree of thousands of directories moved out
    /// of sight comes as one event.
    fn unwatched(&self, dirs: &[u64]) {
        let Ok(n) = self.nodes.lock() else {
            return;
        };
        let (held, gone): (HashSet<u64>, HashSet<u64>) = dirs
            .iter()
            .map(|&d| n.to_kernel(d))
            .partition(|&d| n.knows(d));
        drop(n);
        // Not held: nothing of them but maybe a prefetched listing.
        for dir in gone {
            self.forget_listing(dir);
        }
        let children = self.forget_names_in(&held);
        for &dir in &held {
            self.forget_attr(dir);
        }
        let mut writing = HashSet::new();
        if let Ok(mut inodes) = self.inodes.lock() {
            for &ino in held.iter().chain(children.iter().map(|(_, _, i)| i)) {
                if let Some(st) = inodes.get_mut(&ino) {
                    st.attr = None;
                    // Nothing reports their changes until the server says it does again.
                    st.uncovered = true;
                    st.xattrs = ferry_common::proto::XATTRS_UNKNOWN;
                    if st.writers > 0 || st.local_size.is_some() {
                        // Close-to-open: this client's pages are the truth.
                        writing.insert(ino);
                    } else {
                        st.kernel_version = None;
                    }
                }
            }
        }
        for &dir in &held {
            self.invalidate(Invalidation::Inode {
                ino: dir,
                data: true,
            });
        }
        for (dir, name, ino) in children {
            self.invalidate(Invalidation::Entry { parent: dir, name });
            self.invalidate(Invalidation::Inode {
                ino,
                data: !writing.contains(&ino),
            });
        }
    }

    /// Events may have been missed: nothing cached is trusted any more.
    pub fn resync(&self) {
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        DIR_EPOCH.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.dir_cache.lock() {
            c.clear();
        }
        let entries = self
            .nodes
            .lock()
            .map(|mut n| {
                // (Answers about where directories went may rest on lost events.)
                n.all_changed();
                n.all_entries()
            })
            .unwrap_or_default();
        if let Ok(mut inodes) = self.inodes.lock() {
            for st in inodes.values_mut() {
                if let Some(changes) = st.listing.as_mut() {
                    changes.note(None);
                }
                st.kernel_version = None;
                st.version = 0;
                st.attr = None;
                st.seen_ctime = None;
                st.names = None;
                st.xattrs = ferry_common::proto::XATTRS_UNKNOWN;
            }
        }
        self.invalidate(Invalidation::Inode {
            ino: ROOT,
            data: true,
        });
        for (parent, name, ino) in entries {
            self.invalidate(Invalidation::Entry { parent, name });
            self.invalidate(Invalidation::Inode { ino, data: true });
        }
    }

    /// Route the connection's events here and resync after every reconnect.
    pub fn subscribe(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.client.set_event_sink(Arc::new(move |ev| {
            if let Some(core) = weak.upgrade() {
                core.handle_event(ev);
            }
        }));
        let weak = Arc::downgrade(self);
        self.client.set_connect_hook(Arc::new(move |generation| {
            if generation > 1
                && let Some(core) = weak.upgrade()
            {
                tracing::info!("reconnected: revalidating every cached entry");
                core.resync();
            }
        }));
    }
}
