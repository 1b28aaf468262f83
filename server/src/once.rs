//! Changes that run at most once however often a client sends them ([`OnceKey`]).
//!
//! A client whose connection broke before an answer cannot tell whether its change ran:
//! a `rename` that ran and is sent again fails with `ENOENT`, a `mkdir` with `EEXIST`.
//! So it names each such change with a key and sends it again with the same key; this
//! table remembers the answers of recent keys and gives a repeat the first answer (or
//! waits for it, while the first run is still running) instead of running it twice.
//!
//! It lives in memory, shared by all connections of this process: a server restart
//! forgets it. A repeat it has no record of runs only if its first send cannot have
//! arrived: the session's record was made by a key no newer than this one (so this
//! key, had it arrived, would be in it) and none of its answers newer than this key
//! was forgotten. Otherwise it is answered `NotRemembered` without running, and that
//! answer is remembered under the key, so a first send still on its way does not run
//! after it. This is safe because a client repeats a key only to the process it first
//! sent it to (`Welcome::instance`): a first send to a process since replaced could
//! have run there. Bounded: at most [`MAX_SESSIONS`] sessions (the least recently used
//! one goes) of at most [`MAX_PER_SESSION`] answers each (the oldest goes, and the
//! session remembers the newest key it forgot).
//!
//! Invariant: a slot is `Running` only while one thread is inside the change's
//! synchronous run (it is set just before, replaced right after, also on unwinding), so
//! a repeat that waits for it waits for a system call or two, never for another request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};

use ferry_common::{OnceKey, Request, Response};

use crate::sys::Errno;

/// Most sessions (client mounts) remembered at once.
pub const MAX_SESSIONS: usize = 64;
/// Most answers remembered per session.
pub const MAX_PER_SESSION: usize = 1024;

type Answer = Result<Response, Errno>;

#[derive(Debug)]
enum Slot {
    Running,
    Done(Answer),
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
}

/// Most forgotten sessions remembered as such.
const MAX_EVICTED: usize = 4096;

/// The answers of one server process.
#[derive(Debug, Default)]
pub struct Answers {
    table: Mutex<Table>,
    changed: Condvar,
    /// Repeats waiting for a first run (for tests).
    waiting: std::sync::atomic::AtomicUsize,
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
        let answer = self.answer.take();
        let mut t = self.answers.lock();
        // (A session with a change running is never forgotten.)
        if let Some(s) = t.sessions.get_mut(&self.key.session) {
            s.running = s.running.saturating_sub(1);
            match answer {
                Some(a) => {
                    s.slots.insert(self.key.seq, Slot::Done(a));
                    s.remember_done(self.key.seq);
                }
                // Unwound: nothing is known of the change (it may have run in part);
                // a repeat is told so.
                None => {
                    s.slots
                        .insert(self.key.seq, Slot::Done(Ok(Response::NotRemembered)));
                    s.remember_done(self.key.seq);
                }
            }
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
        self.run_or_replay(key, run, |first| first)
    }

    /// [`Answers::run`], a repeat answered with `replay` of the first answer (a
    /// `Create`'s names a handle of the connection that broke: its repeat opens the file
    /// again on its own).
    pub fn run_or_replay(
        &self,
        key: OnceKey,
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
                Some(Slot::Running) => {
                    self.waiting
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    t = self.changed.wait(t).unwrap_or_else(|p| p.into_inner());
                    self.waiting
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
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
            s.slots
                .insert(key.seq, Slot::Done(Ok(Response::NotRemembered)));
            s.remember_done(key.seq);
            return Ok(Response::NotRemembered);
        }
        let s = self.session(&mut t, key.session, key.seq, now);
        s.slots.insert(key.seq, Slot::Running);
        s.running += 1;
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
        if !t.sessions.contains_key(&session) && t.sessions.len() >= MAX_SESSIONS {
            let oldest = t
                .sessions
                .iter()
                .filter(|(_, s)| s.running == 0)
                .min_by_key(|(_, s)| s.used)
                .map(|(&id, _)| id);
            if let Some(id) = oldest {
                t.sessions.remove(&id);
                if t.evicted.insert(id) {
                    t.evicted_order.push_back(id);
                }
                while t.evicted_order.len() > MAX_EVICTED {
                    if let Some(old) = t.evicted_order.pop_front() {
                        t.evicted.remove(&old);
                    }
                }
            }
        }
        // A session forgotten before: no key of it is known never to have arrived.
        let first = match t.evicted.contains(&session) {
            true => u64::MAX,
            false => seq,
        };
        let s = t.sessions.entry(session).or_insert_with(|| Session {
            first,
            ..Session::default()
        });
        s.used = now;
        s
    }

    /// Remembered answers in all (for tests of the bounds).
    pub fn remembered(&self) -> usize {
        self.lock().sessions.values().map(|s| s.slots.len()).sum()
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
}
