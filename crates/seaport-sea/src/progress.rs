//! Progress on stderr for long operator commands and benchmark phases: a bar (or a spinner) when
//! stderr is a terminal, `None` otherwise, so pipes, CI logs and scripts get the callers' plain
//! lines instead.
//!
//! Bars draw through indicatif's default stderr target, rate-limited to 20 redraws a second, so
//! updating one is a few atomic operations; callers still update per batch, not per message.

use std::borrow::Cow;
use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// Is stderr a terminal (where bars are drawn)?
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar of `total` steps when stderr is a terminal and the work is long enough to watch.
pub fn bar(total: u64, what: impl Into<Cow<'static, str>>) -> Option<ProgressBar> {
    if total < 2 || !on_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        // The bar takes what the line leaves, so it never wraps on a narrow terminal.
        ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} ({rate}, eta {eta})")
            .expect("valid template")
            .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let rate = state.per_sec();
                let _ = if rate < 10.0 {
                    write!(w, "{rate:.1}/s")
                } else {
                    write!(w, "{rate:.0}/s")
                };
            })
            .progress_chars("=> "),
    );
    bar.set_message(what);
    Some(bar)
}

/// A spinner with a running message (work of unknown size) when stderr is a terminal.
pub fn spinner(what: impl Into<Cow<'static, str>>) -> Option<ProgressBar> {
    if !on_terminal() {
        return None;
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("valid template")
            .tick_chars("-\\|/ "),
    );
    spinner.set_message(what);
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(spinner)
}

/// A line on stderr: above the bar while one is drawn, plain otherwise.
pub fn line(bar: Option<&ProgressBar>, text: impl AsRef<str>) {
    match bar {
        Some(bar) => bar.println(text),
        None => eprintln!("{}", text.as_ref()),
    }
}
