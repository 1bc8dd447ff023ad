//! Panics on CubeCL's device threads, turned into errors.
//!
//! CubeCL 0.10 runs each device's work on a thread of its own (named `DS…`) and catches a
//! panic there: a device allocation that fails (`reserve(..).unwrap()` in the CUDA and HIP
//! servers) ends the task silently, and the caller learns of it late or not at all. That
//! happens when another process takes device memory between ROCforge's free-memory check and
//! its uploads. A binary's panic hook passes such panics to [`note`] instead of printing them
//! (`rocforge` and `rocforge-bench` do, see [`hook`]); the GPU backends check [`take`] after
//! building their buffers and after each forward pass, and return the panic as an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static NOTED: AtomicBool = AtomicBool::new(false);
static FAULT: Mutex<Option<String>> = Mutex::new(None);

/// Whether the current thread is one of CubeCL's device threads.
pub fn on_device_thread() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| n.starts_with("DS"))
}

/// Records a device-thread panic; the first one since the last [`take`] is kept.
pub fn note(message: String) {
    let mut f = FAULT.lock().unwrap_or_else(|e| e.into_inner());
    if f.is_none() {
        *f = Some(message);
    }
    NOTED.store(true, Ordering::Release);
}

/// The device-thread panic noted since the last call, if any (one atomic load when none).
pub fn take() -> Option<String> {
    if !NOTED.swap(false, Ordering::AcqRel) {
        return None;
    }
    FAULT.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// A panic hook for binaries: a device-thread panic is noted (the backend reports it as an
/// error), any other prints one line, `{prefix}internal error: {info}`.
pub fn hook(prefix: &'static str) -> Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> {
    Box::new(move |info| {
        if on_device_thread() {
            note(one_line(&info.to_string()));
        } else {
            eprintln!("{prefix}internal error: {info}");
        }
    })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noted_fault_is_taken_once() {
        assert_eq!(take(), None);
        note("out of memory".into());
        note("a second panic".into());
        assert_eq!(take().as_deref(), Some("out of memory"));
        assert_eq!(take(), None);
    }

    #[test]
    fn device_threads_are_named_ds() {
        assert!(!on_device_thread());
        let named = std::thread::Builder::new()
            .name("DS-U-1-0".into())
            .spawn(on_device_thread)
            .unwrap()
            .join()
            .unwrap();
        assert!(named);
    }
}
