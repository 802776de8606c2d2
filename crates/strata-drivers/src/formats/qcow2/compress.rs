//! Compressed clusters: raw deflate (QEMU's "zlib", 4 KiB window, no header)
//! and zstd.

use super::header::Compression;
use strata_block::{Error, Result};

/// Decompresses `src` into exactly `out.len()` bytes; trailing input (the
/// rest of the last sector) is ignored, as the format allows.
pub fn decompress(kind: Compression, src: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = || Error::corrupt("Failed to decompress a compressed cluster");
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status = d.decompress(src, out, flate2::FlushDecompress::Finish);
            match status {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                _ => Err(bad()),
            }
        }
        Compression::Zstd => {
            // The data may be several frames (QEMU streams it); decode until the cluster is full.
            let mut dctx = zstd::stream::raw::Decoder::new().map_err(|_| bad())?;
            let mut input = zstd::stream::raw::InBuffer::around(src);
            let mut output = zstd::stream::raw::OutBuffer::around(out);
            use zstd::stream::raw::Operation;
            while output.pos() < output.capacity() {
                let before = (input.pos(), output.pos());
                dctx.run(&mut input, &mut output).map_err(|_| bad())?;
                if (input.pos(), output.pos()) == before {
                    return Err(bad());
                }
            }
            Ok(())
        }
    }
}

/// Compresses one cluster into at most `max` bytes as QEMU does (raw
/// deflate, default level, 4 KiB window, memLevel 9; or zstd at its default
/// level). None when it does not fit: the cluster is then written as is.
pub fn compress(kind: Compression, src: &[u8], max: usize) -> Option<Vec<u8>> {
    match kind {
        Compression::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = vec![0u8; max];
            match c.compress(src, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Some(out)
                }
                _ => None,
            }
        }
        Compression::Zstd => {
            let out = zstd::bulk::compress(src, 0).ok()?;
            (out.len() <= max).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_round_trip() {
        let data = vec![7u8; 65536];
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xaa; 100]); // sector padding
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn compress_round_trips_and_gives_up_on_noise() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [Compression::Zlib, Compression::Zstd] {
            let c = compress(kind, &data, 65535).unwrap();
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
        // Pseudo-random bytes do not shrink.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        assert!(compress(Compression::Zlib, &noise, 65535).is_none());
    }

    #[test]
    fn zstd_round_trip_and_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let c = zstd::encode_all(&data[..], 3).unwrap();
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(Compression::Zstd, &[1, 2, 3], &mut out).is_err());
    }
}
