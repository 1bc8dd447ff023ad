//! A memory budget for rendering a chat template, enforced by a counting global allocator.
//!
//! minijinja's fuel counts instructions, not bytes: `{% set ns.s = ns.s ~ ns.s %}` in a loop,
//! or a recursive macro that doubles a string, asks for gigabytes within a few dozen
//! instructions, and minijinja 2 has no limit on the size of a value. So the renderer marks
//! its work with [`Budget::enter`], and [`TemplateAllocator`], installed as a binary's
//! `#[global_allocator]`, counts the bytes allocated (net of those freed) on that thread while
//! the scope is open. Past the budget it ends the process with one line on stderr and exit
//! status 1 ([`Overrun::Exit`]), or fails the allocation ([`Overrun::Fail`], for harnesses
//! that turn allocation failure into an unwind).
//!
//! **The bound holds only in a binary that installs [`TemplateAllocator`]** (`rocforge` and
//! the `chat_template` fuzz target do). Elsewhere the scope counts nothing and a template can
//! still exhaust memory; the fuel limit and the output cap hold everywhere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Bytes allowed in the open scope; 0 when no scope is open.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    /// Bytes allocated minus bytes freed on this thread since the scope opened (frees of
    /// older allocations make it negative).
    static USED: Cell<isize> = const { Cell::new(0) };
    /// Set when an allocation went past the budget ([`Overrun::Fail`]).
    static OVERRAN: Cell<bool> = const { Cell::new(false) };
}

/// What [`TemplateAllocator`] does when a scope's budget is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    /// Write `{prefix}error: the model's chat template allocated more than N MiB while
    /// rendering` to stderr and exit with status 1.
    Exit { prefix: &'static str },
    /// Return null from the allocation, so the caller's `handle_alloc_error` runs; the
    /// thread's [`Budget::overran`] flag is set first.
    Fail,
}

/// A counting allocator over [`System`]: see the module documentation.
pub struct TemplateAllocator {
    overrun: Overrun,
}

impl TemplateAllocator {
    /// Exits the process (status 1) when a template goes past its budget; `prefix` starts
    /// the message (e.g. `"rocforge: "`).
    pub const fn exit_on_overrun(prefix: &'static str) -> Self {
        Self {
            overrun: Overrun::Exit { prefix },
        }
    }

    /// Fails the allocation when a template goes past its budget.
    pub const fn fail_on_overrun() -> Self {
        Self {
            overrun: Overrun::Fail,
        }
    }

    /// Counts `delta` bytes against an open scope; `Some(limit)` when that goes past it, in
    /// which case the scope is closed first so that what follows (the message, exit, an
    /// unwind) allocates freely.
    #[inline]
    fn charge(delta: isize) -> Option<usize> {
        // `try_with`: these const, drop-free thread locals never need lazy initialisation, so
        // this neither allocates nor fails during thread teardown.
        let limit = LIMIT.try_with(Cell::get).unwrap_or(0);
        if limit == 0 {
            return None;
        }
        let used = USED.with(|u| {
            let v = u.get().saturating_add(delta);
            u.set(v);
            v
        });
        if used > 0 && used as usize > limit {
            LIMIT.with(|l| l.set(0));
            return Some(limit);
        }
        None
    }

    #[cold]
    fn overrun(&self, limit: usize) -> *mut u8 {
        match self.overrun {
            Overrun::Fail => {
                OVERRAN.with(|o| o.set(true));
                std::ptr::null_mut()
            }
            Overrun::Exit { prefix } => {
                let mut line = [0u8; 256];
                let n = overrun_message(prefix, limit, &mut line);
                write_stderr(&line[..n]);
                std::process::exit(1)
            }
        }
    }
}

unsafe impl GlobalAlloc for TemplateAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(limit) = Self::charge(layout.size() as isize) {
            return self.overrun(limit);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(limit) = Self::charge(layout.size() as isize) {
            return self.overrun(limit);
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::charge(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let delta = (new_size as isize).saturating_sub(layout.size() as isize);
        if let Some(limit) = Self::charge(delta) {
            return self.overrun(limit);
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// An open budget scope on this thread; closing it (drop) restores the enclosing one.
#[must_use = "the budget holds while the guard lives"]
pub struct Budget {
    saved: (usize, isize),
}

impl Budget {
    /// Opens a scope allowing `limit` bytes (at least 1) on this thread.
    pub fn enter(limit: usize) -> Self {
        let saved = (LIMIT.with(Cell::get), USED.with(Cell::get));
        OVERRAN.with(|o| o.set(false));
        USED.with(|u| u.set(0));
        LIMIT.with(|l| l.set(limit.max(1)));
        Budget { saved }
    }

    /// Bytes counted so far in the scope (allocated minus freed; 0 without the allocator).
    pub fn used(&self) -> isize {
        USED.with(Cell::get)
    }

    /// Whether an allocation on this thread went past the last scope's budget under
    /// [`Overrun::Fail`].
    pub fn overran() -> bool {
        OVERRAN.with(Cell::get)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        LIMIT.with(|l| l.set(self.saved.0));
        USED.with(|u| u.set(self.saved.1));
    }
}

/// `{prefix}error: the model's chat template allocated more than N MiB while rendering\n`
/// into `buf` without allocating; returns its length (truncated to `buf`).
fn overrun_message(prefix: &str, limit: usize, buf: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    // Rounded down, so the line stays true: the render went past `limit` bytes.
    let mut mib = limit >> 20;
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (mib % 10) as u8;
        mib /= 10;
        if mib == 0 {
            break;
        }
    }
    let parts: [&[u8]; 5] = [
        prefix.as_bytes(),
        b"error: the model's chat template allocated more than ",
        &digits[d..],
        b" MiB while rendering",
        b"\n",
    ];
    let mut n = 0;
    for p in parts {
        let take = p.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&p[..take]);
        n += take;
    }
    n
}

#[cfg(unix)]
fn write_stderr(bytes: &[u8]) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // fd 2 as an unbuffered File that is never closed: no lock, no allocation.
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
    let _ = f.write_all(bytes);
}

#[cfg(not(unix))]
fn write_stderr(bytes: &[u8]) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_only_inside_a_scope_and_trips_past_the_limit() {
        assert_eq!(TemplateAllocator::charge(1 << 30), None, "no scope open");
        let b = Budget::enter(1000);
        assert_eq!(TemplateAllocator::charge(600), None);
        assert_eq!(TemplateAllocator::charge(-200), None);
        assert_eq!(b.used(), 400);
        assert_eq!(TemplateAllocator::charge(600), None, "1000 is within");
        assert_eq!(TemplateAllocator::charge(1), Some(1000), "1001 is past");
        // The scope closed itself: what follows the overrun is not charged.
        assert_eq!(TemplateAllocator::charge(1 << 30), None);
        drop(b);
        assert_eq!(LIMIT.with(Cell::get), 0);
    }

    #[test]
    fn frees_of_older_memory_do_not_make_room_beyond_the_limit_plus_them() {
        let _b = Budget::enter(100);
        assert_eq!(TemplateAllocator::charge(-50), None);
        assert_eq!(TemplateAllocator::charge(150), None, "net 100");
        assert_eq!(TemplateAllocator::charge(1), Some(100));
    }

    #[test]
    fn nested_scopes_restore_the_outer_one() {
        let outer = Budget::enter(1000);
        assert_eq!(TemplateAllocator::charge(300), None);
        {
            let _inner = Budget::enter(10);
            assert_eq!(TemplateAllocator::charge(11), Some(10));
        }
        assert_eq!(outer.used(), 300);
        assert_eq!(TemplateAllocator::charge(700), None);
        assert_eq!(TemplateAllocator::charge(1), Some(1000));
    }

    #[test]
    fn fail_mode_returns_null_and_flags_the_thread() {
        let a = TemplateAllocator::fail_on_overrun();
        let _b = Budget::enter(64);
        let layout = Layout::from_size_align(1024, 8).unwrap();
        let p = unsafe { a.alloc(layout) };
        assert!(p.is_null());
        assert!(Budget::overran());
        // The scope is closed: the next allocation succeeds.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        unsafe { a.dealloc(p, layout) };
    }

    #[test]
    fn the_message_is_one_line_with_the_limit_in_mib() {
        let mut buf = [0u8; 256];
        let n = overrun_message("rocforge: ", 64 << 20, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "rocforge: error: the model's chat template allocated more than 64 MiB while rendering\n"
        );
        let n = overrun_message("", (3 << 20) - 1, &mut buf);
        assert!(std::str::from_utf8(&buf[..n]).unwrap().contains(" 2 MiB "));
        let mut small = [0u8; 8];
        assert_eq!(overrun_message("x", 1, &mut small), 8);
    }
}
