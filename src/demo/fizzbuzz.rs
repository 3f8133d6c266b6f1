//! `demo fizzbuzz`: the seed's fizzbuzz_multithreading — four threads (fizz, buzz,
//! fizzbuzz, number) each print only their kind of line, taking turns through one
//! `Mutex` holding the next number and a `Condvar`; the output is exactly FizzBuzz 1..=n.

use std::process::ExitCode;
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use super::report;

/// Sizes for `demo fizzbuzz`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Count from 1 to this
    #[arg(long, default_value_t = 15)]
    pub(crate) n: u32,
}

/// The four roles, one thread each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Multiples of 3 only.
    Fizz,
    /// Multiples of 5 only.
    Buzz,
    /// Multiples of 15.
    FizzBuzz,
    /// Everything else.
    Number,
}

impl Role {
    const ALL: [Role; 4] = [Role::Fizz, Role::Buzz, Role::FizzBuzz, Role::Number];

    /// Whose turn `i` is.
    pub(crate) fn of(i: u32) -> Role {
        match (i % 3, i % 5) {
            (0, 0) => Role::FizzBuzz,
            (0, _) => Role::Fizz,
            (_, 0) => Role::Buzz,
            _ => Role::Number,
        }
    }

    fn say(self, i: u32) -> String {
        match self {
            Role::Fizz => "Fizz".to_string(),
            Role::Buzz => "Buzz".to_string(),
            Role::FizzBuzz => "FizzBuzz".to_string(),
            Role::Number => i.to_string(),
        }
    }
}

/// Plain single-threaded FizzBuzz, the reference the threaded one must match.
pub(crate) fn expected(n: u32) -> Vec<String> {
    (1..=n).map(|i| Role::of(i).say(i)).collect()
}

struct Turns {
    next: u32,
    said: Vec<(Role, String)>,
}

/// Runs the four threads for `1..=n`; returns each line with the thread that said it.
pub(crate) fn run(n: u32) -> Vec<(Role, String)> {
    let state = Mutex::new(Turns {
        next: 1,
        said: Vec::with_capacity(n as usize),
    });
    let turn_changed = Condvar::new();
    thread::scope(|s| {
        for role in Role::ALL {
            let (state, turn_changed) = (&state, &turn_changed);
            s.spawn(move || {
                let mut t = state.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    // Sleep until it is this role's number or the count is over; every change
                    // of `next` wakes all four, and the three it is not for go back to sleep.
                    t = turn_changed
                        .wait_while(t, |t| t.next <= n && Role::of(t.next) != role)
                        .unwrap_or_else(PoisonError::into_inner);
                    if t.next > n {
                        break;
                    }
                    let i = t.next;
                    t.said.push((role, role.say(i)));
                    t.next += 1;
                    turn_changed.notify_all();
                }
            });
        }
    });
    state
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .said
}

/// Runs the demo and prints each line with the thread that printed it.
pub(crate) fn main(args: &Args) -> anyhow::Result<ExitCode> {
    report::header("fizzbuzz");
    report::info(format!("1..={} on four threads", args.n));
    let start = Instant::now();
    let said = run(args.n);
    let elapsed = start.elapsed();
    for (role, line) in &said {
        report::info(format!("{line:<8} <- {role:?} thread"));
    }
    report::timing(
        "four threads taking turns",
        elapsed,
        "every turn is a lock + wake-up",
    );
    let start = Instant::now();
    let single = std::hint::black_box(expected(args.n));
    report::timing("one thread", start.elapsed(), "plain loop, for contrast");
    drop(single);
    report::note(
        "the Condvar lets a thread sleep until the shared counter reaches its kind of number \
         instead of spinning; wait_while re-checks the condition after every wake-up. It is \
         correct but slower than one thread: coordination, not parallelism.",
    );
    let lines: Vec<String> = said.into_iter().map(|(_, l)| l).collect();
    let mut checks = report::Checks::default();
    checks.check(
        format!("output is exactly FizzBuzz 1..={}", args.n),
        lines == expected(args.n),
    );
    Ok(checks.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_output_is_exactly_the_sequence() {
        let want = [
            "1", "2", "Fizz", "4", "Buzz", "Fizz", "7", "8", "Fizz", "Buzz", "11", "Fizz", "13",
            "14", "FizzBuzz",
        ];
        assert_eq!(expected(15), want);
        for n in [0, 1, 15, 100] {
            let said = run(n);
            let lines: Vec<String> = said.iter().map(|(_, l)| l.clone()).collect();
            assert_eq!(lines, expected(n), "n = {n}");
            assert!(said
                .iter()
                .enumerate()
                .all(|(i, (role, _))| *role == Role::of(i as u32 + 1)));
        }
    }
}
