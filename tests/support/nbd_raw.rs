//! A blocking raw-protocol NBD client for tests: the fixed-newstyle handshake,
//! `NBD_OPT_GO` of one export, and requests with simple replies, built on the
//! agent's own protocol codec (`pipecloud::nbd::proto`). One copy for every test
//! that talks NBD without an external tool (malformed requests, multi-conn
//! flushes, writes through a live agent). Panics on protocol surprises: it is a
//! test client.

#![allow(dead_code)]

use pipecloud::nbd::proto::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        assert_eq!(g, encode_greeting());
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        Raw { s }
    }

    /// Connect + NBD_OPT_GO `export`; returns the export size.
    pub fn go(sock: &Path, export: &str) -> (Raw, u64) {
        let mut r = Raw::connect(sock);
        r.s.write_all(&encode_option(OPT_GO, &encode_go_data(export)))
            .unwrap();
        let mut size = None;
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            r.s.read_exact(&mut h).unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0; len];
            r.s.read_exact(&mut d).unwrap();
            match ty {
                REP_INFO if d[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()))
                }
                REP_INFO => {}
                REP_ACK => return (r, size.unwrap()),
                other => panic!("GO failed with reply type {other:#x}"),
            }
        }
    }

    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let b = encode_request(kind, flags, handle, offset, length, payload);
        self.s.write_all(&b).unwrap();
    }

    /// (error, handle) of the next simple reply.
    pub fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut r).unwrap();
        decode_simple_reply(&r).expect("a simple reply")
    }

    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u32 {
        self.send(kind, flags, handle, offset, length, payload);
        let (err, h) = self.reply();
        assert_eq!(h, handle);
        err
    }

    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let err = self.call(CMD_READ, 0, handle, offset, len, &[]);
        if err != 0 {
            return Err(err);
        }
        let mut d = vec![0; len as usize];
        self.s.read_exact(&mut d).unwrap();
        Ok(d)
    }

    /// True if the server closed the connection (EOF) rather than leaving it open.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}
