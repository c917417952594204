//! Pure-Rust AES-256-XTS on the RustCrypto `aes` crate: the independent second backend.
//!
//! Per unit: compute all tweaks first (T_0 = AES(K2, iv), T_j+1 = T_j * x in GF(2^128)),
//! XOR them in, encrypt every block of the unit in one `encrypt_blocks` call (so AES-NI keeps
//! eight blocks in flight), XOR again.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use super::cipher::{UnitSize, XtsBackend, XtsKey, plain64_iv};
use crate::secmem::LockedBox;

const MAX_BLOCKS: usize = 4096 / 16;

/// The two key schedules (data, tweak) live in locked memory. `Aes256::new` returns them by
/// value, so the expansion's own stack frame may hold a copy until it is overwritten.
pub struct SoftXts {
    keys: LockedBox<Keys>,
}

struct Keys {
    data: Aes256,
    tweak: Aes256,
}

impl SoftXts {
    pub fn new(key: &XtsKey) -> SoftXts {
        let (k1, k2) = key.bytes().split_at(32);
        SoftXts {
            keys: LockedBox::new(Keys {
                data: Aes256::new(&Array::try_from(k1).expect("32-byte half")),
                tweak: Aes256::new(&Array::try_from(k2).expect("32-byte half")),
            }),
        }
    }

    fn run(&self, first_unit: u64, unit: UnitSize, data: &mut [u8], encrypt: bool) {
        let nblocks = unit.bytes() / 16;
        let mut tweaks = [[0u8; 16]; MAX_BLOCKS];
        for (k, chunk) in data.chunks_exact_mut(unit.bytes()).enumerate() {
            let mut t0 = Array::from(plain64_iv(first_unit.wrapping_add(k as u64)));
            self.keys.tweak.encrypt_block(&mut t0);
            let mut t = u128::from_le_bytes(t0.0);
            for slot in tweaks.iter_mut().take(nblocks) {
                *slot = t.to_le_bytes();
                // Multiply by x: shift left one bit; reduce by x^128 + x^7 + x^2 + x + 1.
                t = (t << 1) ^ ((t >> 127) * 0x87);
            }
            let (blocks, rest) = Array::<u8, _>::slice_as_chunks_mut(chunk);
            debug_assert!(rest.is_empty());
            xor_tweaks(blocks, &tweaks[..nblocks]);
            if encrypt {
                self.keys.data.encrypt_blocks(blocks);
            } else {
                self.keys.data.decrypt_blocks(blocks);
            }
            xor_tweaks(blocks, &tweaks[..nblocks]);
        }
    }
}

/// XORs each block with its tweak; byte loops over 16-byte arrays vectorise to one SIMD XOR.
fn xor_tweaks(blocks: &mut [aes::Block], tweaks: &[[u8; 16]]) {
    for (b, t) in blocks.iter_mut().zip(tweaks) {
        for (x, y) in b.0.iter_mut().zip(t) {
            *x ^= y;
        }
    }
}

impl XtsBackend for SoftXts {
    fn encrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        self.run(first_unit, unit, data, true);
    }
    fn decrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        self.run(first_unit, unit, data, false);
    }
}
