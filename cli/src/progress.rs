//! `-p` progress: an indicatif bar on a terminal, qemu-img's `    (NN.NN/100%)` lines otherwise.
//!
//! The printing rule is qemu's: a new value is printed when it moved more than `min_skip` percent
//! from the last printed one, or reaches 0 or 100. Without `-p` nothing is printed (qemu prints the
//! current value on SIGUSR1; vdisk does not).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

struct State {
    current: f32,
    last_print: f32,
}

/// A progress reporter shared by the workers of one command.
pub struct Progress {
    enabled: bool,
    min_skip: f32,
    state: Mutex<State>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A reporter; `enabled` is `-p`, `min_skip` is qemu's step (1.0 for convert).
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        let bar = if enabled && std::io::stdout().is_terminal() && std::env::var_os("VDISK_PLAIN_PROGRESS").is_none() {
            let b = ProgressBar::new(10000);
            b.set_style(
                ProgressStyle::with_template("    [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Some(b)
        } else {
            None
        };
        Progress { enabled, min_skip, state: Mutex::new(State { current: 0.0, last_print: 0.0 }), bar }
    }

    /// Sets the absolute value (0..=100).
    pub fn set(&self, value: f32) {
        self.update(value, 0.0);
    }

    /// Adds `delta` percent of a sub-task that is worth `max` percent of the whole (qemu's
    /// `qemu_progress_print(delta, max)` with max > 0).
    pub fn add(&self, delta: f32, max: f32) {
        self.update(delta, max);
    }

    fn update(&self, delta: f32, max: f32) {
        if !self.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut current = if max == 0.0 { delta } else { s.current + delta / 100.0 * max };
        if current > 100.0 {
            current = 100.0;
        }
        s.current = current;
        if current > s.last_print + self.min_skip
            || current < s.last_print - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            s.last_print = current;
            match &self.bar {
                Some(b) => b.set_position((current * 100.0) as u64),
                None => {
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "    ({current:3.2}/100%)\r");
                    let _ = out.flush();
                }
            }
        }
    }

    /// Ends the output (a newline, as qemu prints).
    pub fn end(&self) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(b) => b.finish(),
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out);
                let _ = out.flush();
            }
        }
    }
}
