//! The proxies' worker threads: each runs one single-threaded tokio runtime (the nginx
//! model: a connection and the upstream exchanges it causes stay on one thread).
//!
//! A busy HTTP proxy worker also gives up its CPU now and then ([`share_cpu`], called
//! between requests). An event loop that
//! always has more ready sockets never blocks, and the kernel then lets it run for a whole
//! scheduler tick (4 ms at HZ=250) while a thread woken on the same CPU (a client, or
//! the instance the worker just wrote to) waits for it: on a box where clients, proxy and
//! instances share few cores, that wait became the proxy's p99 latency.
//!
//! With one worker per CPU (the default), worker `n` is also bound to the `n`-th CPU
//! (`pin_workers`, like nginx's `worker_cpu_affinity auto` or haproxy's `cpu-map`): a
//! worker then never migrates, and the scheduler places the other threads around the
//! workers instead of stacking them behind one.
//!
//! Every worker of either proxy also asks the scheduler for a short time slice
//! ([`Placement::slice`], `sched_slice_us`; EEVDF, Linux 6.12 and later). The scheduler
//! then lets a worker that wakes up preempt sooner, and preempts it sooner when a client
//! or an instance on its CPU wakes up, instead of letting either wait out the default
//! slice (1.4 ms on 2 CPUs). What that buys and costs was measured on 2 CPUs shared with
//! the load generator and the instances: docs/benchmarks-history.md ("HTTP proxy",
//! "TCP proxy") has the figures.

use crate::sys::{allowed_cpus, pin_current_thread, set_time_slice};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a worker may run without blocking before it lets others on its CPU go
/// first, by how the workers sit on the CPUs: one worker per CPU, each bound to its own,
/// needs this only for the rare long run (a short value costs throughput); a worker that
/// has a CPU to share with everything else (fewer workers than CPUs, or unbound) needs it
/// often. Both values were measured on 2 CPUs shared with the load generator and the
/// instances (docs/benchmarks-history.md, "HTTP proxy").
fn share_after(pinned: bool) -> Duration {
    if pinned {
        Duration::from_millis(1)
    } else {
        Duration::from_micros(100)
    }
}

thread_local! {
    /// When this worker last woke from blocking (None: not a worker, or blocked now).
    static BUSY_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// This worker's [`share_after`].
    static SHARE_AFTER: Cell<Duration> = const { Cell::new(Duration::MAX) };
}

/// How a proxy runs its worker threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    /// Worker threads in all.
    pub workers: usize,
    /// Bind worker `n` to the `n`-th allowed CPU, when there are at least as many
    /// workers as CPUs.
    pub pin: bool,
    /// The time slice to ask the scheduler for (None: the kernel's default).
    pub slice: Option<Duration>,
}

/// Starts worker `n` of a proxy: a named thread that builds a current-thread runtime
/// and hands it to `body`. The runtime records when the thread blocks and wakes, for
/// [`share_cpu`]; the thread first asks for `placement.slice` and, with
/// `placement.pin`, is bound to its CPU (see [`cpu_for`]); failing either is logged.
/// Errors building the runtime are logged and end the thread.
pub(crate) fn spawn<F>(
    name: String,
    n: usize,
    placement: Placement,
    body: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(tokio::runtime::Runtime) + Send + 'static,
{
    // Fewer workers than CPUs gain nothing from fixed places and would lose the
    // scheduler's freedom to move them off a busy CPU (and every process's worker 0
    // would land on the same CPU).
    let cpu = if placement.pin && placement.workers >= allowed_cpus().len() {
        cpu_for(n)
    } else {
        None
    };
    let share = share_after(cpu.is_some());
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        SHARE_AFTER.set(share);
        if let Some(slice) = placement.slice
            && let Err(e) = set_time_slice(slice)
        {
            tracing::warn!(thread = %name, slice_us = slice.as_micros() as u64, error = %e, "cannot set a proxy worker's time slice");
        }
        if let Some(cpu) = cpu
            && let Err(e) = pin_current_thread(cpu)
        {
            tracing::warn!(thread = %name, cpu, error = %e, "cannot bind a proxy worker to its CPU");
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(|| BUSY_SINCE.set(None))
            .on_thread_unpark(|| BUSY_SINCE.set(Some(Instant::now())))
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(thread = %name, error = %e, "cannot start a proxy worker runtime");
                return;
            }
        };
        BUSY_SINCE.set(Some(Instant::now()));
        body(rt);
    })
}

/// Called by an HTTP proxy worker between requests: once it has run for [`share_after`] without
/// blocking, yields the CPU to whatever else is runnable on it (returns at once when
/// nothing is). Does nothing outside a worker thread.
pub(crate) fn share_cpu() {
    let Some(since) = BUSY_SINCE.get() else {
        return;
    };
    let now = Instant::now();
    if now.duration_since(since) >= SHARE_AFTER.get() {
        crate::sys::yield_cpu();
        BUSY_SINCE.set(Some(Instant::now()));
    }
}

/// The CPU for worker `n` of a proxy when its workers are bound one per CPU: the `n`-th
/// (wrapping) of the CPUs this process may run on. None when that set is unknown.
pub(crate) fn cpu_for(n: usize) -> Option<usize> {
    let cpus = allowed_cpus();
    (!cpus.is_empty()).then(|| cpus[n % cpus.len()])
}

/// The `sched_slice_us` setting as a slice to ask for: 0 is None (the kernel's default).
pub(crate) fn slice_setting(us: u64) -> Option<Duration> {
    (us > 0).then(|| Duration::from_micros(us))
}

/// Whether a `sched_slice_us` setting is one the kernel takes as it is: 0, or 100 µs to
/// 100 ms.
pub(crate) fn valid_slice_setting(us: u64) -> bool {
    us == 0 || (100..=100_000).contains(&us)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_worker_runs_only_on_its_cpu_and_others_stay_free() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "the affinity mask should be readable");
        let last = cpus.len() - 1;
        let (tx, rx) = std::sync::mpsc::channel();
        let placement = Placement {
            workers: cpus.len(),
            pin: true,
            slice: None,
        };
        let t = spawn("test-pinned".into(), last, placement, move |rt| {
            let inside = rt.block_on(async { allowed_cpus() });
            tx.send((inside, SHARE_AFTER.get())).unwrap();
        })
        .unwrap();
        t.join().unwrap();
        let (inside, share) = rx.recv().unwrap();
        assert_eq!(inside, vec![cpus[last]]);
        assert_eq!(share, Duration::from_millis(1));
        // The spawning thread keeps its own mask.
        assert_eq!(allowed_cpus(), cpus);
    }

    #[test]
    fn an_unpinned_worker_keeps_every_cpu_and_shares_often() {
        let cpus = allowed_cpus();
        let (tx, rx) = std::sync::mpsc::channel();
        let placement = Placement {
            workers: 1,
            pin: false,
            slice: None,
        };
        spawn("test-free".into(), 0, placement, move |_rt| {
            tx.send((
                allowed_cpus(),
                SHARE_AFTER.get(),
                BUSY_SINCE.get().is_some(),
            ))
            .unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        let (inside, share, busy) = rx.recv().unwrap();
        assert_eq!(inside, cpus);
        assert_eq!(share, Duration::from_micros(100));
        assert!(busy, "a running worker counts as busy");
    }

    #[test]
    fn share_cpu_outside_a_worker_does_nothing_and_inside_restarts_the_clock() {
        share_cpu(); // not a worker: no state, no panic
        assert!(BUSY_SINCE.get().is_none());
        let (tx, rx) = std::sync::mpsc::channel();
        let placement = Placement {
            workers: 1,
            pin: false,
            slice: None,
        };
        spawn("test-share".into(), 0, placement, move |_rt| {
            let before = BUSY_SINCE.get().unwrap();
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_millis(2) {
                std::hint::spin_loop();
            }
            share_cpu();
            tx.send(BUSY_SINCE.get().unwrap() > before).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        assert!(
            rx.recv().unwrap(),
            "a long run yields and restarts the clock"
        );
    }

    #[test]
    fn a_single_worker_on_several_cpus_is_not_pinned() {
        let cpus = allowed_cpus();
        if cpus.len() < 2 {
            return; // one CPU: one worker is one per CPU, and pinned
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let placement = Placement {
            workers: 1,
            pin: true,
            slice: None,
        };
        spawn("test-one".into(), 0, placement, move |_rt| {
            tx.send((allowed_cpus(), SHARE_AFTER.get())).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(rx.recv().unwrap(), (cpus, Duration::from_micros(100)));
    }

    /// The calling thread's slice (ns) and nice value, as the kernel reports them.
    fn slice_and_nice() -> (u64, i32) {
        crate::sys::time_slice_and_nice().expect("sched_getattr")
    }

    #[test]
    fn a_worker_asks_for_its_time_slice_and_keeps_its_nice() {
        let (default_slice, nice) = slice_and_nice();
        let placement = Placement {
            workers: 1,
            pin: false,
            slice: Some(Duration::from_micros(300)),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("test-slice".into(), 0, placement, move |_rt| {
            tx.send(slice_and_nice()).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        let (slice, worker_nice) = rx.recv().unwrap();
        assert_eq!(worker_nice, nice, "the nice value is kept");
        if default_slice == 0 {
            // Before Linux 6.12 a normal thread has no slice of its own to report.
            assert_eq!(slice, 0);
        } else {
            assert_eq!(slice, 300_000, "default slice here: {default_slice} ns");
        }
    }

    #[test]
    fn cpu_for_wraps_over_the_allowed_cpus() {
        let cpus = allowed_cpus();
        assert_eq!(cpu_for(0), Some(cpus[0]));
        assert_eq!(cpu_for(cpus.len()), Some(cpus[0]));
    }
}
