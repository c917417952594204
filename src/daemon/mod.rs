//! daemon: see ARCHITECTURE.md.
