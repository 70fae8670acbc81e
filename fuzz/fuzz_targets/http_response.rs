//! What a backend sends back is as untrusted as what a client sends: a response head and a
//! chunked body, in whatever pieces the socket hands them over. Parsed in one piece or in
//! pieces, the head and the decoded body (its data, where it ends, its trailers) must be the
//! same; a head written on to a client parses again as the same head, and a body re-chunked
//! decodes to the same data.
//!
//! Input: a flag byte (bit 0: the request was a HEAD; bit 1: chunk data is skipped rather than
//! read, as when it is spliced), four bytes that place the cuts, then the bytes of the response.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchyard::http::h1::{
    ChunkedDecoder, Decoded, Framing, HeadError, MAX_HEADERS, Persistence, ResponseHead, encode_chunk,
    encode_last_chunk, parse_response,
};

/// Ends of the pieces `len` bytes are cut into.
fn cuts(seeds: &[u8], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = seeds
        .iter()
        .map(|&s| usize::from(s) * len / 256)
        .chain(std::iter::once(len))
        .collect();
    cuts.sort_unstable();
    cuts
}

fn parse_in_pieces(
    bytes: &[u8],
    cuts: &[usize],
    head: bool,
) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let mut buf = BytesMut::new();
    let mut from = 0;
    for &cut in cuts {
        buf.extend_from_slice(&bytes[from..cut]);
        from = cut;
        if let Some(response) = parse_response(&mut buf, head)? {
            return Ok(Some((response, bytes.len() - from + buf.len())));
        }
    }
    Ok(None)
}

fn same(a: &ResponseHead, b: &ResponseHead) -> bool {
    a.status == b.status
        && a.framing == b.framing
        && a.close == b.close
        && a.fields().eq(b.fields())
        && a.declared_length() == b.declared_length()
}

/// What a chunked body decodes to: its data, and the input used and trailers if it ended.
#[derive(Debug, PartialEq, Eq)]
struct Body {
    data: Vec<u8>,
    end: Option<(usize, Vec<u8>)>,
    failed: bool,
}

fn decode(body: &[u8], cuts: &[usize], skip: bool) -> Body {
    let mut decoder = ChunkedDecoder::default();
    let mut out = Body {
        data: Vec::new(),
        end: None,
        failed: false,
    };
    let mut from = 0;
    // Each piece is decoded on its own, as each read is; the offsets are the piece's.
    for &cut in cuts {
        let piece = &body[from..cut];
        let mut pos = 0;
        // Each step consumes input or returns; a piece takes at most twice its length in steps.
        for _ in 0..=2 * piece.len() + 2 {
            let left = decoder.data_left();
            if skip && left > 0 && pos < piece.len() {
                let n = left.min((piece.len() - pos) as u64) as usize;
                out.data.extend_from_slice(&piece[pos..pos + n]);
                decoder.skip_data(n as u64);
                pos += n;
                continue;
            }
            match decoder.decode(piece, &mut pos) {
                Ok(Decoded::Data(range)) => {
                    assert!(range.end <= piece.len() && range.end == pos);
                    out.data.extend_from_slice(&piece[range]);
                }
                Ok(Decoded::End(used)) => {
                    assert!(used <= piece.len() && used == pos);
                    out.end = Some((from + used, decoder.trailers.clone()));
                    assert!(decoder.forwardable_trailers().len() <= decoder.trailers.len());
                    let _ = decoder.trailers_valid();
                    return out;
                }
                Ok(Decoded::NeedMore) => {
                    assert_eq!(pos, piece.len());
                    break;
                }
                Err(_) => {
                    out.failed = true;
                    return out;
                }
            }
        }
        assert_eq!(pos, piece.len(), "the decoder stopped mid-piece");
        from = cut;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (flags, seeds, bytes) = (data[0], &data[1..5], &data[5..]);
    let head = flags & 1 != 0;
    let skip = flags & 2 != 0;
    let cuts = cuts(seeds, bytes.len());

    let mut buf = BytesMut::from(bytes);
    let whole = parse_response(&mut buf, head);
    let pieces = parse_in_pieces(bytes, &cuts, head);
    if bytes.len() < 4096 {
        match (&whole, &pieces) {
            (Ok(Some(a)), Ok(Some((b, rest)))) => {
                assert!(same(a, b));
                assert_eq!(buf.len(), *rest);
            }
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            (a, b) => panic!("one piece: {a:?}, in pieces: {b:?}"),
        }
    }
    let Ok(Some(response)) = whole else {
        // Not a head: the bytes are a chunked body on their own.
        let body = decode(bytes, &[bytes.len()], false);
        assert_eq!(body, decode(bytes, &cuts, skip));
        check_rechunked(&body);
        return;
    };
    assert!((100..=599).contains(&response.status));

    for persistence in [Persistence::of(false, 1), Persistence::of(true, 0)] {
        let mut out = BytesMut::new();
        let framing = match response.framing {
            Framing::UntilClose => Framing::Chunked,
            framing => framing,
        };
        response.write_downstream(&mut out, framing, persistence, &[], &[], &["Secure"]);
        out.extend_from_slice(b"\r\n");
        match parse_response(&mut out.clone(), head) {
            Ok(Some(again)) => {
                assert_eq!(again.status, response.status);
                assert_eq!(again.fields().count(), response.fields().count());
            }
            // The fields of our own may take a head of 100 fields past what the parser counts.
            Err(HeadError::TooLarge) if response.fields().count() + 3 > MAX_HEADERS => {}
            other => panic!("{out:?} written from an accepted head parses as {other:?}"),
        }
    }

    if response.framing == Framing::Chunked {
        let body = &bytes[bytes.len() - buf.len()..];
        let cuts = self::cuts(seeds, body.len());
        let whole = decode(body, &[body.len()], false);
        assert_eq!(whole, decode(body, &cuts, skip));
        check_rechunked(&whole);
    }
});

/// A body that ended, chunked again as the proxy sends it on, decodes to the same data and its
/// forwardable trailers.
fn check_rechunked(body: &Body) {
    let Some((_, trailers)) = &body.end else {
        return;
    };
    let mut out = BytesMut::new();
    for piece in body.data.chunks(7) {
        encode_chunk(&mut out, piece);
    }
    let mut decoder = ChunkedDecoder::default();
    decoder.trailers = trailers.clone();
    let forwardable = decoder.forwardable_trailers().into_owned();
    encode_last_chunk(&mut out, &forwardable);
    let again = decode(&out, &[out.len()], false);
    assert_eq!(again.data, body.data);
    assert_eq!(again.end, Some((out.len(), forwardable)));
}
