//! openraft's async runtime for the control plane: tokio, as openraft's own runtime, with one
//! difference: the random numbers openraft draws (its election timeouts) come from a seeded
//! generator when the current thread has one.
//!
//! A node never seeds one, and draws from the operating system as openraft does. The simulator
//! seeds one per run ([`SeededRaftRng::install`]) on the one thread its runtime runs on, so that
//! elections happen at the same virtual instants for the same seed; without it every run would
//! differ.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore as _, SeedableRng};

thread_local! {
    /// The seeded generator of the current thread, while a [`SeededRaftRng`] guard lives.
    static SEEDED: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
}

/// While alive, openraft's random draws on this thread come from a generator seeded with the
/// given seed. Dropping it (at the end of a run) restores the operating system's randomness, so
/// nothing leaks from one run into the next.
#[derive(Debug)]
#[must_use = "the seed holds only while the guard lives"]
pub struct SeededRaftRng(());

impl SeededRaftRng {
    /// Seeds this thread's draws with `seed`; replaces any earlier seed.
    pub fn install(seed: u64) -> SeededRaftRng {
        SEEDED.with(|s| *s.borrow_mut() = Some(ChaCha8Rng::seed_from_u64(seed)));
        SeededRaftRng(())
    }
}

impl Drop for SeededRaftRng {
    fn drop(&mut self) {
        SEEDED.with(|s| *s.borrow_mut() = None);
    }
}

/// openraft's random source: the thread's seeded generator, else the operating system's.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftRng;

impl RaftRng {
    fn draw<T>(seeded: impl FnOnce(&mut ChaCha8Rng) -> T, os: impl FnOnce() -> T) -> T {
        SEEDED.with(|s| match s.borrow_mut().as_mut() {
            Some(rng) => seeded(rng),
            None => os(),
        })
    }
}

impl rand::RngCore for RaftRng {
    fn next_u32(&mut self) -> u32 {
        RaftRng::draw(|r| r.next_u32(), || rand::thread_rng().next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        RaftRng::draw(|r| r.next_u64(), || rand::thread_rng().next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let seeded = SEEDED.with(|s| match s.borrow_mut().as_mut() {
            Some(rng) => {
                rng.fill_bytes(dest);
                true
            }
            None => false,
        });
        if !seeded {
            rand::thread_rng().fill_bytes(dest);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// The control plane's runtime: openraft's tokio runtime, with [`RaftRng`] as its random source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BraidRuntime;

type Tokio = TokioRuntime;

impl AsyncRuntime for BraidRuntime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = RaftRng;
    type OneshotSender<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tokio as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        RaftRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        Tokio::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng as _;

    use super::*;

    fn draws() -> Vec<u64> {
        (0..8)
            .map(|_| BraidRuntime::thread_rng().gen_range(1_000..2_000))
            .collect()
    }

    #[test]
    fn a_seeded_thread_draws_the_same_numbers_and_unseeded_it_does_not_keep_them() {
        let first = {
            let _seed = SeededRaftRng::install(7);
            draws()
        };
        let again = {
            let _seed = SeededRaftRng::install(7);
            draws()
        };
        let other = {
            let _seed = SeededRaftRng::install(8);
            draws()
        };
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert!(first.iter().all(|d| (1_000..2_000).contains(d)));
        // The guard is gone: the draws come from the operating system again.
        assert!(SEEDED.with(|s| s.borrow().is_none()));
        assert_eq!(draws().len(), 8);
    }
}
