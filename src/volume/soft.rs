//! Pure-Rust AES-256-XTS on the RustCrypto `aes` crate: the independent second backend.
//!
//! Runs of units go through [`xts_batch`]: a chunk's initial tweaks in one `encrypt_blocks`
//! call under K2, the tweak chains expanded, then ONE `encrypt_blocks`/`decrypt_blocks` call
//! over the whole chunk. The `aes` crate picks VAES-512 at run time where the CPU has it, and
//! its parallel path takes 64 blocks at a time: a lone 512-byte unit (32 blocks) would fall
//! back to one block at a time, which is why 512-byte units need the batching. No
//! RUSTFLAGS/target-feature needed (runtime detection, `cpufeatures`).
//!
//! Where the CPU has VAES/AVX-512 the fused kernel of [`xts_vaes`] serves every call instead
//! (tweaks in registers, one pass), and the `aes` crate's schedules are not made at all.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use super::cipher::{UnitSize, XtsBackend, XtsKey};
use super::xts_batch;
use super::xts_vaes::VaesXts;
use crate::secmem::LockedBox;

/// The two key schedules (data, tweak) live in locked memory. `Aes256::new` returns them by
/// value, so the expansion's own stack frame may hold a copy until it is overwritten.
pub struct SoftXts {
    engine: Engine,
}

enum Engine {
    Fused(VaesXts),
    Portable(LockedBox<Keys>),
}

struct Keys {
    data: Aes256,
    tweak: Aes256,
}

impl SoftXts {
    /// The fused kernel where the CPU runs it, else the portable path.
    pub fn new(key: &XtsKey) -> SoftXts {
        match VaesXts::new(key) {
            Some(f) => SoftXts {
                engine: Engine::Fused(f),
            },
            None => SoftXts::portable(key),
        }
    }

    /// The `aes`-crate path whatever the CPU (tests compare it with the fused kernel).
    pub fn portable(key: &XtsKey) -> SoftXts {
        let (k1, k2) = key.bytes().split_at(32);
        SoftXts {
            engine: Engine::Portable(LockedBox::new(Keys {
                data: Aes256::new(&Array::try_from(k1).expect("32-byte half")),
                tweak: Aes256::new(&Array::try_from(k2).expect("32-byte half")),
            })),
        }
    }

    fn run(&self, first_unit: u64, unit: UnitSize, data: &mut [u8], encrypt: bool) {
        let keys = match &self.engine {
            Engine::Fused(f) => return f.apply(encrypt, first_unit, unit, data),
            Engine::Portable(keys) => &**keys,
        };
        xts_batch::run(
            first_unit,
            unit,
            data,
            None,
            |t0| keys.tweak.encrypt_blocks(as_blocks(t0)),
            |chunk| {
                if encrypt {
                    keys.data.encrypt_blocks(as_blocks(chunk));
                } else {
                    keys.data.decrypt_blocks(as_blocks(chunk));
                }
            },
        );
    }
}

/// Whole 16-byte blocks of `buf` (xts_batch only passes multiples of 16).
fn as_blocks(buf: &mut [u8]) -> &mut [aes::Block] {
    let (blocks, rest) = Array::<u8, _>::slice_as_chunks_mut(buf);
    debug_assert!(rest.is_empty());
    blocks
}

impl XtsBackend for SoftXts {
    fn encrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        self.run(first_unit, unit, data, true);
    }
    fn decrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        self.run(first_unit, unit, data, false);
    }
    fn decrypt_to(&self, first_unit: u64, unit: UnitSize, src: &[u8], dst: &mut [u8]) {
        match &self.engine {
            Engine::Fused(f) => f.apply_to(false, first_unit, unit, src, dst),
            Engine::Portable(_) => {
                dst.copy_from_slice(src);
                self.run(first_unit, unit, dst, false);
            }
        }
    }
    fn fused(&self) -> bool {
        matches!(self.engine, Engine::Fused(_))
    }
}
