//! Seed work at the scheduler's lowest priority.
//!
//! A seed's CPU work (reading and compressing chunks on the leader;
//! receiving, decrypting, verifying and writing them on the new node) can
//! run on threads in Linux's `SCHED_IDLE` class. Such a thread runs on a
//! core no other thread wants, and a waking thread of any other class
//! preempts it at once. So a seed takes the CPU the node's own work (its
//! writes, or another database on the same host) leaves free, without
//! waiting for the busy control's feedback. `nice 19` is weaker: under
//! EEVDF a running nice-19 thread keeps the core for the rest of its
//! slice when a normal one wakes. `SCHED_IDLE` is not strict starvation:
//! on a saturated host such threads still get a small share, so the
//! connection's ACKs and keep-alives go on, but the seed crawls. That is
//! why it is the operator's choice and not the default.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};

/// The CPU priority of a seed's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeedPriority {
    /// `SCHED_IDLE`: the seed takes only CPU nothing else wants, and on a
    /// saturated host it crawls (a 218 MB seed beside four busy loops on
    /// two cores took 215 s, against 1.0 s at normal priority).
    Idle,
    /// The threads of the caller's runtime, at their priority.
    #[default]
    Normal,
}

/// Puts the calling thread in the `SCHED_IDLE` class; false if the OS
/// refused (a warning is logged once per process).
pub fn make_current_thread_idle() -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let r = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    match r {
        Ok(()) => true,
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = ?e, "could not lower the seed threads' CPU priority; seeds run at normal priority");
            }
            false
        }
    }
}

/// Whether the calling thread is in the `SCHED_IDLE` class.
pub fn current_thread_is_idle() -> bool {
    matches!(
        thread_priority::thread_schedule_policy(),
        Ok(ThreadSchedulePolicy::Normal(
            NormalThreadSchedulePolicy::Idle
        ))
    )
}

/// The process's runtime for seed work: its worker and blocking threads
/// are all `SCHED_IDLE`. Built on first use and kept for the process's
/// life, so it is never dropped inside another runtime.
fn idle_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .thread_name("ferry-seed")
            .on_thread_start(|| {
                make_current_thread_idle();
            })
            .enable_all()
            .build();
        match built {
            Ok(rt) => Some(rt),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the low-priority seed runtime; seeds run at normal priority");
                None
            }
        }
    })
    .as_ref()
}

/// The idle runtime for work at `priority`, if it is idle and the runtime
/// could be built. At normal priority the runtime is never built.
fn runtime_for(priority: SeedPriority) -> Option<&'static tokio::runtime::Runtime> {
    match priority {
        SeedPriority::Idle => idle_runtime(),
        SeedPriority::Normal => None,
    }
}

/// Runs blocking seed work (reading, compressing) at `priority`, on the
/// idle runtime's blocking threads or the caller's.
pub fn spawn_blocking<F, R>(priority: SeedPriority, f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    match runtime_for(priority) {
        Some(rt) => rt.spawn_blocking(f),
        None => tokio::task::spawn_blocking(f),
    }
}

/// Runs a seed's future at `priority`: on the idle runtime, with every
/// task and blocking call it starts there too (its QUIC endpoint among
/// them), or in place. Dropping the returned future cancels the work.
pub async fn run<F>(priority: SeedPriority, fut: F) -> Result<F::Output, tokio::task::JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime_for(priority) {
        Some(rt) => {
            let mut task = AbortOnDrop(rt.spawn(fut));
            (&mut task.0).await
        }
        None => Ok(fut.await),
    }
}

/// Aborts its task when dropped: the caller stopped waiting for it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_seed_work_runs_on_idle_threads_and_normal_work_does_not() {
        assert!(!current_thread_is_idle());
        let on_worker = run(SeedPriority::Idle, async { current_thread_is_idle() })
            .await
            .unwrap();
        let blocking = spawn_blocking(SeedPriority::Idle, current_thread_is_idle)
            .await
            .unwrap();
        assert!(on_worker && blocking, "{on_worker} {blocking}");
        let normal = run(SeedPriority::Normal, async { current_thread_is_idle() })
            .await
            .unwrap();
        let normal_blocking = spawn_blocking(SeedPriority::Normal, current_thread_is_idle)
            .await
            .unwrap();
        assert!(!normal && !normal_blocking);
    }

    #[tokio::test]
    async fn dropping_an_idle_run_cancels_its_work() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let fut = run(SeedPriority::Idle, async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        // Polled once, so the task is started, then dropped.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), fut).await;
        // The task's sender is dropped with the aborted task.
        assert!(rx.await.is_err());
    }
}
