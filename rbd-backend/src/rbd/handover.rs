//! The image's exclusive lock across a live migration.
//!
//! Normally the server holds the lock for good (`Held`). librbd lets a client
//! that once took the lock explicitly write only while it holds it, so a
//! migration source cannot simply release it and keep writing. Instead, after
//! `migrate-out` the source *lends* it (`Lending`): each write-type request
//! takes the lock if nobody of ours holds it, and the last one in flight gives
//! it back. The destination opens without the lock (`Claim`) and takes it for
//! good at its first write, waiting while the source still has a write in
//! flight. After switchover the source no longer writes, so the lock is free.
//! Reads never need the lock.

use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{RbdBackend, META_GENERATION};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LockMode {
    Held,
    Lending,
    Claim,
}

#[derive(Debug)]
pub(super) struct LockState {
    pub mode: LockMode,
    /// Write-type requests in flight (they may need the lock).
    pub inflight: usize,
}

/// One write-type request's hold on the lock; gives it back when the last one
/// ends while lending.
pub(super) struct Lease<'a> {
    backend: &'a RbdBackend,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let b = self.backend;
        let mut st = b.lock_state();
        st.inflight -= 1;
        if st.mode == LockMode::Lending && st.inflight == 0 {
            b.give_back_lock();
        }
    }
}

/// Attempts to take a lent lock are spaced this far apart.
const RETRY: Duration = Duration::from_millis(50);

impl RbdBackend {
    pub(super) fn lock_state(&self) -> MutexGuard<'_, LockState> {
        self.lock_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Take a hold for a write-type request, taking the lock first if we lend
    /// it out or have not claimed it yet.
    pub(super) fn lease(&self) -> Result<Lease<'_>> {
        let mut st = self.lock_state();
        match st.mode {
            LockMode::Held => {}
            LockMode::Claim => {
                self.take_lock_waiting("claiming the image for this migration destination")?;
                self.record_claim()?;
                st.mode = LockMode::Held;
                tracing::info!(image = %self.spec, "migration destination: took the image's exclusive lock at the first write");
            }
            LockMode::Lending => {
                if st.inflight == 0 && !self.owns_lock_flag() {
                    self.take_lock_waiting("writing during a migration handover")?;
                }
            }
        }
        st.inflight += 1;
        Ok(Lease { backend: self })
    }

    /// Whether a flush has anything to do: while the lock is lent or not yet
    /// claimed and no write is in flight, every earlier write has completed,
    /// and with librbd's cache off a completed write is already durable.
    pub(super) fn flush_needed(&self) -> bool {
        let st = self.lock_state();
        st.mode == LockMode::Held || st.inflight > 0
    }

    /// Whether we are the image's owner for good (not lending, not waiting to claim).
    pub(super) fn holds_for_good(&self) -> bool {
        self.lock_state().mode == LockMode::Held
    }

    /// `migrate-out`: lend the lock from now on.
    pub(super) fn start_lending(&self) -> Result<()> {
        let mut st = self.lock_state();
        if st.mode == LockMode::Held && !self.read_only {
            st.mode = LockMode::Lending;
            if st.inflight == 0 {
                self.give_back_lock();
            }
            tracing::info!(image = %self.spec,
                "migration: lending the exclusive lock per write from now on, so the destination can take it");
        }
        Ok(())
    }

    /// `migrate-abort`: hold the lock for good again. Fails, naming the holder,
    /// if the destination has taken it.
    pub(super) fn stop_lending(&self) -> Result<()> {
        let mut st = self.lock_state();
        match st.mode {
            LockMode::Held => return Ok(()),
            LockMode::Lending if self.owns_lock_flag() => {}
            LockMode::Lending | LockMode::Claim => {
                self.take_lock_within(
                    Duration::from_secs(5),
                    "taking the lock back after an aborted migration",
                )?;
            }
        }
        if st.mode == LockMode::Claim {
            self.record_claim()?;
        }
        st.mode = LockMode::Held;
        tracing::info!(image = %self.spec, "holding the image's exclusive lock for good again");
        Ok(())
    }

    fn give_back_lock(&self) {
        if self.release_lock_flag() {
            if let Err(e) = self.image.lock_release() {
                tracing::warn!(image = %self.spec, error = %e,
                    "giving the lent lock back failed; it is freed when this client disconnects");
            }
        }
    }

    fn take_lock_waiting(&self, why: &str) -> Result<()> {
        let wait = self
            .lock_wait
            .unwrap_or(Duration::from_secs(3600 * 24 * 365));
        self.take_lock_within(wait, why)
    }

    /// Take the lock, retrying while another client (the other side of the
    /// migration) holds it, for at most `wait`.
    fn take_lock_within(&self, wait: Duration, why: &str) -> Result<()> {
        let start = Instant::now();
        let mut logged = false;
        loop {
            let left = wait.saturating_sub(start.elapsed());
            match self.acquire_bounded(Some(left.max(Duration::from_millis(1)))) {
                Some(Ok(())) => {
                    self.set_lock_flag();
                    return Ok(());
                }
                Some(Err(e)) if matches!(e.0, libc::EROFS | libc::EBUSY) && start.elapsed() < wait => {
                    if !logged {
                        tracing::info!(image = %self.spec, "{why}: the other side of the migration holds the lock; waiting for it");
                        logged = true;
                    }
                    std::thread::sleep(RETRY);
                }
                other => {
                    return Err(self.lock_error(
                        other,
                        wait,
                        &format!("{why}: the other side of the migration (or another client) still holds the lock"),
                    ))
                }
            }
        }
    }

    /// Record the destination as the image's owner in its metadata, now that
    /// it holds the lock (the source left the metadata alone while lending).
    fn record_claim(&self) -> Result<()> {
        let gen = self
            .image
            .metadata_get(META_GENERATION)
            .map_err(|e| self.meta_err("reading image metadata", e))?
            .and_then(|g| g.trim().parse::<u64>().ok())
            .unwrap_or(0);
        self.set_owner("attached", gen + 1)
    }
}
