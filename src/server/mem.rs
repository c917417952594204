//! In-memory backend and a fixed registry, for tests and protocol benchmarks.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, RwLock};

use super::backend::{Backend, ExportInfo, ExportRegistry, Extent, OpenExport};
use super::identity::PeerIdentity;

const PAGE: u64 = 4096;

/// A RAM disk that tracks which 4 KiB pages were ever written (the rest are holes).
pub struct MemBackend {
    data: RwLock<(Vec<u8>, Vec<bool>)>,
    size: u64,
    block: u32,
}

impl MemBackend {
    pub fn new(size: u64, block_size: u32) -> MemBackend {
        let pages = size.div_ceil(PAGE) as usize;
        MemBackend {
            data: RwLock::new((vec![0; size as usize], vec![false; pages])),
            size,
            block: block_size,
        }
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn preferred_block_size(&self) -> u32 {
        self.block
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&g.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> io::Result<()> {
        let mut g = self.data.write().unwrap_or_else(|e| e.into_inner());
        g.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            for p in offset / PAGE..=(offset + data.len() as u64 - 1) / PAGE {
                g.1[p as usize] = true;
            }
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, true, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, _fua: bool) -> io::Result<()> {
        let mut g = self.data.write().unwrap_or_else(|e| e.into_inner());
        g.0[offset as usize..(offset + len) as usize].fill(0);
        if may_trim {
            for p in offset.div_ceil(PAGE)..(offset + len) / PAGE {
                g.1[p as usize] = false;
            }
        }
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let g = self.data.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Extent> = Vec::new();
        let (end, mut pos) = (offset + len, offset);
        while pos < end {
            let p = pos / PAGE;
            let n = ((p + 1) * PAGE).min(end) - pos;
            let hole = !g.1[p as usize];
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length += n,
                _ => out.push(Extent { length: n, hole }),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A fixed name -> backend map.
#[derive(Default)]
pub struct StaticRegistry {
    exports: HashMap<String, (Arc<dyn Backend>, bool)>,
    detach: Option<tokio::sync::watch::Sender<bool>>,
}

impl StaticRegistry {
    pub fn new() -> StaticRegistry {
        StaticRegistry::default()
    }
    pub fn with(
        mut self,
        name: &str,
        backend: Arc<dyn Backend>,
        read_only: bool,
    ) -> StaticRegistry {
        self.exports.insert(name.to_owned(), (backend, read_only));
        self
    }
}

impl ExportRegistry for StaticRegistry {
    fn list(&self, _peer: &PeerIdentity) -> Vec<ExportInfo> {
        let mut v: Vec<ExportInfo> = self
            .exports
            .keys()
            .map(|n| ExportInfo {
                name: n.clone(),
                description: format!("memory export {n}"),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    fn open(&self, name: &str, _peer: &PeerIdentity) -> Option<OpenExport> {
        let (backend, read_only) = self.exports.get(name)?.clone();
        let detached = match &self.detach {
            Some(tx) => tx.subscribe(),
            None => tokio::sync::watch::channel(false).1,
        };
        Some(OpenExport {
            backend,
            read_only,
            detached,
            qos: None,
            guard: Box::new(()),
            stats: None,
        })
    }
}
