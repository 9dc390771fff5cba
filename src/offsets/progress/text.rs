//! The map's text layer: the CRC-32 that binds a map to its commit point, and
//! strict base64url without padding.

use super::{Error, Kind};

/// CRC-32 (IEEE) of `base ‖ kind ‖ body`.
pub(super) fn checksum(base: i64, kind: Kind, body: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in base
        .to_le_bytes()
        .iter()
        .chain([kind.tag()].iter())
        .chain(body)
    {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub(super) fn b64_len(n: usize) -> usize {
    (4 * n).div_ceil(3)
}

pub(super) fn b64_encode(bytes: &[u8], out: &mut String) {
    for chunk in bytes.chunks(3) {
        let v = chunk
            .iter()
            .enumerate()
            .fold(0u32, |v, (i, &b)| v | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(B64[(v >> (18 - 6 * i) & 63) as usize]));
        }
    }
}

/// Strict base64url without padding: a length of 1 mod 4 and non-zero
/// leftover bits are rejected, so each text has one meaning. `offset` is the
/// text's position, for the error.
pub(super) fn b64_decode(text: &[u8], offset: usize) -> Result<Vec<u8>, Error> {
    if text.len() % 4 == 1 {
        return Err(Error::Base64 {
            position: offset + text.len() - 1,
        });
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for (c, chunk) in text.chunks(4).enumerate() {
        let mut v = 0u32;
        for (i, &ch) in chunk.iter().enumerate() {
            let d = match ch {
                b'A'..=b'Z' => ch - b'A',
                b'a'..=b'z' => ch - b'a' + 26,
                b'0'..=b'9' => ch - b'0' + 52,
                b'-' => 62,
                b'_' => 63,
                _ => {
                    return Err(Error::Base64 {
                        position: offset + 4 * c + i,
                    })
                }
            };
            v |= u32::from(d) << (18 - 6 * i);
        }
        let n = chunk.len() - 1;
        // Leftover bits below the last whole byte must be zero.
        if v & ((1 << (24 - 8 * n)) - 1) != 0 {
            return Err(Error::Base64 {
                position: offset + 4 * c + n,
            });
        }
        out.extend((0..n).map(|i| (v >> (16 - 8 * i)) as u8));
    }
    Ok(out)
}
