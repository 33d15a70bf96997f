//! A minimal NBD client for tests that must see each request's fate (acknowledged, failed or
//! cut off): fixed newstyle, NBD_OPT_GO, then one request at a time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;

pub struct Client {
    s: TcpStream,
    handle: u64,
}

impl Client {
    /// Connects to `export` on 127.0.0.1:`port`.
    pub fn connect(port: u16) -> std::io::Result<Client> {
        Self::connect_to(&format!("127.0.0.1:{port}"), "vd0")
    }

    /// Connects to `export` at `addr` (a Cairn node forwards it to the node that serves it).
    pub fn connect_to(addr: &str, export: &str) -> std::io::Result<Client> {
        Self::open(addr, export, false)
    }

    /// Connects to `export` at `addr` only if that node serves it itself: the session is
    /// marked as already forwarded (Cairn's `OPT_CAIRN_PROXIED`), so a node that does not own
    /// the export refuses it, naming the owner.
    pub fn connect_direct(addr: &str, export: &str) -> std::io::Result<Client> {
        Self::open(addr, export, true)
    }

    fn open(addr: &str, export: &str, direct: bool) -> std::io::Result<Client> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" {
            return Err(std::io::Error::other("not an NBD server"));
        }
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let name = export.as_bytes();
        let mut opt = Vec::new();
        if direct {
            opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
            opt.extend_from_slice(&0x4341_4952u32.to_be_bytes()); // OPT_CAIRN_PROXIED
            opt.extend_from_slice(&0u32.to_be_bytes());
        }
        opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
            match reply {
                1 if option == 0x4341_4952 => continue, // the marker's ACK
                1 => break,                             // NBD_REP_ACK
                3 => continue,                          // NBD_REP_INFO
                other => {
                    return Err(std::io::Error::other(format!(
                        "option GO for {export} refused: reply {other:#x}: {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
            }
        }
        Ok(Client { s, handle: 0 })
    }

    /// One request; an NBD error reply is an `Err` too.
    pub fn request(
        &mut self,
        ty: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> std::io::Result<Vec<u8>> {
        self.handle += 1;
        let mut r = Vec::with_capacity(28 + data.map_or(0, |d| d.len()));
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        if let Some(d) = data {
            r.extend_from_slice(d);
        }
        self.s.write_all(&r)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32::from_be_bytes(h[..4].try_into().unwrap()) != 0x6744_6698 {
            return Err(std::io::Error::other("bad NBD reply magic"));
        }
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if err != 0 {
            return Err(std::io::Error::other(format!("NBD error {err}")));
        }
        let mut out = vec![0u8; if ty == CMD_READ { len as usize } else { 0 }];
        self.s.read_exact(&mut out)?;
        Ok(out)
    }
}

/// The 4 KiB contents written with `tag` (a pseudo-random pattern, different for every tag).
pub fn block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b
}
