//! `demo producer-consumer`: the seed's producer-consumer — producer threads feed a bounded
//! crossbeam channel, consumer threads drain it. Invariant: once producers stop, exactly one
//! sentinel per consumer goes in behind the items, so every item is consumed exactly once.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::report;

/// Sizes for `demo producer-consumer` (defaults: the seed's 12 items, 3 consumers, a
/// queue of 50, 10 ms to produce and 20 ms to consume an item).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Producer threads (items are dealt out among them)
    #[arg(long, default_value_t = 1, value_parser = super::positive)]
    pub(crate) producers: usize,
    /// Consumer threads
    #[arg(long, default_value_t = 3, value_parser = super::positive)]
    pub(crate) consumers: usize,
    /// Items to produce in total
    #[arg(long, default_value_t = 12)]
    pub(crate) items: usize,
    /// Queue capacity: a producer blocks while the queue is full
    #[arg(long, default_value_t = 50, value_parser = super::positive)]
    pub(crate) capacity: usize,
    /// Time to produce one item, in milliseconds
    #[arg(long, default_value_t = 10)]
    pub(crate) produce_ms: u64,
    /// Time to consume one item, in milliseconds
    #[arg(long, default_value_t = 20)]
    pub(crate) consume_ms: u64,
    /// Ask the producers to stop after this many milliseconds (graceful early shutdown:
    /// what is already queued is still consumed)
    #[arg(long)]
    pub(crate) stop_after_ms: Option<u64>,
}

/// One produced item: who made it and its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Item {
    /// Index of the producer thread.
    pub(crate) producer: usize,
    /// The item's number, unique across producers.
    pub(crate) value: usize,
}

/// What goes through the queue: work, or the signal to stop.
#[derive(Debug)]
enum Msg {
    Item(Item),
    Stop,
}

/// Something that happened, reported to the caller as it happens. `at` is always the time
/// since the run started.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A producer queued an item.
    Produced {
        /// When.
        at: Duration,
        /// The item (it names its producer).
        item: Item,
        /// Queue length just after.
        queued: usize,
    },
    /// A consumer took and processed an item.
    Consumed {
        /// When.
        at: Duration,
        /// Which consumer.
        consumer: usize,
        /// The item.
        item: Item,
    },
    /// A producer finished.
    ProducerDone {
        /// When.
        at: Duration,
        /// Which producer.
        producer: usize,
        /// Items it produced.
        made: usize,
        /// Whether it stopped because it was asked to.
        early: bool,
    },
    /// A consumer got its stop sentinel and is exiting.
    Sentinel {
        /// When.
        at: Duration,
        /// Which consumer.
        consumer: usize,
    },
}

/// The run's record, for checking that nothing was lost or duplicated.
#[derive(Debug, Clone)]
pub(crate) struct PcRun {
    /// Every item the producers queued.
    pub(crate) produced: Vec<Item>,
    /// Items processed, per consumer, in the order it took them.
    pub(crate) consumed: Vec<Vec<Item>>,
    /// Sentinels received, per consumer.
    pub(crate) sentinels: Vec<usize>,
    /// Whether the producers were asked to stop early.
    pub(crate) stopped_early: bool,
    /// Longest the queue got.
    pub(crate) peak_queue: usize,
    /// Wall time.
    pub(crate) elapsed: Duration,
}

/// Runs producers and consumers as configured, calling `on_event` from the threads as
/// things happen (pass `&|_| {}` to stay quiet).
pub(crate) fn run(cfg: &Args, on_event: &(dyn Fn(&Event) + Sync)) -> PcRun {
    let start = Instant::now();
    let (tx, rx) = crossbeam_channel::bounded::<Msg>(cfg.capacity);
    let stop = AtomicBool::new(false);
    let peak_queue = AtomicUsize::new(0);
    let produce = Duration::from_millis(cfg.produce_ms);
    let consume = Duration::from_millis(cfg.consume_ms);

    let (produced, consumed, sentinels) = thread::scope(|s| {
        // Owned by this closure, so a panic unwinding out of it drops the last sender and
        // the consumers see a closed channel instead of waiting forever.
        let tx = tx;
        // Each consumer owns a receiver and the original is dropped right after, so if every
        // consumer died the producers' sends would fail instead of blocking on a full queue.
        let consumers: Vec<_> = (0..cfg.consumers)
            .map(|c| {
                let rx = rx.clone();
                s.spawn(move || {
                    let mut got = Vec::new();
                    let mut sentinels = 0;
                    // A disconnected channel would also end the loop, but the main thread
                    // holds a sender until it has sent every sentinel, so Stop is what ends it.
                    while let Ok(msg) = rx.recv() {
                        match msg {
                            Msg::Item(item) => {
                                thread::sleep(consume);
                                got.push(item);
                                on_event(&Event::Consumed {
                                    at: start.elapsed(),
                                    consumer: c,
                                    item,
                                });
                            }
                            Msg::Stop => {
                                sentinels += 1;
                                on_event(&Event::Sentinel {
                                    at: start.elapsed(),
                                    consumer: c,
                                });
                                break;
                            }
                        }
                    }
                    (got, sentinels)
                })
            })
            .collect();
        drop(rx);

        let producers: Vec<_> = (0..cfg.producers)
            .map(|p| {
                let (tx, stop, peak_queue) = (tx.clone(), &stop, &peak_queue);
                s.spawn(move || {
                    let mut made = Vec::new();
                    let mut early = false;
                    for value in (p..cfg.items).step_by(cfg.producers) {
                        if stop.load(Ordering::SeqCst) {
                            early = true;
                            break;
                        }
                        thread::sleep(produce);
                        let item = Item { producer: p, value };
                        // Blocks while the queue is full: that is the back-pressure.
                        if tx.send(Msg::Item(item)).is_err() {
                            break;
                        }
                        made.push(item);
                        let queued = tx.len();
                        peak_queue.fetch_max(queued, Ordering::SeqCst);
                        on_event(&Event::Produced {
                            at: start.elapsed(),
                            item,
                            queued,
                        });
                    }
                    on_event(&Event::ProducerDone {
                        at: start.elapsed(),
                        producer: p,
                        made: made.len(),
                        early,
                    });
                    made
                })
            })
            .collect();

        // The watchdog raises the stop flag at the deadline, or leaves quietly when the
        // producers finish first (their completion drops `done_tx`).
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        if let Some(ms) = cfg.stop_after_ms {
            let stop = &stop;
            s.spawn(move || {
                if let Err(RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(Duration::from_millis(ms))
                {
                    stop.store(true, Ordering::SeqCst);
                }
            });
        }

        let mut produced = Vec::new();
        for h in producers {
            produced.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        drop(done_tx);
        // One sentinel per consumer, queued behind every real item: each consumer takes
        // exactly one, after which it takes nothing more, so all items are drained first.
        for _ in 0..cfg.consumers {
            let _ = tx.send(Msg::Stop);
        }
        let mut consumed = Vec::new();
        let mut sentinels = Vec::new();
        for h in consumers {
            let (got, n) = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            consumed.push(got);
            sentinels.push(n);
        }
        (produced, consumed, sentinels)
    });

    PcRun {
        produced,
        consumed,
        sentinels,
        stopped_early: stop.load(Ordering::SeqCst),
        peak_queue: peak_queue.load(Ordering::SeqCst),
        elapsed: start.elapsed(),
    }
}

/// Whether the run consumed every produced item exactly once and each consumer got one
/// sentinel.
pub(crate) fn all_accounted_for(run: &PcRun) -> bool {
    let mut produced = run.produced.clone();
    let mut consumed: Vec<Item> = run.consumed.iter().flatten().copied().collect();
    produced.sort_unstable();
    consumed.sort_unstable();
    produced == consumed && run.sentinels.iter().all(|&n| n == 1)
}

fn print_event(e: &Event) {
    match e {
        Event::Produced { at, item, queued } => report::event(
            *at,
            format!(
                "producer-{} produced {:>3}   (queue length {queued})",
                item.producer, item.value
            ),
        ),
        Event::Consumed { at, consumer, item } => report::event(
            *at,
            format!("    consumer-{consumer} consumed {:>3}", item.value),
        ),
        Event::ProducerDone {
            at,
            producer,
            made,
            early,
        } => report::event(
            *at,
            format!(
                "producer-{producer} done after {made} items{}",
                if *early { " (asked to stop early)" } else { "" }
            ),
        ),
        Event::Sentinel { at, consumer } => report::event(
            *at,
            format!("    consumer-{consumer} got its stop sentinel, shutting down"),
        ),
    }
}

/// Runs the demo, printing each item as it is produced and consumed.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("producer-consumer");
    report::info(format!(
        "{} producer(s), {} consumer(s), {} items, queue capacity {}",
        args.producers, args.consumers, args.items, args.capacity
    ));
    let run = run(args, &print_event);
    let per_consumer: Vec<usize> = run.consumed.iter().map(Vec::len).collect();
    report::timing(
        "producer-consumer",
        run.elapsed,
        format!(
            "{} produced, consumed per consumer {:?}, longest queue {}",
            run.produced.len(),
            per_consumer,
            run.peak_queue
        ),
    );
    report::note(
        "the bounded queue gives back-pressure (a fast producer blocks when it is full); the \
         sentinels go in after the last item, one per consumer, so each consumer drains real \
         work first and then exits cleanly — no item lost, no thread left hanging.",
    );
    if run.stopped_early {
        report::note(
            "stopped early by a signal: the producers stopped, and every item they had made \
             was still consumed before the sentinels.",
        );
    }
    let mut checks = report::Checks::default();
    checks.check(
        "every produced item consumed exactly once",
        all_accounted_for(&run),
    );
    checks.check(
        format!("each of the {} consumers got one sentinel", args.consumers),
        run.sentinels.iter().all(|&n| n == 1),
    );
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn args(producers: usize, consumers: usize, items: usize, capacity: usize) -> Args {
        Args {
            producers,
            consumers,
            items,
            capacity,
            produce_ms: 0,
            consume_ms: 1,
            stop_after_ms: None,
        }
    }

    #[test]
    fn every_item_consumed_once_and_every_consumer_gets_its_sentinel() {
        for (p, c, n, cap) in [(1, 3, 12, 50), (3, 2, 100, 2), (2, 5, 1, 1), (1, 1, 0, 1)] {
            let run = run(&args(p, c, n, cap), &|_| {});
            assert_eq!(run.produced.len(), n);
            assert!(all_accounted_for(&run), "{p} {c} {n} {cap}: {run:?}");
            assert_eq!(run.sentinels, vec![1; c]);
            assert!(run.peak_queue <= cap);
        }
    }

    #[test]
    fn sentinel_is_the_last_thing_each_consumer_sees() {
        let seen = Mutex::new(Vec::new());
        run(&args(2, 3, 30, 4), &|e| {
            if let Event::Consumed { consumer, .. } | Event::Sentinel { consumer, .. } = e {
                let is_stop = matches!(e, Event::Sentinel { .. });
                seen.lock().expect("lock").push((*consumer, is_stop));
            }
        });
        let seen = seen.into_inner().expect("lock");
        for c in 0..3 {
            let mine: Vec<bool> = seen.iter().filter(|(x, _)| *x == c).map(|e| e.1).collect();
            assert_eq!(mine.last(), Some(&true));
            assert_eq!(mine.iter().filter(|&&s| s).count(), 1);
        }
    }

    #[test]
    fn early_stop_still_drains_what_was_produced() {
        let mut cfg = args(2, 2, 10_000, 8);
        cfg.produce_ms = 1;
        cfg.stop_after_ms = Some(30);
        let run = run(&cfg, &|_| {});
        assert!(run.stopped_early);
        assert!(run.produced.len() < 10_000);
        assert!(all_accounted_for(&run));
    }
}
