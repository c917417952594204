//! TOML configuration: raw struct -> validated `Config` (errors name file, key and reason).
#![forbid(unsafe_code)]
