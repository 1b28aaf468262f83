//! Changes that run at most once however often a client sends them ([`OnceKey`]).
//!
//! A client whose connection broke before an answer cannot tell whether its change ran:
//! a `rename` that ran and is sent again fails with `ENOENT`, a `mkdir` with `EEXIST`.
//! So it names each such change with a key and sends it again with the same key; this
//! table remembers the answers of recent keys and gives a repeat the first answer (or
//! waits for it, while the first run is still running) instead of running it twice.
//!
//! It is shared by all connections of this process and, when the server has a state
//! directory, kept there too ([`log`]): every change of the table is appended to a log
//! before the change it records runs (or before its answer leaves), and the next
//! process on the export replays it and takes over its `Welcome::instance`. So a
//! repeat that reaches a server restarted since its first send is answered as if the
//! process had not changed; a change the dead process was running (begun, never
//! answered) is answered `NotRemembered`, unless its [`Probe`] tells whether it ran.
//! Without a state directory (or once the log cannot be written: it is then removed)
//! the table lives in memory only and a restart forgets it, with a new instance.
//!
//! A repeat it has no record of runs only if its first send cannot have arrived: the
//! session's record was made by a key no newer than this one (so this key, had it
//! arrived, would be in it) and none of its answers newer than this key was forgotten.
//! Otherwise it is answered `NotRemembered` without running, and that answer is
//! remembered under the key, so a first send still on its way does not run after it.
//! This is safe because a client repeats a key only to the table it first sent it to
//! (`Welcome::instance`): a first send to a process whose table is lost could have run
//! there. Bounded: at most [`MAX_SESSIONS`] sessions (the least recently used one goes)
//! of at most [`MAX_PER_SESSION`] answers each (the oldest goes, and the session
//! remembers the newest key it forgot).
//!
//! Invariant: a slot is `Running` only while one thread is inside the change's
//! synchronous run (it is set just before, replaced right after, also on unwinding), so
//! a repeat that waits for it waits for a system call or two, never for another request.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use ferry_common::proto::{Name, RelPath};
use ferry_common::{OnceKey, Request, Response};
use serde::{Deserialize, Serialize};

use crate::sys::Errno;

mod log;
use log::Event;

/// Most sessions (client mounts) remembered at once.
pub const MAX_SESSIONS: usize = 64;
/// Most answers remembered per session.
pub const MAX_PER_SESSION: usize = 1024;

type Answer = Result<Response, Errno>;

#[derive(Debug)]
enum Slot {
    /// With what the change looked at before it ran, if it can be checked afterwards.
    Running(Option<Box<Begun>>),
    Done(Answer),
}

/// A change running with a [`Probe`].
#[derive(Debug)]
struct Begun {
    probe: Probe,
    /// [`Table::changes`] once its `Begin` was noted: a change noted after it (or
    /// running with it) may have touched its names.
    at: u64,
}

/// A [`Probe`] taken for a change about to run ([`Answers::look`]).
#[derive(Debug)]
pub struct Look {
    probe: Probe,
    /// [`Table::changes`] before it was taken.
    mark: u64,
}

/// A directory's `ctime` (seconds, nanoseconds): every change of its entries moves it.
pub type Ctime = (i64, i64);

/// A file's (device, inode number).
pub type FileId = (u64, u64);

/// What a change found before it ran, logged with its `Begin`: a start after the
/// process died in it looks again and can tell whether it ran (see [`Verdict`]).
/// Every keyed change has one, if its names could be looked at and it could succeed
/// (a name-making change at a name already taken fails the same way when run again:
/// none then).
///
/// It is judged only if no other change of names through this server can have
/// touched its names since it was taken: none was noted after it, or was running with
/// it, when the process died ([`Table::settle_replayed`]; changes without a key
/// included, [`Answers::unkeyed`]). For "never ran", its directories' `ctime`s must
/// also be unchanged (anything outside ferryd, while it was down, say); a name as the
/// change leaves it counts as done whoever made it so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// `from` was the file with (device, inode) `from_id`; `to` was `to_id`'s, or
    /// nothing; their directories had `ctimes`.
    Rename {
        from: (RelPath, Name),
        from_id: FileId,
        to: (RelPath, Name),
        to_id: Option<FileId>,
        exchange: bool,
        ctimes: (Ctime, Ctime),
    },
    /// `entry` held a file (whichever: a create of it only opens it), or nothing; its
    /// directory had `ctime`.
    Create {
        entry: (RelPath, Name),
        existed: bool,
        ctime: Ctime,
    },
    /// A mkdir, mknod or symlink: `entry` was free, and the change makes a file of type
    /// `kind` (`S_IFDIR`, ...) there; its directory had `ctime`.
    Make {
        entry: (RelPath, Name),
        kind: u32,
        ctime: Ctime,
    },
    /// A link: `entry` was free, and the change makes it a name of `id`.
    Link {
        entry: (RelPath, Name),
        id: FileId,
        ctime: Ctime,
    },
    /// An unlink or rmdir: `entry` held `id`.
    Remove {
        entry: (RelPath, Name),
        id: FileId,
        ctime: Ctime,
    },
}

/// What a [`Probe`] finds after the process died in its change.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// As the change leaves things: it ran, and this is its answer.
    Ran(Response),
    /// As it found them: it never ran (or running it again is the same). Its key is
    /// forgotten, so a repeat runs it if the table can tell it never arrived (as for
    /// any first send lost on its way), else is answered `NotRemembered`.
    NotRun,
    /// Neither (someone else changed the names since): whether it ran is unknown.
    Unknown,
}

impl Verdict {
    /// The verdict on a rename whose names hold `now` (`from`'s and `to`'s ids; `None`:
    /// no entry) that found `before`; `dirs_as_before`: their directories' `ctime`s are
    /// as it found them (else the names may have changed and changed back).
    pub fn of_rename(
        before: FileId,
        to_before: Option<FileId>,
        exchange: bool,
        now: (Option<FileId>, Option<FileId>),
        dirs_as_before: bool,
    ) -> Verdict {
        let (from_now, to_now) = now;
        if from_now == Some(before) && to_now == to_before {
            return match dirs_as_before {
                true => Verdict::NotRun,
                false => Verdict::Unknown,
            };
        }
        let from_after_ok = match exchange {
            true => from_now == to_before,
            false => from_now != Some(before),
        };
        if to_now == Some(before) && from_after_ok {
            Verdict::Ran(Response::Ok)
        } else {
            Verdict::Unknown
        }
    }
}

#[derive(Debug, Default)]
struct Session {
    slots: HashMap<u64, Slot>,
    /// Keys of finished slots, oldest first.
    done: VecDeque<u64>,
    /// For choosing the least recently used session.
    used: u64,
    /// Slots `Running` (such a session is never forgotten).
    running: usize,
    /// The key that made this record: older ones may have arrived before it.
    first: u64,
    /// The newest key whose answer was forgotten.
    forgotten: Option<u64>,
}

impl Session {
    /// A record that knows nothing of which keys arrived before.
    fn unknown() -> Session {
        Session {
            first: u64::MAX,
            ..Session::default()
        }
    }

    /// `seq` is answered with `answer`: remembered, and the oldest answers past the
    /// bound go.
    fn finish(&mut self, seq: u64, answer: Answer) {
        self.slots.insert(seq, Slot::Done(answer));
        self.remember_done(seq);
    }

    /// `seq` has its answer: remembered, and the oldest answers past the bound go.
    fn remember_done(&mut self, seq: u64) {
        self.done.push_back(seq);
        while self.done.len() > MAX_PER_SESSION {
            if let Some(old) = self.done.pop_front() {
                self.slots.remove(&old);
                self.forgotten = Some(self.forgotten.map_or(old, |f| f.max(old)));
            }
        }
    }

    /// Whether `seq`, of which there is no record, cannot have arrived before.
    fn never_arrived(&self, seq: u64) -> bool {
        seq >= self.first && self.forgotten.is_none_or(|f| seq > f)
    }
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<u64, Session>,
    clock: u64,
    /// Sessions forgotten whole (the newest [`MAX_EVICTED`]): made again, their record
    /// does not know which of their keys arrived before.
    evicted: HashSet<u64>,
    evicted_order: VecDeque<u64>,
    /// Where every change of the table is also written, if anywhere.
    log: Option<log::Log>,
    /// Changes begun or answered (`Begin`, `Done` and `Other` events noted or
    /// replayed).
    changes: u64,
    /// Changes of names without a key running ([`Answers::unkeyed`]).
    others_running: usize,
}

impl Table {
    /// Write `e` to the log; a log that cannot be written is removed (it would no
    /// longer tell a later start all that ran) and the table lives on in memory.
    fn note(&mut self, e: &Event<'_>) {
        if e.is_change() {
            self.changes += 1;
        }
        let Some(log) = self.log.as_mut() else {
            return;
        };
        if let Err(err) = log.append(e) {
            tracing::warn!(
                "cannot write the answers log: {err}; a restart will forget the answers"
            );
            if let Some(log) = self.log.take() {
                log.discard();
            }
            return;
        }
        if log.wants_compaction() {
            self.compact();
        }
    }

    /// Write the log anew with only what the table holds.
    fn compact(&mut self) {
        let Some((dir, instance)) = self
            .log
            .as_ref()
            .map(|l| (l.dir().to_path_buf(), l.instance()))
        else {
            return;
        };
        let made = log::Log::create(&dir, instance, &self.snapshot());
        match made {
            Ok(new) => self.log = Some(new),
            Err(err) => {
                tracing::warn!(
                    "cannot compact the answers log: {err}; a restart will forget the answers"
                );
                if let Some(log) = self.log.take() {
                    log.discard();
                }
            }
        }
    }

    /// The events that make a table like this one: forgotten sessions, then each
    /// session (least recently used first) with its answers, oldest first, then the
    /// changes running. A running change keeps its probe only if nothing was noted
    /// after its `Begin` (a compacted log no longer tells what came after it).
    fn snapshot(&self) -> Vec<Event<'_>> {
        let mut events: Vec<Event<'_>> = self
            .evicted_order
            .iter()
            .map(|&id| Event::Evict { id })
            .collect();
        let mut sessions: Vec<_> = self.sessions.iter().collect();
        sessions.sort_by_key(|(_, s)| s.used);
        for (&id, s) in sessions {
            events.push(Event::Session {
                id,
                first: s.first,
                forgotten: s.forgotten,
            });
            for seq in &s.done {
                if let Some(Slot::Done(answer)) = s.slots.get(seq) {
                    events.push(Event::Done {
                        session: id,
                        seq: *seq,
                        answer: Cow::Borrowed(answer),
                    });
                }
            }
        }
        for (&id, s) in &self.sessions {
            for (&seq, slot) in &s.slots {
                if let Slot::Running(begun) = slot {
                    events.push(Event::Begin {
                        session: id,
                        seq,
                        probe: begun
                            .as_deref()
                            .filter(|b| b.at == self.changes)
                            .map(|b| b.probe.clone()),
                    });
                }
            }
        }
        events.extend((0..self.others_running).map(|_| Event::Other { begun: true }));
        events
    }

    /// `id` was forgotten whole: remembered as such (the newest [`MAX_EVICTED`]).
    fn evicted(&mut self, id: u64) {
        if self.evicted.insert(id) {
            self.evicted_order.push_back(id);
        }
        while self.evicted_order.len() > MAX_EVICTED {
            if let Some(old) = self.evicted_order.pop_front() {
                self.evicted.remove(&old);
            }
        }
    }

    /// Replay one event of an earlier process's log.
    fn apply(&mut self, e: Event<'static>) {
        self.clock += 1;
        let now = self.clock;
        if e.is_change() {
            self.changes += 1;
        }
        let changes = self.changes;
        match e {
            Event::Session {
                id,
                first,
                forgotten,
            } => {
                self.sessions.insert(
                    id,
                    Session {
                        first,
                        forgotten,
                        used: now,
                        ..Session::default()
                    },
                );
            }
            Event::Evict { id } => {
                self.sessions.remove(&id);
                self.evicted(id);
            }
            Event::Other { begun: true } => self.others_running += 1,
            Event::Other { begun: false } => {
                self.others_running = self.others_running.saturating_sub(1);
            }
            Event::Begin {
                session,
                seq,
                probe,
            } => {
                let s = self.replayed(session, now);
                if let std::collections::hash_map::Entry::Vacant(v) = s.slots.entry(seq) {
                    let begun = probe.map(|probe| Box::new(Begun { probe, at: changes }));
                    v.insert(Slot::Running(begun));
                    s.running += 1;
                }
            }
            Event::Done {
                session,
                seq,
                answer,
            } => {
                let s = self.replayed(session, now);
                match s.slots.get(&seq) {
                    Some(Slot::Done(_)) => {}
                    was => {
                        if matches!(was, Some(Slot::Running(_))) {
                            s.running = s.running.saturating_sub(1);
                        }
                        s.finish(seq, answer.into_owned());
                    }
                }
            }
        }
    }

    /// The record of `id` a replayed event names, touched at `now`. (A log always
    /// makes a session before using it; if not, nothing is known of its keys.)
    fn replayed(&mut self, id: u64, now: u64) -> &mut Session {
        let s = self.sessions.entry(id).or_insert_with(Session::unknown);
        s.used = now;
        s
    }

    /// After a replay: the changes the dead process was running have no answer, and
    /// nobody is running them any more. One with a probe is looked at again (`judge`)
    /// if it was the only one running and nothing was noted after its `Begin` (no
    /// other change can have touched its names since its probe): done if it ran,
    /// forgotten if it never did (see [`Verdict::NotRun`]). Whether the others ran is
    /// unknown. (`judge` runs under the table's lock: nothing else runs yet.)
    fn settle_replayed(&mut self, judge: &dyn Fn(&Probe) -> Verdict) -> DiedIn {
        let last = self.changes;
        let running = self
            .sessions
            .values()
            .flat_map(|s| s.slots.values())
            .filter(|slot| matches!(slot, Slot::Running(_)))
            .count()
            + self.others_running;
        let mut died_in = DiedIn::default();
        for s in self.sessions.values_mut() {
            let begun: Vec<(u64, Option<Box<Begun>>)> = s
                .slots
                .iter_mut()
                .filter_map(|(&seq, slot)| match slot {
                    Slot::Running(begun) => Some((seq, begun.take())),
                    Slot::Done(_) => None,
                })
                .collect();
            for (seq, begun) in begun {
                let verdict = match begun {
                    Some(b) if running == 1 && b.at == last => judge(&b.probe),
                    _ => Verdict::Unknown,
                };
                match verdict {
                    Verdict::Ran(answer) => {
                        died_in.ran += 1;
                        s.finish(seq, Ok(answer));
                    }
                    Verdict::NotRun => {
                        died_in.not_run += 1;
                        s.slots.remove(&seq);
                    }
                    Verdict::Unknown => {
                        died_in.unknown += 1;
                        s.finish(seq, Ok(Response::NotRemembered));
                    }
                }
            }
            s.running = 0;
        }
        self.others_running = 0;
        died_in
    }
}

/// What [`Answers::keep_in`] found of an earlier process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Answers taken over (including those of changes it was running when it died:
    /// `NotRemembered`, or as their probes were judged; one judged never run is not
    /// counted).
    pub answers: usize,
    /// Its log ended in an event cut short (the process died writing it).
    pub torn: bool,
    /// Of the changes it died in: how many had run, had not run, or cannot be told
    /// (see [`Verdict`]).
    pub died_in: DiedIn,
}

/// How the changes a process died in were judged ([`Restored::died_in`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiedIn {
    pub ran: usize,
    pub not_run: usize,
    pub unknown: usize,
}

/// Most forgotten sessions remembered as such.
const MAX_EVICTED: usize = 4096;

/// The answers of one server process (and of those before it, when kept in a state
/// directory).
#[derive(Debug)]
pub struct Answers {
    table: Mutex<Table>,
    changed: Condvar,
    /// `Welcome::instance`: random, or the one of the log taken over.
    instance: AtomicU64,
    /// Repeats waiting for a first run (for tests).
    waiting: AtomicUsize,
}

impl Default for Answers {
    fn default() -> Self {
        let instance = crate::sys::random_128()
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .unwrap_or_else(|_| std::process::id().into());
        Answers {
            table: Mutex::default(),
            changed: Condvar::new(),
            instance: AtomicU64::new(instance),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// Whether `r` may carry a key: a change of names that must not run twice.
pub fn takes_key(r: &Request) -> bool {
    matches!(
        r,
        Request::Create { .. }
            | Request::MkNod { .. }
            | Request::MkDir { .. }
            | Request::Unlink { .. }
            | Request::RmDir { .. }
            | Request::Symlink { .. }
            | Request::Rename { .. }
            | Request::Link { .. }
    )
}

/// Marks the slot finished if `run` unwinds, so that nobody waits for it forever.
struct Finish<'a> {
    answers: &'a Answers,
    key: OnceKey,
    answer: Option<Answer>,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        // Unwound: nothing is known of the change (it may have run in part); a repeat
        // is told so.
        let answer = self.answer.take().unwrap_or(Ok(Response::NotRemembered));
        let mut t = self.answers.lock();
        // (A session with a change running is never forgotten.)
        if let Some(s) = t.sessions.get_mut(&self.key.session) {
            s.running = s.running.saturating_sub(1);
            s.finish(self.key.seq, answer.clone());
            // Logged before the answer leaves: the caller sends it after this.
            t.note(&Event::Done {
                session: self.key.session,
                seq: self.key.seq,
                answer: Cow::Owned(answer),
            });
        }
        drop(t);
        self.answers.changed.notify_all();
    }
}

impl Answers {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run the change named `key` with `run`, unless it ran (or runs) already: then
    /// its first answer.
    pub fn run(&self, key: OnceKey, run: impl FnOnce() -> Answer) -> Answer {
        self.run_or_replay(key, None, run, |first| first)
    }

    /// Run `run`, a change of names sent without a key (`ferry put`, an older client):
    /// noted before and after (`Event::Other`), so that a probe of a keyed change it
    /// may have touched is not judged ([`Table::settle_replayed`]).
    pub fn unkeyed<T>(&self, run: impl FnOnce() -> T) -> T {
        struct Ended<'a>(&'a Answers);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                let mut t = self.0.lock();
                t.others_running = t.others_running.saturating_sub(1);
                t.note(&Event::Other { begun: false });
            }
        }
        {
            let mut t = self.lock();
            t.others_running += 1;
            t.note(&Event::Other { begun: true });
        }
        let _ended = Ended(self);
        run()
    }

    /// What a change about to run finds (`probe`), for a start after the process died
    /// in it (see [`Probe`]); taken only while there is a log to keep it in.
    pub fn look(&self, probe: impl FnOnce() -> Option<Probe>) -> Option<Look> {
        let mark = {
            let t = self.lock();
            t.log.as_ref()?;
            t.changes
        };
        probe().map(|probe| Look { probe, mark })
    }

    /// [`Answers::run`] with what the change found before it runs (logged with its
    /// `Begin`, see [`Answers::look`]), a repeat answered with `replay` of the first
    /// answer (a `Create`'s names a handle of the connection that broke: its repeat
    /// opens the file again on its own).
    pub fn run_or_replay(
        &self,
        key: OnceKey,
        look: Option<Look>,
        run: impl FnOnce() -> Answer,
        replay: impl FnOnce(Answer) -> Answer,
    ) -> Answer {
        let mut t = self.lock();
        t.clock += 1;
        let now = t.clock;
        loop {
            match t
                .sessions
                .get(&key.session)
                .and_then(|s| s.slots.get(&key.seq))
            {
                Some(Slot::Running(_)) => {
                    self.waiting.fetch_add(1, Ordering::SeqCst);
                    t = self.changed.wait(t).unwrap_or_else(|p| p.into_inner());
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                }
                Some(Slot::Done(answer)) => {
                    let answer = answer.clone();
                    if let Some(s) = t.sessions.get_mut(&key.session) {
                        s.used = now;
                    }
                    drop(t);
                    return replay(answer);
                }
                None => break,
            }
        }
        let arrived_maybe = key.repeat
            && !t
                .sessions
                .get(&key.session)
                .is_some_and(|s| s.never_arrived(key.seq));
        if arrived_maybe {
            // Its answer was forgotten, or it came before this record was made: it
            // may have run. So that a first send still on its way (behind other
            // requests of a connection the client gave up on) does not run after this
            // answer, the key is remembered with it.
            let s = self.session(&mut t, key.session, key.seq, now);
            s.finish(key.seq, Ok(Response::NotRemembered));
            t.note(&Event::Done {
                session: key.session,
                seq: key.seq,
                answer: Cow::Owned(Ok(Response::NotRemembered)),
            });
            return Ok(Response::NotRemembered);
        }
        // A probe taken before another change was noted may no longer be what this
        // change finds: none, then.
        let changes = t.changes;
        let probe = look.filter(|l| l.mark == changes).map(|l| l.probe);
        let s = self.session(&mut t, key.session, key.seq, now);
        let begun = probe.clone().map(|probe| {
            Box::new(Begun {
                probe,
                // (Its `Begin`, noted next.)
                at: changes + 1,
            })
        });
        s.slots.insert(key.seq, Slot::Running(begun));
        s.running += 1;
        // Logged before it runs: a process that dies in it leaves a change begun.
        t.note(&Event::Begin {
            session: key.session,
            seq: key.seq,
            probe,
        });
        drop(t);
        let mut finish = Finish {
            answers: self,
            key,
            answer: None,
        };
        let answer = run();
        finish.answer = Some(answer.clone());
        drop(finish);
        answer
    }

    /// The record of `session`, made if new; when that makes one too many, the least
    /// recently used other session with no change running is forgotten first.
    fn session<'t>(&self, t: &'t mut Table, session: u64, seq: u64, now: u64) -> &'t mut Session {
        if !t.sessions.contains_key(&session) {
            if t.sessions.len() >= MAX_SESSIONS {
                let oldest = t
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.running == 0)
                    .min_by_key(|(_, s)| s.used)
                    .map(|(&id, _)| id);
                if let Some(id) = oldest {
                    t.sessions.remove(&id);
                    t.evicted(id);
                    t.note(&Event::Evict { id });
                }
            }
            // A session forgotten before: no key of it is known never to have arrived.
            let first = match t.evicted.contains(&session) {
                true => u64::MAX,
                false => seq,
            };
            t.sessions.insert(
                session,
                Session {
                    first,
                    ..Session::default()
                },
            );
            t.note(&Event::Session {
                id: session,
                first,
                forgotten: None,
            });
        }
        // (Made above if new; the fallback knows nothing of any key.)
        let s = t.sessions.entry(session).or_insert_with(Session::unknown);
        s.used = now;
        s
    }

    /// Remembered answers in all (for tests of the bounds).
    pub fn remembered(&self) -> usize {
        self.lock().sessions.values().map(|s| s.slots.len()).sum()
    }

    /// `Welcome::instance`: names this table for clients, which repeat a key only to
    /// the table they first sent it to.
    pub fn instance(&self) -> u64 {
        self.instance.load(Ordering::Relaxed)
    }

    /// Keep this table in `dir` (the export's state folder, held by this process) from
    /// now on. A log an earlier process left there is replayed first and its instance
    /// taken over, so repeats of the changes it ran get their answers; one that cannot
    /// be used whole (see [`log::load`]) is replaced, and the table keeps its own new
    /// instance. Call before serving. On error the table stays in memory only, with
    /// its own instance (the earlier log may be left: it names another instance).
    pub fn keep_in(
        &self,
        dir: &Path,
        judge: &dyn Fn(&Probe) -> Verdict,
    ) -> std::io::Result<Restored> {
        let loaded = match log::load(dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "cannot read the answers log in {}: {e}; starting a new one",
                    dir.display()
                );
                None
            }
        };
        let mut t = self.lock();
        let mut restored = Restored::default();
        let mut instance = self.instance();
        if let Some(l) = loaded {
            for e in l.events {
                t.apply(e);
            }
            let died_in = t.settle_replayed(judge);
            instance = l.instance;
            restored = Restored {
                answers: t.sessions.values().map(|s| s.slots.len()).sum(),
                torn: l.torn,
                died_in,
            };
        }
        let log = log::Log::create(dir, instance, &t.snapshot())?;
        t.log = Some(log);
        self.instance.store(instance, Ordering::Relaxed);
        Ok(restored)
    }

    /// The probes the `Begin` events of the log in `dir` carry, in order (for tests of
    /// what changes log).
    #[cfg(test)]
    pub fn logged_probes(dir: &Path) -> Vec<Option<Probe>> {
        let loaded = log::load(dir).ok().flatten().expect("a log");
        loaded
            .events
            .into_iter()
            .filter_map(|e| match e {
                Event::Begin { probe, .. } => Some(probe),
                _ => None,
            })
            .collect()
    }

    /// Compact the log past `bytes` instead (for tests of compaction).
    #[cfg(test)]
    fn compact_sooner(&self, bytes: u64) {
        if let Some(log) = self.lock().log.as_mut() {
            log.compact_sooner(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn key(session: u64, seq: u64, repeat: bool) -> OnceKey {
        OnceKey {
            session,
            seq,
            repeat,
        }
    }

    #[test]
    fn a_repeat_gets_the_first_answer_without_running() {
        let a = Answers::default();
        let runs = Cell::new(0);
        let run = || {
            runs.set(runs.get() + 1);
            Ok(Response::Ok)
        };
        assert_eq!(a.run(key(1, 1, false), run), Ok(Response::Ok));
        let again = || {
            runs.set(runs.get() + 1);
            Err(libc::ENOENT)
        };
        assert_eq!(a.run(key(1, 1, true), again), Ok(Response::Ok));
        assert_eq!(runs.get(), 1);
        // Another key of the session runs.
        assert_eq!(
            a.run(key(1, 2, false), || Err(libc::EEXIST)),
            Err(libc::EEXIST)
        );
        assert_eq!(
            a.run(key(1, 2, true), || Ok(Response::Ok)),
            Err(libc::EEXIST)
        );
    }

    #[test]
    fn a_repeat_nobody_remembers_does_not_run() {
        let a = Answers::default();
        let ran = Cell::new(false);
        let r = a.run(key(9, 1, true), || {
            ran.set(true);
            Ok(Response::Ok)
        });
        assert_eq!(r, Ok(Response::NotRemembered));
        assert!(!ran.get(), "a repeat of an unknown session ran");
        // Its first send, late (still queued on a connection the client gave up on),
        // does not run after that answer either.
        let late = a.run(key(9, 1, false), || {
            ran.set(true);
            Ok(Response::Ok)
        });
        assert_eq!(late, Ok(Response::NotRemembered));
        assert!(
            !ran.get(),
            "a late first send ran after its repeat was answered"
        );
        // A known session: a key older than its record does not run either; a newer
        // one it has no record of never arrived, and runs.
        a.run(key(10, 5, false), || Ok(Response::Ok)).unwrap();
        assert_eq!(
            a.run(key(10, 4, true), || Err(libc::EXDEV)),
            Ok(Response::NotRemembered)
        );
        assert_eq!(
            a.run(key(10, 6, true), || Err(libc::EXDEV)),
            Err(libc::EXDEV)
        );
    }

    #[test]
    fn memory_is_bounded_and_forgotten_keys_are_not_run_again() {
        let a = Answers::default();
        for seq in 0..(MAX_PER_SESSION as u64 + 10) {
            a.run(key(5, seq, false), || Ok(Response::Ok)).unwrap();
        }
        assert_eq!(a.remembered(), MAX_PER_SESSION);
        let ran = Cell::new(false);
        let r = a.run(key(5, 3, true), || {
            ran.set(true);
            Ok(Response::Ok)
        });
        assert_eq!(r, Ok(Response::NotRemembered));
        assert!(!ran.get());
        for session in 100..(100 + MAX_SESSIONS as u64 + 5) {
            a.run(key(session, 10, false), || Ok(Response::Ok)).unwrap();
        }
        assert!(a.lock().sessions.len() <= MAX_SESSIONS);
        // Session 100 was forgotten whole: made again by an older key arriving late,
        // it does not take a newer key it has no record of for one never sent.
        a.run(key(100, 3, false), || Ok(Response::Ok)).unwrap();
        let ran = Cell::new(false);
        let r = a.run(key(100, 10, true), || {
            ran.set(true);
            Ok(Response::Ok)
        });
        assert_eq!(r, Ok(Response::NotRemembered));
        assert!(!ran.get(), "a forgotten session's key ran twice");
    }

    #[test]
    fn a_repeat_waits_for_a_first_run_in_progress() {
        let a = std::sync::Arc::new(Answers::default());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let a = a.clone();
            std::thread::spawn(move || {
                a.run(key(3, 1, false), || {
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    Ok(Response::Ok)
                })
            })
        };
        started_rx.recv().unwrap();
        let repeat = {
            let a = a.clone();
            std::thread::spawn(move || a.run(key(3, 1, true), || Err(libc::ENOENT)))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while a.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the repeat never waited"
            );
            std::thread::yield_now();
        }
        go_tx.send(()).unwrap();
        assert_eq!(first.join().unwrap(), Ok(Response::Ok));
        assert_eq!(repeat.join().unwrap(), Ok(Response::Ok));
    }

    #[test]
    fn a_run_that_unwinds_leaves_no_waiter_behind() {
        let a = Answers::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.run(key(4, 1, false), || panic!("a bug in a handler"))
        }));
        assert!(r.is_err());
        assert_eq!(
            a.run(key(4, 1, true), || Ok(Response::Ok)),
            Ok(Response::NotRemembered)
        );
    }

    /// A judge that can tell nothing.
    fn unknown(_: &Probe) -> Verdict {
        Verdict::Unknown
    }

    /// Every remembered (session, key) and its slot, for comparing tables.
    fn contents(a: &Answers) -> std::collections::BTreeMap<(u64, u64), String> {
        let t = a.lock();
        let mut out = std::collections::BTreeMap::new();
        for (&id, s) in &t.sessions {
            for (&seq, slot) in &s.slots {
                out.insert((id, seq), format!("{slot:?}"));
            }
            out.insert(
                (id, u64::MAX),
                format!("first {} forgot {:?}", s.first, s.forgotten),
            );
        }
        out
    }

    #[test]
    fn answers_outlive_the_process_that_kept_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = Answers::default();
        assert_eq!(
            a.keep_in(dir.path(), &unknown).expect("keep"),
            Restored::default()
        );
        a.run(key(1, 1, false), || Ok(Response::Ok)).unwrap();
        assert_eq!(
            a.run(key(1, 2, false), || Err(libc::EEXIST)),
            Err(libc::EEXIST)
        );
        // The process dies while it runs key 3: the next one starts from its log.
        let later = std::cell::RefCell::new(None);
        a.run(key(1, 3, false), || {
            let b = Answers::default();
            let restored = b.keep_in(dir.path(), &unknown).expect("take over");
            *later.borrow_mut() = Some((b, restored));
            Ok(Response::Ok)
        })
        .unwrap();
        let (b, restored) = later.into_inner().expect("the run ran");
        assert_eq!(
            b.instance(),
            a.instance(),
            "the instance was not taken over"
        );
        assert_eq!(
            restored,
            Restored {
                answers: 3,
                torn: false,
                died_in: DiedIn {
                    unknown: 1,
                    ..DiedIn::default()
                },
            }
        );
        let runs = Cell::new(0);
        let run = |r: Answer| {
            runs.set(runs.get() + 1);
            r
        };
        assert_eq!(
            b.run(key(1, 1, true), || run(Err(libc::ENOENT))),
            Ok(Response::Ok)
        );
        assert_eq!(
            b.run(key(1, 2, true), || run(Ok(Response::Ok))),
            Err(libc::EEXIST)
        );
        // Begun, never answered: whether it ran is unknown.
        assert_eq!(
            b.run(key(1, 3, true), || run(Ok(Response::Ok))),
            Ok(Response::NotRemembered)
        );
        assert_eq!(runs.get(), 0, "a change the log knows of ran again");
        // A key the dead process never got runs; a session it never knew does not.
        assert_eq!(
            b.run(key(1, 4, true), || run(Err(libc::EXDEV))),
            Err(libc::EXDEV)
        );
        assert_eq!(
            b.run(key(2, 1, true), || run(Ok(Response::Ok))),
            Ok(Response::NotRemembered)
        );
        assert_eq!(runs.get(), 1);
        // And the next process again, from the log the second one kept.
        let c = Answers::default();
        c.keep_in(dir.path(), &unknown).expect("take over again");
        assert_eq!(c.instance(), a.instance());
        assert_eq!(contents(&c), contents(&b));
        // Without a log, a table is another instance.
        let other = tempfile::tempdir().expect("temp dir");
        let d = Answers::default();
        d.keep_in(other.path(), &unknown).expect("keep");
        assert_ne!(d.instance(), a.instance());
    }

    #[test]
    fn a_log_cut_short_keeps_what_is_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = Answers::default();
        a.keep_in(dir.path(), &unknown).expect("keep");
        for seq in 1..=3 {
            a.run(key(7, seq, false), || Ok(Response::Ok)).unwrap();
        }
        // The process died writing an event: its length promises more than is there.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("answers"))
            .expect("open the log");
        std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3]).expect("append");
        let b = Answers::default();
        let restored = b.keep_in(dir.path(), &unknown).expect("take over");
        assert_eq!(
            restored,
            Restored {
                answers: 3,
                torn: true,
                died_in: DiedIn::default(),
            }
        );
        assert_eq!(contents(&b), contents(&a));
        assert_eq!(b.run(key(7, 2, true), || Err(libc::EIO)), Ok(Response::Ok));
        // Not a log at all: a new table, with its own instance.
        std::fs::write(dir.path().join("answers"), b"something else").expect("write");
        let c = Answers::default();
        assert_eq!(
            c.keep_in(dir.path(), &unknown).expect("keep"),
            Restored::default()
        );
        assert_ne!(c.instance(), a.instance());
    }

    /// A log that cannot be used whole is not taken over: what it lacks could be a
    /// change that ran, which a repeat would then run again.
    #[test]
    fn a_log_not_whole_is_not_taken_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("answers");
        let a = Answers::default();
        a.keep_in(dir.path(), &unknown).expect("keep");
        a.run(key(1, 1, false), || Ok(Response::Ok)).unwrap();
        let middle = std::fs::metadata(&path).expect("log").len() as usize;
        a.run(key(1, 2, false), || Ok(Response::Ok)).unwrap();
        let good = std::fs::read(&path).expect("read the log");
        // (magic 16, format 4, protocol 4, boot id 36, instance 8)
        type Spoil = Box<dyn Fn(&mut Vec<u8>)>;
        let spoilt: [(&str, Spoil); 4] = [
            (
                "an unreadable event in the middle",
                Box::new(move |b: &mut Vec<u8>| {
                    b.splice(middle..middle, [3, 0, 0, 0, 0xff, 0xff, 0xff]);
                }),
            ),
            ("another protocol", Box::new(|b: &mut Vec<u8>| b[20] ^= 1)),
            ("another boot", Box::new(|b: &mut Vec<u8>| b[24] ^= 1)),
            (
                "an oversized event",
                Box::new(|b: &mut Vec<u8>| b.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f])),
            ),
        ];
        for (what, spoil) in spoilt {
            let mut bytes = good.clone();
            spoil(&mut bytes);
            std::fs::write(&path, &bytes).expect("write the log");
            let b = Answers::default();
            assert_eq!(
                b.keep_in(dir.path(), &unknown).expect("keep"),
                Restored::default(),
                "{what}"
            );
            assert_ne!(b.instance(), a.instance(), "{what}: taken over");
            let ran = Cell::new(false);
            let r = b.run(key(1, 2, true), || {
                ran.set(true);
                Ok(Response::Ok)
            });
            assert_eq!(r, Ok(Response::NotRemembered), "{what}");
            assert!(!ran.get(), "{what}: a change ran twice");
        }
        // The good one is.
        std::fs::write(&path, &good).expect("write the log");
        let c = Answers::default();
        c.keep_in(dir.path(), &unknown).expect("keep");
        assert_eq!(c.instance(), a.instance());
    }

    #[test]
    fn a_compacted_log_keeps_what_the_table_holds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = Answers::default();
        a.keep_in(dir.path(), &unknown).expect("keep");
        let ino = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path().join("answers"))
                .expect("log")
                .ino()
        };
        let first_log = ino();
        a.compact_sooner(4096);
        // One session past its bound, then enough sessions to forget some whole.
        for seq in 0..(MAX_PER_SESSION as u64 + 20) {
            a.run(key(5, seq, false), || Err(libc::EEXIST)).unwrap_err();
        }
        let second_log = ino();
        assert_ne!(second_log, first_log, "the log was not compacted");
        a.compact_sooner(4096);
        for session in 100..(100 + MAX_SESSIONS as u64 + 3) {
            a.run(key(session, 10, false), || Ok(Response::Ok)).unwrap();
            a.run(key(session, 11, false), || Ok(Response::Ok)).unwrap();
        }
        let third_log = ino();
        assert_ne!(third_log, second_log, "the log was not compacted again");
        // Compacted last, with the table as it ends.
        a.compact_sooner(4096);
        a.run(key(100 + MAX_SESSIONS as u64 + 2, 12, false), || {
            Ok(Response::Ok)
        })
        .unwrap();
        assert_ne!(ino(), third_log, "the log was not compacted a third time");
        let b = Answers::default();
        b.keep_in(dir.path(), &unknown).expect("take over");
        assert_eq!(contents(&b), contents(&a));
        assert_eq!(b.lock().evicted, a.lock().evicted);
        // What was forgotten before stays unknown, and does not run.
        let ran = Cell::new(false);
        let mark = || {
            ran.set(true);
            Ok(Response::Ok)
        };
        assert_eq!(b.run(key(5, 2, true), mark), Ok(Response::NotRemembered));
        assert_eq!(b.run(key(100, 12, true), mark), Ok(Response::NotRemembered));
        assert!(!ran.get(), "a forgotten key ran");
        assert_eq!(
            b.run(key(100 + MAX_SESSIONS as u64 + 2, 11, true), mark),
            Ok(Response::Ok)
        );
        assert!(!ran.get());
    }

    fn a_probe() -> Probe {
        Probe::Rename {
            from: (RelPath(b"d".to_vec()), Name(b"a".to_vec())),
            from_id: (1, 2),
            to: (RelPath(Vec::new()), Name(b"b".to_vec())),
            to_id: None,
            exchange: false,
            ctimes: ((5, 6), (7, 8)),
        }
    }

    /// A new table takes over the log in `dir` (the process "died" while something ran),
    /// judging with `verdict` and counting its calls in `judged`.
    fn take_over(dir: &Path, verdict: &Verdict, judged: &Cell<u32>) -> Answers {
        let b = Answers::default();
        let judge = |p: &Probe| {
            assert_eq!(p, &a_probe(), "another probe was judged");
            judged.set(judged.get() + 1);
            verdict.clone()
        };
        b.keep_in(dir, &judge).expect("take over");
        b
    }

    /// Key (1, 2) runs on `a` with `look`, and the process "dies" in it: `die` makes
    /// the table that takes over. Returns that table.
    fn die_in(a: &Answers, look: Option<Look>, die: &dyn Fn() -> Answers) -> Answers {
        let later = std::cell::RefCell::new(None);
        a.run_or_replay(
            key(1, 2, false),
            look,
            || {
                *later.borrow_mut() = Some(die());
                Ok(Response::Ok)
            },
            |first| first,
        )
        .unwrap();
        later.into_inner().expect("the run ran")
    }

    /// A change the process died in (begun, never answered), with a probe: the next
    /// start asks the judge, and answers its repeat as the verdict says.
    #[test]
    fn a_change_the_process_died_in_is_judged() {
        for compacted in [false, true] {
            for (verdict, want, runs) in [
                (Verdict::Ran(Response::Ok), Ok(Response::Ok), 0),
                (Verdict::NotRun, Err(libc::EXDEV), 1),
                (Verdict::Unknown, Ok(Response::NotRemembered), 0),
            ] {
                let dir = tempfile::tempdir().expect("temp dir");
                let a = Answers::default();
                a.keep_in(dir.path(), &unknown).expect("keep");
                a.run(key(1, 1, false), || Ok(Response::Ok)).unwrap();
                let look = a.look(|| Some(a_probe()));
                assert!(look.is_some(), "no probe taken with a log");
                if compacted {
                    // At its own `Begin`: the compacted log keeps its probe.
                    a.compact_sooner(0);
                }
                let judged = Cell::new(0);
                let b = die_in(&a, look, &|| take_over(dir.path(), &verdict, &judged));
                let what = format!("{verdict:?}, compacted {compacted}");
                assert_eq!(judged.get(), 1, "{what}: not judged once");
                let ran = Cell::new(0);
                let r = b.run(key(1, 2, true), || {
                    ran.set(ran.get() + 1);
                    Err(libc::EXDEV)
                });
                assert_eq!(r, want, "{what}");
                assert_eq!(ran.get(), runs, "{what}");
            }
        }
        // Without a log, no probe is taken.
        let a = Answers::default();
        assert!(a.look(|| Some(a_probe())).is_none());
    }

    /// A probe is judged only if no other change can have touched its names since it
    /// was taken (that change could have undone this one: "not run" would run it
    /// twice).
    #[test]
    fn a_probe_another_change_may_have_touched_is_not_judged() {
        type Scenario = Box<dyn Fn(&Answers, &Path, &Cell<u32>) -> Answers>;
        const NOT_RUN: &Verdict = &Verdict::NotRun;
        let scenarios: [(&str, Scenario); 8] = [
            (
                "another change between its probe and its run",
                Box::new(move |a, dir, judged| {
                    let look = a.look(|| Some(a_probe()));
                    a.run(key(2, 1, false), || Ok(Response::Ok)).unwrap();
                    die_in(a, look, &|| take_over(dir, NOT_RUN, judged))
                }),
            ),
            (
                "another change answered while it ran",
                Box::new(move |a, dir, judged| {
                    let look = a.look(|| Some(a_probe()));
                    die_in(a, look, &|| {
                        a.run(key(2, 1, false), || Ok(Response::Ok)).unwrap();
                        take_over(dir, NOT_RUN, judged)
                    })
                }),
            ),
            (
                "another change running with it",
                Box::new(move |a, dir, judged| {
                    let look = a.look(|| Some(a_probe()));
                    die_in(a, look, &|| {
                        let later = std::cell::RefCell::new(None);
                        a.run(key(2, 1, false), || {
                            *later.borrow_mut() = Some(take_over(dir, NOT_RUN, judged));
                            Ok(Response::Ok)
                        })
                        .unwrap();
                        later.into_inner().expect("ran")
                    })
                }),
            ),
            (
                "another change running since before it",
                Box::new(move |a, dir, judged| {
                    let later = std::cell::RefCell::new(None);
                    a.run(key(2, 1, false), || {
                        let look = a.look(|| Some(a_probe()));
                        *later.borrow_mut() =
                            Some(die_in(a, look, &|| take_over(dir, NOT_RUN, judged)));
                        Ok(Response::Ok)
                    })
                    .unwrap();
                    later.into_inner().expect("ran")
                }),
            ),
            (
                "a change without a key while it ran",
                Box::new(move |a, dir, judged| {
                    let look = a.look(|| Some(a_probe()));
                    die_in(a, look, &|| {
                        a.unkeyed(|| ());
                        take_over(dir, NOT_RUN, judged)
                    })
                }),
            ),
            (
                "a change without a key running since before it",
                Box::new(move |a, dir, judged| {
                    a.unkeyed(|| {
                        let look = a.look(|| Some(a_probe()));
                        die_in(a, look, &|| take_over(dir, NOT_RUN, judged))
                    })
                }),
            ),
            (
                "a change without a key running at a compaction",
                Box::new(move |a, dir, judged| {
                    a.unkeyed(|| {
                        let look = a.look(|| Some(a_probe()));
                        // At its own `Begin`: the compacted log must still say that
                        // a change without a key was running.
                        a.compact_sooner(0);
                        die_in(a, look, &|| take_over(dir, NOT_RUN, judged))
                    })
                }),
            ),
            (
                "the log compacted at another change's answer while it ran",
                Box::new(move |a, dir, judged| {
                    let look = a.look(|| Some(a_probe()));
                    die_in(a, look, &|| {
                        a.run(key(2, 1, false), || {
                            a.compact_sooner(0);
                            Ok(Response::Ok)
                        })
                        .unwrap();
                        take_over(dir, NOT_RUN, judged)
                    })
                }),
            ),
        ];
        for (what, scenario) in scenarios {
            let dir = tempfile::tempdir().expect("temp dir");
            let a = Answers::default();
            a.keep_in(dir.path(), &unknown).expect("keep");
            a.run(key(1, 1, false), || Ok(Response::Ok)).unwrap();
            let judged = Cell::new(0);
            let b = scenario(&a, dir.path(), &judged);
            assert_eq!(judged.get(), 0, "{what}: judged");
            let ran = Cell::new(false);
            let r = b.run(key(1, 2, true), || {
                ran.set(true);
                Ok(Response::Ok)
            });
            assert_eq!(r, Ok(Response::NotRemembered), "{what}");
            assert!(!ran.get(), "{what}: ran again");
        }
    }

    #[test]
    fn a_rename_verdict_needs_its_names_as_it_left_them() {
        let (a, b, c) = ((1, 1), (1, 2), (1, 3));
        let v = |before, to_before, exchange, now| {
            let verdict = Verdict::of_rename(before, to_before, exchange, now, true);
            // Directories changed since: never "not run", the rest the same.
            let changed = Verdict::of_rename(before, to_before, exchange, now, false);
            match &verdict {
                Verdict::NotRun => assert_eq!(changed, Verdict::Unknown),
                other => assert_eq!(&changed, other),
            }
            verdict
        };
        // a -> empty name
        assert_eq!(v(a, None, false, (Some(a), None)), Verdict::NotRun);
        assert_eq!(
            v(a, None, false, (None, Some(a))),
            Verdict::Ran(Response::Ok)
        );
        assert_eq!(
            v(a, None, false, (Some(c), Some(a))),
            Verdict::Ran(Response::Ok)
        );
        assert_eq!(v(a, None, false, (None, None)), Verdict::Unknown);
        assert_eq!(v(a, None, false, (Some(a), Some(c))), Verdict::Unknown);
        // a over b
        assert_eq!(v(a, Some(b), false, (Some(a), Some(b))), Verdict::NotRun);
        assert_eq!(
            v(a, Some(b), false, (None, Some(a))),
            Verdict::Ran(Response::Ok)
        );
        assert_eq!(v(a, Some(b), false, (None, Some(b))), Verdict::Unknown);
        // a and b exchanged
        assert_eq!(v(a, Some(b), true, (Some(a), Some(b))), Verdict::NotRun);
        assert_eq!(
            v(a, Some(b), true, (Some(b), Some(a))),
            Verdict::Ran(Response::Ok)
        );
        assert_eq!(v(a, Some(b), true, (None, Some(a))), Verdict::Unknown);
        // Two links to one file: a rename between them changes nothing, and runs again.
        assert_eq!(v(a, Some(a), false, (Some(a), Some(a))), Verdict::NotRun);
    }
}
