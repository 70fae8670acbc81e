//! Response compression: choosing an encoding and compressing a body as it streams through.
//!
//! The encoders write into an in-memory buffer that the body loop drains after every piece of
//! input, so a response is never held whole: memory is the encoder's window plus one read.

use std::io::{self, Write};

use crate::config::{Compression, Encoding};

/// zlib level for on-the-fly gzip: most of the ratio of level 6 at a fraction of its cost.
const GZIP_LEVEL: u32 = 4;
/// Brotli quality for on-the-fly use (11 is for precompressed files).
const BROTLI_QUALITY: u32 = 4;
/// Brotli window, log2 bytes.
const BROTLI_WINDOW: u32 = 20;
/// zstd level (3 is zstd's own default).
const ZSTD_LEVEL: i32 = 3;

/// Chooses the encoding for a response from the request's Accept-Encoding: the acceptable
/// (q > 0) configured encoding with the highest q-value, ties going to the configured order.
/// `None` when the client accepts none of them.
pub fn negotiate(config: &Compression, accept_encoding: Option<&[u8]>) -> Option<Encoding> {
    let accept = std::str::from_utf8(accept_encoding?).ok()?;
    let mut best: Option<(Encoding, u32)> = None;
    for &encoding in &config.algorithms {
        let q = quality(accept, encoding.token());
        if q > 0 && best.is_none_or(|(_, best_q)| q > best_q) {
            best = Some((encoding, q));
        }
    }
    best.map(|(encoding, _)| encoding)
}

/// The q-value (in thousandths) that an Accept-Encoding value gives `token`: its own entry, else
/// `*`, else 0.
fn quality(accept: &str, token: &str) -> u32 {
    let mut star = None;
    for entry in accept.split(',') {
        let mut parts = entry.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .find_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("q")
                    .then(|| parse_q(v.trim()))
            })
            .unwrap_or(1000);
        if coding.eq_ignore_ascii_case(token) {
            return q;
        }
        if coding == "*" {
            star = Some(q);
        }
    }
    star.unwrap_or(0)
}

/// A q-value ("0", "0.5", "1.000") in thousandths; anything malformed counts as 0.
fn parse_q(text: &str) -> u32 {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let whole: u32 = match whole {
        "0" => 0,
        "1" => 1000,
        _ => return 0,
    };
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let mut thousandths = 0;
    for (i, digit) in fraction.bytes().enumerate() {
        thousandths += u32::from(digit - b'0') * [100, 10, 1][i];
    }
    (whole + thousandths).min(1000)
}

/// Whether a response with this Content-Type is to be compressed.
pub fn compressible_type(config: &Compression, content_type: Option<&[u8]>) -> bool {
    let Some(content_type) = content_type.and_then(|c| std::str::from_utf8(c).ok()) else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    config
        .types
        .iter()
        .any(|pattern| match pattern.strip_suffix("/*") {
            Some(major) => essence
                .split_once('/')
                .is_some_and(|(m, _)| m.eq_ignore_ascii_case(major)),
            None => essence.eq_ignore_ascii_case(pattern),
        })
}

/// A streaming compressor that collects its output in memory.
pub enum Encoder {
    /// gzip (RFC 1952).
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    /// Brotli (RFC 7932).
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    /// Zstandard (RFC 8878).
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    /// The Content-Encoding token of what this encoder produces.
    pub fn token(&self) -> &'static str {
        match self {
            Encoder::Gzip(_) => Encoding::Gzip.token(),
            Encoder::Brotli(_) => Encoding::Brotli.token(),
            Encoder::Zstd(_) => Encoding::Zstd.token(),
        }
    }

    /// A fresh encoder for `encoding`.
    pub fn new(encoding: Encoding) -> io::Result<Encoder> {
        Ok(match encoding {
            Encoding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(GZIP_LEVEL),
            )),
            Encoding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                BROTLI_QUALITY,
                BROTLI_WINDOW,
            ))),
            Encoding::Zstd => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?)
            }
        })
    }

    /// Compresses `data` and flushes, returning the compressed output. Flushing after each
    /// piece the backend sent costs a little ratio but keeps streams (server-sent events, long
    /// polls) flowing instead of waiting for the compressor's window to fill.
    pub fn push(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Zstd(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }

    /// Ends the stream, returning the rest of the output.
    pub fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Compression {
        Compression {
            algorithms: vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
            min_size: 0,
            types: vec!["text/*".into(), "application/json".into()],
        }
    }

    #[test]
    fn negotiation_follows_q_values_then_configured_order() {
        let c = config();
        let pick = |accept: &str| negotiate(&c, Some(accept.as_bytes()));
        assert_eq!(pick("gzip, deflate, br, zstd"), Some(Encoding::Zstd));
        assert_eq!(pick("gzip, br"), Some(Encoding::Brotli));
        assert_eq!(pick("gzip;q=1.0, br;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(pick("br;q=0, gzip;q=0.001"), Some(Encoding::Gzip));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("*"), Some(Encoding::Zstd));
        assert_eq!(pick("*;q=0.5, zstd;q=0"), Some(Encoding::Brotli));
        assert_eq!(pick("gzip;q=abc"), None);
        assert_eq!(negotiate(&c, None), None);
    }

    #[test]
    fn content_types() {
        let c = config();
        assert!(compressible_type(&c, Some(b"text/html; charset=utf-8")));
        assert!(compressible_type(&c, Some(b"Application/JSON")));
        assert!(!compressible_type(&c, Some(b"image/png")));
        assert!(!compressible_type(&c, None));
    }

    #[test]
    fn every_encoder_round_trips() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for encoding in [Encoding::Gzip, Encoding::Brotli, Encoding::Zstd] {
            let mut encoder = Encoder::new(encoding).unwrap();
            let mut out = Vec::new();
            for piece in data.chunks(7_000) {
                out.extend(encoder.push(piece).unwrap());
            }
            out.extend(encoder.finish().unwrap());
            assert!(out.len() < data.len() / 4, "{encoding:?} compressed poorly");
            let mut back = Vec::new();
            match encoding {
                Encoding::Gzip => {
                    io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut back)
                        .unwrap();
                }
                Encoding::Brotli => {
                    io::Read::read_to_end(
                        &mut brotli::Decompressor::new(&out[..], 4096),
                        &mut back,
                    )
                    .unwrap();
                }
                Encoding::Zstd => back = zstd::decode_all(&out[..]).unwrap(),
            }
            assert_eq!(back, data, "{encoding:?}");
        }
    }
}
