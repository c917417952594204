//! tokio NBD server: listeners, one session per connection, out-of-order replies.

pub mod backend;

pub use backend::{Backend, ExportInfo, ExportRegistry, Extent, OpenExport};
