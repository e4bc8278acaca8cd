//! An incremental decoder for `Transfer-Encoding: chunked` bodies: fed whatever arrived, it
//! yields body bytes and stops exactly at the end of the message, so what follows (a
//! pipelined request) is left untouched. Memory stays bounded whatever the input.

use crate::Http1Error;

const MAX_SIZE_DIGITS: u8 = 16;
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { value: u64, digits: u8 },
    Extension { size: u64, len: usize },
    SizeLf { size: u64 },
    Data { remaining: u64 },
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    trailer_bytes: usize,
    body_bytes: u64,
}

/// What one call to [`ChunkedDecoder::decode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes consumed (everything up to the end of the message at most).
    pub consumed: usize,
    /// The message's last byte was consumed.
    pub done: bool,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            trailer_bytes: 0,
            body_bytes: 0,
        }
    }

    /// Body bytes decoded so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// Decodes from `input`, appending body bytes to `out`.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Decoded, Http1Error> {
        let bad = Http1Error::BadChunk;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => break,
                State::Size { value, digits } => match (b as char).to_digit(16) {
                    Some(d) => {
                        if digits == MAX_SIZE_DIGITS || value > (u64::MAX >> 4) {
                            return Err(bad("chunk size too large"));
                        }
                        State::Size {
                            value: value << 4 | d as u64,
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return Err(bad("chunk size is not hex")),
                    None => match b {
                        b';' => State::Extension {
                            size: value,
                            len: 0,
                        },
                        b'\r' => State::SizeLf { size: value },
                        _ => return Err(bad("junk after chunk size")),
                    },
                },
                State::Extension { size, len } => match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => return Err(bad("bare LF in chunk extension")),
                    _ if len >= MAX_EXTENSION => return Err(bad("chunk extension too long")),
                    _ => State::Extension { size, len: len + 1 },
                },
                State::SizeLf { size } => match b {
                    b'\n' if size == 0 => State::TrailerStart,
                    b'\n' => State::Data { remaining: size },
                    _ => return Err(bad("chunk size line not ended by CRLF")),
                },
                State::Data { remaining } => {
                    let take = (remaining.min((input.len() - i) as u64)) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    self.body_bytes += take as u64;
                    i += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    continue;
                }
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(bad("chunk data longer than its size")),
                },
                State::DataLf => match b {
                    b'\n' => State::Size {
                        value: 0,
                        digits: 0,
                    },
                    _ => return Err(bad("chunk data not ended by CRLF")),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => return Err(bad("bare LF in trailers")),
                    _ => self.trailer_byte(State::TrailerLine)?,
                },
                State::TrailerLine => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err(bad("bare LF in trailers")),
                    _ => self.trailer_byte(State::TrailerLine)?,
                },
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err(bad("trailer line not ended by CRLF")),
                },
                State::EndLf => match b {
                    b'\n' => {
                        self.state = State::Done;
                        return Ok(Decoded {
                            consumed: i + 1,
                            done: true,
                        });
                    }
                    _ => return Err(bad("message not ended by CRLF")),
                },
            };
            i += 1;
        }
        Ok(Decoded {
            consumed: i,
            done: self.state == State::Done,
        })
    }

    fn trailer_byte(&mut self, next: State) -> Result<State, Http1Error> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(Http1Error::BadChunk("trailers too large"));
        }
        Ok(next)
    }
}
