//! `mglue`: the modelglue command line.

mod cli;

/// mimalloc, configured in `main` never to hand freed memory back to the OS: a merge allocates
/// and frees tensor-sized buffers all the time, and with the system allocator every one of them
/// was a fresh `mmap` whose pages fault in one by one (page faults were most of the CPU time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc 2.x and 3.x's `mi_option_t` (the Rust binding lacks the
/// constant; the versions are pinned in Cargo.toml so the numbering cannot move).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // SAFETY: plain option setters of the allocator, called before any thread is started.
    unsafe {
        // Keep freed pages committed (no purge / MADV_DONTNEED): reused buffers do not fault again.
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    std::process::exit(cli::main());
}
